"""A stage's working set measured natively: the pages its process touches per inference.

An enclave must keep resident in the EPC every page its inferences touch; pages the process
mapped once and never touches again (ONNX Runtime keeps the loaded initializers beside the
pre-packed copies it computes with) cost nothing after start-up. Linux counts exactly the
touched pages: writing ``1`` to ``/proc/PID/clear_refs`` clears the referenced bit of every
page of PID, and ``Referenced:`` in ``/proc/PID/smaps_rollup`` (or summed over
``/proc/PID/smaps`` on kernels before 4.14) is then the bytes of the pages referenced since.

:func:`measure_working_set` runs one stage the way a worker does (see NOTE_AS_A_WORKER) in a
child process, warms it up, clears the child's referenced bits from this process, lets the
child run a few inferences on the stage's own inputs, and reads the count. The child only
waits between the steps, so the count holds the inferences and the few pages the child's
reading of the next command touches. This is done in a few rounds and the least count is
kept (see NOTE_SHARED_PAGES).

NOTE_SHARED_PAGES: the kernel counts a page as referenced if the process's own page-table
entry is young *or* the page itself is marked referenced, and the latter is shared by every
process that maps the page (the interpreter's and ONNX Runtime's code). Another process
starting Python nearby marks such pages, and one count in ten or so on this machine came out
2 to 10 MiB high (a ResNet-18 stage: 14.6 MiB, once 24.5 MiB; the excess in libpython and
libc). Such noise only ever adds pages, so the least of several rounds is the measurement.

NOTE_AS_A_WORKER: the child opens the stage exactly as ``smlaas worker`` does (its sub-model
with a symbolic batch dimension, :func:`smlaas.runtime.stage_runner.relax_batch_dim`, in a
:class:`~smlaas.runtime.stage_runner.StageRunner` with ``serving=True``: the worker's session
options and thread count) in a fresh interpreter. What it does not do is the worker's own
I/O: TLS, framing and the asyncio loop touch pages of their own per request (in the real
worker a few MiB at most), so the figure is the stage's own working set, a lower bound of the
worker's. The child disables transparent huge pages for itself, so pages are counted at
4 KiB, the EPC's page size, where a touched byte of a huge page would count 2 MiB.

Where ``/proc`` lacks these files (another OS, a restricted container), or ``clear_refs`` is
not writable, the result says so and holds no figure; the caller keeps the prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from smlaas.errors import ProfileError
from smlaas.plan.plan import MeasuredMemory

WARMUP_RUNS = 3
"""Runs before the count starts: the first allocates ONNX Runtime's arena and pre-packs."""
MEASURED_INFERENCES = 3
"""Inferences counted per round; every one touches the same pages, so a few suffice."""
ROUNDS = 3
"""Counts taken one after another in the same process; the least is kept
(NOTE_SHARED_PAGES)."""
TIMEOUT_S = 300.0
"""Deadline of one stage's whole measurement (start-up, warm-up, inferences)."""

_EVENT_PREFIX = "smlaas-working-set "
_PR_SET_THP_DISABLE = 41  # linux/prctl.h


@dataclass(frozen=True)
class WorkingSetResult:
    """One stage's measurement: ``measured`` or, where this OS cannot count touched pages,
    None and the reason."""

    measured: MeasuredMemory | None
    unavailable_reason: str | None = None


def unavailable_reason(proc: Path = Path("/proc")) -> str | None:
    """Why touched pages cannot be counted on this machine (None: they can)."""
    self_dir = proc / "self"
    if not (self_dir / "clear_refs").exists():
        return (f"not available on this OS: {self_dir / 'clear_refs'} does not exist (Linux "
                f"counts a process's touched pages; this is {sys.platform})")
    if not (self_dir / "smaps_rollup").exists() and not (self_dir / "smaps").exists():
        return f"not available on this OS: no {self_dir / 'smaps_rollup'} or smaps"
    return None


