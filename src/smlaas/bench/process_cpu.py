"""The CPU time a local deployment's processes spend, read from ``/proc`` (Linux).

A benchmark that compares two modes side by side reads each role's CPU seconds before and
after a block and divides by the requests served in it: in a CPU-bound run every millisecond
a role spends per request comes off the throughput, and this figure moves far less than the
throughput itself on a VM whose speed drifts by several percent within minutes. A role's
process is the one whose standard output is its log in the local launcher's log directory
(``<state>/logs/<role>.log``). Where ``/proc`` is not there (another OS), nothing is found
and the benchmarks say so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

THIS_PROCESS = "bench (clients)"
"""The benchmark's own process: its client threads, on the same cores."""


def role_processes(logs_dir: Path) -> dict[str, int]:
    """The running processes writing to a log in ``logs_dir``, by role (the log's stem)."""
    logs, found = logs_dir.resolve(), {}
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            target = Path(os.readlink(entry / "fd" / "1"))
        except OSError:  # gone, or not ours to read
            continue
        if target.parent == logs and target.suffix == ".log":
            found[target.stem] = int(entry.name)
    return found


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """User plus system CPU seconds of each process (those gone are left out), and of
    this process under :data:`THIS_PROCESS`."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for role, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        seconds[role] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    own = os.times()
    seconds[THIS_PROCESS] = own.user + own.system
    return seconds


def ms_per_request(before: Mapping[str, float], after: Mapping[str, float],
                   requests: int) -> dict[str, float]:
    """Each role's CPU milliseconds per request between two readings."""
    if requests <= 0:
        return {}
    return {role: (after[role] - before[role]) * 1e3 / requests
            for role in after if role in before}


def mean_by_role(blocks: list[dict[str, float]]) -> dict[str, float]:
    """The mean over blocks of each role's ms per request (roles present in every block)."""
    roles = set.intersection(*(set(block) for block in blocks)) if blocks else set()
    return {role: sum(block[role] for block in blocks) / len(blocks) for role in sorted(roles)}


def cpu_table(by_mode: Mapping[str, Mapping[str, float]], first: str, second: str
              ) -> list[str]:
    """Markdown rows: each role's CPU ms per request in two modes and the difference."""
    a, b = by_mode.get(first, {}), by_mode.get(second, {})
    roles = [role for role in a if role in b]
    if not roles:
        return ["(per-process CPU not measured: no /proc on this system)"]
    lines = [f"| process | {first} ms | {second} ms | {second} - {first} ms |",
             "|---|---:|---:|---:|"]
    lines += [f"| {role} | {a[role]:.2f} | {b[role]:.2f} | {b[role] - a[role]:+.2f} |"
              for role in roles]
    total_a, total_b = sum(a[r] for r in roles), sum(b[r] for r in roles)
    lines.append(f"| all | {total_a:.2f} | {total_b:.2f} | **{total_b - total_a:+.2f}** "
                 f"({(total_b - total_a) / total_a:+.1%}) |")
    return lines
