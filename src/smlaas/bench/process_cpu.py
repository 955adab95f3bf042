"""The CPU time a local deployment's processes spend, read from ``/proc`` (Linux).

A benchmark that compares two modes side by side reads each role's CPU seconds before and
after a block and divides by the requests completed in between: in a CPU-bound run every
millisecond a role spends per request comes off the throughput, and this figure moves far
less than the throughput itself on a VM whose speed drifts by several percent within minutes.
A role's process is the one whose standard output is its log in the local launcher's log
directory (``<state>/logs/<role>.log``); the directory is searched at every reading, so a
role the launcher restarted is followed to its new process, and a role whose process changed
between two readings is left out of that block. Where ``/proc`` is not there (another OS),
nothing is found and the tables say so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

THIS_PROCESS = "bench (clients)"
"""The benchmark's own process: its client threads, on the same cores."""


@dataclass(frozen=True)
class Reading:
    """One process's CPU seconds (user plus system) at one moment."""

    pid: int
    started: int
    """Its start time (clock ticks after boot): a reused pid is another process."""
    seconds: float


def read_cpu(logs_dir: Path) -> dict[str, Reading]:
    """Every running process writing to a log in ``logs_dir``, by role (the log's stem; of
    two writing to the same log, the later started), and this process
    (:data:`THIS_PROCESS`)."""
    own = os.times()
    readings = {THIS_PROCESS: Reading(os.getpid(), 0, own.user + own.system)}
    proc, logs = Path("/proc"), logs_dir.resolve()
    if not proc.is_dir():
        return readings
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            target = Path(os.readlink(entry / "fd" / "1"))
            if target.parent != logs or target.suffix != ".log":
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone, or not ours to read
            continue
        # after the command name: utime, stime and starttime are fields 14, 15 and 22
        reading = Reading(int(entry.name), int(fields[19]),
                          (int(fields[11]) + int(fields[12])) / ticks)
        earlier = readings.get(target.stem)
        if earlier is None or earlier.started <= reading.started:
            readings[target.stem] = reading
    return readings


def ms_per_request(before: Mapping[str, Reading], after: Mapping[str, Reading],
                   requests: int) -> dict[str, float]:
    """Each role's CPU milliseconds per request between two readings (a role whose process
    changed in between is left out); empty when no request completed."""
    if requests <= 0:
        return {}
    return {role: (reading.seconds - before[role].seconds) * 1e3 / requests
            for role, reading in after.items()
            if role in before and (before[role].pid, before[role].started) ==
            (reading.pid, reading.started)}


def mean_by_role(blocks: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean over the measured blocks (empty ones skipped) of each role's ms per request,
    for the roles present in all of them."""
    measured = [block for block in blocks if block]
    if not measured:
        return {}
    roles = set.intersection(*(set(block) for block in measured))
    return {role: sum(block[role] for block in measured) / len(measured)
            for role in sorted(roles)}


def cpu_table(by_mode: Mapping[str, Mapping[str, float]], first: str, second: str
              ) -> list[str]:
    """Markdown rows: each role's CPU ms per request in two modes and the difference."""
    a, b = by_mode.get(first, {}), by_mode.get(second, {})
    roles = [role for role in a if role in b]
    if not roles:
        return ["(per-process CPU not measured: no /proc here, or no block completed a "
                "request)"]
    lines = [f"| process | {first} ms | {second} ms | {second} - {first} ms |",
             "|---|---:|---:|---:|"]
    lines += [f"| {role} | {a[role]:.2f} | {b[role]:.2f} | {b[role] - a[role]:+.2f} |"
              for role in roles]
    total_a, total_b = sum(a[r] for r in roles), sum(b[r] for r in roles)
    share = f" ({(total_b - total_a) / total_a:+.1%})" if total_a > 0 else ""
    lines.append(f"| all | {total_a:.2f} | {total_b:.2f} | **{total_b - total_a:+.2f}**"
                 f"{share} |")
    return lines