def measure_working_set(model_path: str | Path, feeds: Mapping[str, np.ndarray], *,
                        threads: int, warmup_runs: int = WARMUP_RUNS,
                        inferences: int = MEASURED_INFERENCES, rounds: int = ROUNDS,
                        timeout_s: float = TIMEOUT_S, label: str = "stage"
                        ) -> WorkingSetResult:
    """Measures the working set of the stage in ``model_path`` run on ``feeds`` (see the
    module docstring).

    Raises:
        ProfileError: the child failed to open or run the stage, or missed ``timeout_s``.
        ValueError: ``inferences`` or ``rounds`` is below 1.
    """
    if inferences < 1 or rounds < 1:
        raise ValueError(f"inferences and rounds must be at least 1, got {inferences} and "
                         f"{rounds}")
    reason = unavailable_reason()
    if reason is not None:
        return WorkingSetResult(None, reason)
    with tempfile.TemporaryDirectory(prefix="smlaas-working-set-") as tmp:
        feeds_path = Path(tmp) / "feeds.pickle"
        with feeds_path.open("wb") as stream:
            pickle.dump(dict(feeds), stream, protocol=pickle.HIGHEST_PROTOCOL)
        child = _Child([sys.executable, "-m", __name__, "--model", str(model_path),
                        "--feeds", str(feeds_path), "--threads", str(threads),
                        "--warmup-runs", str(warmup_runs)],
                       deadline=time.monotonic() + timeout_s, label=label,
                       stderr_path=Path(tmp) / "stderr.txt")
        with child:
            child.expect("ready")
            counts = []
            for _ in range(rounds):
                child.wait_until_idle()
                try:
                    (Path("/proc") / str(child.pid) / "clear_refs").write_text("1")
                except OSError as err:
                    return WorkingSetResult(None, f"not available here: cannot write "
                                                  f"/proc/{child.pid}/clear_refs "
                                                  f"({err.strerror})")
                child.send(f"run {inferences}")
                child.expect("done")
                counts.append(_read_counts(child.pid))
            peak = _peak_rss_bytes(child.pid)
            child.send("exit")
    referenced, rss, method = min(counts)
    return WorkingSetResult(MeasuredMemory(
        working_set_bytes=referenced, rss_bytes=rss, peak_rss_bytes=max(peak, rss),
        inferences=inferences, threads=threads, method=method, rounds=rounds))


def _read_counts(pid: int) -> tuple[int, int, str]:
    """(Referenced bytes, Rss bytes, method) of ``pid``."""
    rollup = Path("/proc") / str(pid) / "smaps_rollup"
    if rollup.exists():
        fields = _kib_fields(rollup.read_text())
        return fields["Referenced"], fields["Rss"], "smaps_rollup Referenced"
    totals = _kib_fields((Path("/proc") / str(pid) / "smaps").read_text())
    return totals["Referenced"], totals["Rss"], "smaps Referenced (summed)"


def _kib_fields(text: str) -> dict[str, int]:
    """Sums of the ``Name:  N kB`` lines of an smaps file, in bytes."""
    totals = {"Referenced": 0, "Rss": 0}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and name in totals and len(parts) == 2 and parts[1] == "kB":
            totals[name] += int(parts[0]) * 1024
    return totals


