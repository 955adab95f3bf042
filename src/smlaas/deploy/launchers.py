"""Launchers start and restart the deployment's processes; they never carry tensors.

``local`` runs them on this machine; ``ray`` (in :mod:`smlaas.deploy.ray_launcher`) places one
actor per process on nodes with an ``sgx`` resource. Both restart a process that dies (up to
``max_restarts`` times) with the same command, so a worker comes back on the same address and
registers again with the coordinator.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from smlaas.coordinator.server import free_port

logger = logging.getLogger(__name__)
STOP_GRACE_S = 5.0
POLL_S = 0.1
EXIT_BAD_INPUT = 2
"""``smlaas``'s exit code for unusable input (cli/main.py): the same command would fail again,
so such a process is not restarted."""
PASSED_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
              "PYTHONPATH", "VIRTUAL_ENV", "SMLAAS_CACHE_DIR", "XDG_CACHE_HOME",
              "SMLAAS_PCCS_URL", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
              "COVERAGE_PROCESS_START")
"""The variables a launched process inherits: what Python, ONNX Runtime and the smlaas cache
need, and nothing else (no owner key path, no credentials of whoever started it)."""
ENGINE_ENV_PREFIXES = ("RAY_",)
"""The host's own engine settings (Ray's address, auth mode and token): the operator's, given
to the operator process only, never to the roles it starts."""


def minimal_env(extra: dict[str, str] | None = None, *, engine: bool = False
                ) -> dict[str, str]:
    """This process's environment cut down to PASSED_ENV (and, with ``engine``, the
    ENGINE_ENV_PREFIXES variables), plus ``extra``."""
    kept = {name: value for name, value in os.environ.items()
            if name in PASSED_ENV or (engine and name.startswith(ENGINE_ENV_PREFIXES))}
    return {**kept, **(extra or {})}


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: list[str]
    """Arguments after ``python -m smlaas``."""
    env: dict[str, str] = field(default_factory=dict)
    cpus: tuple[int, ...] = ()
    """Cores the process (and every thread it starts) may run on; () = any."""


class Launcher(Protocol):
    name: str

    def reserve(self, name: str) -> tuple[str, int]:
        """The host and a free port the process ``name`` will listen on."""
        ...

    def start(self, spec: ProcessSpec) -> None: ...

    def prepare(self, enclaves: list[tuple[str, int]]) -> None:
        """Told, before any reserve, the stage processes to come and the cores each uses (a
        placement-aware launcher books them at once)."""
        ...

    def problems(self) -> list[str]:
        """Processes that exited for good, each with the end of its log."""
        ...

    def restarts(self) -> dict[str, int]: ...

    def stop(self) -> None: ...


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """The child gets SIGKILL when the process that started it dies (Linux prctl)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Supervised:
    def __init__(self, spec: ProcessSpec, log_path: Path, *,
                 die_with_parent: bool = False) -> None:
        self.spec, self.log_path = spec, log_path
        self.die_with_parent = die_with_parent
        self.env = minimal_env(spec.env)  # a restart runs exactly as the first start
        self.restarts = 0
        self.gave_up: str | None = None
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            process = subprocess.Popen([sys.executable, "-m", "smlaas", *self.spec.argv],
                                       stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=self.env,
                                       start_new_session=True,
                                       preexec_fn=_die_with_parent if self.die_with_parent
                                       else None)
        finally:
            log.close()
        if self.spec.cpus:  # before it starts any thread (imports take far longer)
            try:
                os.sched_setaffinity(process.pid, self.spec.cpus)
            except OSError as err:
                logger.warning("cannot pin %s to cores %s: %s", self.spec.name,
                               self.spec.cpus, err)
        return process

    def respawn(self) -> None:
        self.restarts += 1
        self.process = self._spawn()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class LocalLauncher:
    """Processes on this machine, supervised by a thread; logs under ``log_dir``."""

    name = "local"

    def __init__(self, log_dir: Path, *, host: str = "127.0.0.1", max_restarts: int = 5,
                 die_with_parent: bool = False) -> None:
        self.die_with_parent = die_with_parent
        """Children die with this process (for a Ray actor, which Ray may restart)."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.max_restarts = host, max_restarts
        self._processes: dict[str, _Supervised] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True,
                                        name="smlaas-launcher")
        self._thread.start()

    def reserve(self, name: str) -> tuple[str, int]:
        return self.host, free_port()

    def start(self, spec: ProcessSpec) -> None:
        with self._lock:
            self._processes[spec.name] = _Supervised(spec, self.log_dir / f"{spec.name}.log",
                                                     die_with_parent=self.die_with_parent)
        logger.info("started %s (pid %d)", spec.name, self._processes[spec.name].process.pid)

    def prepare(self, enclaves: list[tuple[str, int]]) -> None:
        """Nothing to book on one machine (``--pin`` is the deployment's)."""

    def pid(self, name: str) -> int:
        return self._processes[name].process.pid

    def problems(self) -> list[str]:
        with self._lock:
            return [f"{p.spec.name} {p.gave_up}; its log ({p.log_path}) ends with:\n"
                    f"{p.log_tail()}" for p in self._processes.values() if p.gave_up]

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return {name: p.restarts for name, p in self._processes.items()}

    def stop_process(self, name: str) -> ProcessSpec:
        """Stops supervising ``name`` and stops it (SIGTERM, then SIGKILL); returns its spec,
        which :meth:`start` takes to run it again."""
        with self._lock:
            supervised = self._processes.pop(name)
        if supervised.process.poll() is None:
            supervised.process.send_signal(signal.SIGTERM)
            try:
                supervised.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                supervised.process.kill()
                supervised.process.wait(timeout=5)
        return supervised.spec

    def pids(self) -> dict[str, int]:
        """Each process's current pid (a restarted one has a new pid)."""
        with self._lock:
            return {name: p.process.pid for name, p in self._processes.items()}

    def _supervise(self) -> None:
        while not self._stopping.wait(POLL_S):
            with self._lock:
                for supervised in self._processes.values():
                    code = supervised.process.poll()
                    if code is None or supervised.gave_up or self._stopping.is_set():
                        continue
                    if code == EXIT_BAD_INPUT:
                        supervised.gave_up = (f"exited with code {code} (its input or "
                                              f"configuration is unusable: not restarted)")
                        logger.error("%s %s", supervised.spec.name, supervised.gave_up)
                        continue
                    if supervised.restarts >= self.max_restarts:
                        supervised.gave_up = (f"exited with code {code} after "
                                              f"{supervised.restarts} restarts")
                        logger.error("%s %s", supervised.spec.name, supervised.gave_up)
                        continue
                    logger.warning("%s exited with code %d; restarting it",
                                   supervised.spec.name, code)
                    supervised.respawn()

    def stop(self) -> None:
        """SIGTERM to every process (gateway first), SIGKILL after STOP_GRACE_S."""
        self._stopping.set()
        self._thread.join(timeout=2)
        with self._lock:
            processes = list(reversed(self._processes.values()))
        for supervised in processes:
            if supervised.process.poll() is None:
                supervised.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE_S
        for supervised in processes:
            try:
                supervised.process.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it",
                               supervised.spec.name, STOP_GRACE_S)
                supervised.process.kill()
                supervised.process.wait(timeout=5)