def _peak_rss_bytes(pid: int) -> int:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class _Child:
    """The measured process: started, told what to do line by line, each answer awaited
    until one deadline; killed if still alive on exit."""

    def __init__(self, argv: list[str], *, deadline: float, label: str,
                 stderr_path: Path) -> None:
        self.deadline, self.label = deadline, label
        self._stderr_path = stderr_path
        self._stderr: IO[bytes] = stderr_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self._stderr, env=env)
        if self.process.stdin is None or self.process.stdout is None:
            raise ProfileError("the working-set child has no pipes")
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout
        self.pid = self.process.pid
        self._buffer = b""

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(timeout=max(1.0, min(10.0, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10.0)
        self._stdout.close()
        self._stderr.close()

    def wait_until_idle(self, *, checks: int = 3, interval_s: float = 0.005) -> None:
        """Returns once the child has slept ``checks`` times in a row (blocked reading its
        next command), so that its way there is not counted as the stage's."""
        asleep, stat = 0, Path("/proc") / str(self.pid) / "stat"
        while asleep < checks and time.monotonic() < self.deadline:
            try:
                # The state follows the command name, which is in parentheses.
                state = stat.read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                return
            asleep = asleep + 1 if state == "S" else 0
            time.sleep(interval_s)

    def send(self, command: str) -> None:
        try:
            self._stdin.write(command.encode() + b"\n")
            self._stdin.flush()
        except BrokenPipeError:
            self._fail("exited before it was told to")

    def expect(self, event: str) -> dict[str, Any]:
        """Waits for the child's next event; it must be ``event``."""
        message = self._next_event()
        if message.get("event") == "error":
            self._fail(f"failed: {message.get('message', '?')}")
        if message.get("event") != event:
            self._fail(f"said {message!r}, expected {event!r}")
        return message

    def _next_event(self) -> dict[str, Any]:
        with selectors.DefaultSelector() as selector:
            selector.register(self._stdout, selectors.EVENT_READ)
            while True:
                line, newline, rest = self._buffer.partition(b"\n")
                if newline:
                    self._buffer = rest
                    text = line.decode(errors="replace")
                    if text.startswith(_EVENT_PREFIX):
                        return dict(json.loads(text.removeprefix(_EVENT_PREFIX)))
                    continue  # anything else a library printed
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self.process.kill()
                    raise ProfileError(f"measuring the working set of {self.label} missed its "
                                       f"deadline; skip it with --no-measure-memory")
                if not selector.select(timeout=remaining):
                    continue
                chunk = os.read(self._stdout.fileno(), 1 << 16)
                if not chunk:
                    self._fail("exited")
                self._buffer += chunk

    def _fail(self, what: str) -> None:
        self.process.kill()
        self.process.wait(timeout=10.0)
        self._stderr.flush()
        tail = self._stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise ProfileError(f"measuring the working set of {self.label}: the child process "
                           f"{what} (exit code {self.process.returncode})"
                           + (": " + " | ".join(tail) if tail else ""))


# -- the child -----------------------------------------------------------------------------
def _say(event: str, **fields: Any) -> None:
    sys.stdout.write(_EVENT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _disable_huge_pages() -> None:
    """Counts pages at 4 KiB, as the EPC holds them (best effort: Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="smlaas: one stage run as a worker runs it, "
                                                 "for a working-set measurement")
    parser.add_argument("--model", required=True)
    parser.add_argument("--feeds", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup-runs", type=int, default=WARMUP_RUNS)
    args = parser.parse_args(argv)
    _disable_huge_pages()
    try:
        import onnx

        from smlaas.runtime.stage_runner import StageRunner, relax_batch_dim

        # As smlaas.serving.worker_process.load_stage opens a released stage.
        model = onnx.load(args.model)
        runner = StageRunner(relax_batch_dim(model), threads=args.threads,
                             label="measured stage", serving=True)
        with open(args.feeds, "rb") as stream:
            feeds = pickle.load(stream)  # noqa: S301 - written by our parent, in its tmp dir
        for _ in range(args.warmup_runs):
            runner.run(feeds)
    except Exception as err:  # reported to the parent, which raises ProfileError
        _say("error", message=f"{type(err).__name__}: {err}".splitlines()[0])
        return 1
    _say("ready")
    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["run"]:
            try:
                for _ in range(int(command[1])):
                    runner.run(feeds)
            except Exception as err:
                _say("error", message=f"{type(err).__name__}: {err}".splitlines()[0])
                return 1
            _say("done")
        elif command[:1] == ["exit"]:
            break
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
