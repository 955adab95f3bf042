"""The operator plane in a process of its own: it starts things and holds nothing secret.

:class:`OperatorProcess` is a :class:`~smlaas.deploy.launchers.Launcher` whose launcher runs
in a child process (``smlaas operator serve``): the local launcher, or the Ray launcher, whose
driver the host's Ray cluster can run code in (Ray unpickles what actors return in the
driver). The child starts with a minimal environment (:func:`minimal_env`: no owner key path,
nothing of the owner's) and is never told a key: everything it handles (process names, command
lines, addresses) is public. The owner's process talks to it in JSON lines over the child's
stdin and stdout, one request and one answer at a time, each answer bounded in size and
waited for with a deadline, and checks every answer's shape: whatever the child runs, the
owner's process only ever parses JSON from it.

``smlaas operator up`` (:func:`operator_up`) is the operator plane on its own, for a cluster
the owner does not run: it starts the coordinator, the workers and the gateway from a sealed
directory and the owner's *public* key; the owner then sets the manifest from its own machine
(``smlaas owner set-manifest``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from smlaas.deploy.launchers import (
    STOP_GRACE_S,
    Launcher,
    LocalLauncher,
    ProcessSpec,
    minimal_env,
)
from smlaas.deploy.topology import ServingLayout
from smlaas.errors import ConfigError, DeployError, InputError, SmlaasError
from smlaas.roles import StageSpec

if TYPE_CHECKING:
    from smlaas.roles import CoordinatorSpec

logger = logging.getLogger(__name__)
CALL_TIMEOUT_S = 150.0
"""Longest wait for one answer (a Ray actor's placement may take two minutes)."""
START_TIMEOUT_S = 60.0
MAX_LINE_BYTES = 1024 * 1024
MAX_PROBLEMS = 64
MAX_PROBLEM_CHARS = 4000
_HOST_NAME = re.compile(r"^[A-Za-z0-9.\-]{1,253}$")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class OperatorProcess:
    """A launcher in a child process (see the module docstring)."""

    name = "operator"

    def __init__(self, kind: str, log_dir: Path, *, host: str = "127.0.0.1",
                 ray_address: str | None = None, placement: str | None = None,
                 command: list[str] | None = None) -> None:
        """``kind``: "local" or "ray"; ``command`` replaces ``python -m smlaas operator
        serve ...`` (tests run a hostile operator through it)."""
        self.kind = kind
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        argv = command or [sys.executable, "-m", "smlaas", "operator", "serve",
                           "--launcher", kind, "--log-dir", str(self.log_dir.resolve()),
                           "--host", host,
                           *(["--ray-address", ray_address] if ray_address else []),
                           *(["--placement", placement] if placement else [])]
        self._log = open(self.log_dir / "operator.log", "ab")  # noqa: SIM115 - closed in stop
        self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, env=minimal_env(engine=True),
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self._answers: queue.Queue[bytes | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stopped = False
        self._broken = ""
        self._sequence = 0
        threading.Thread(target=self._read, daemon=True, name="operator-reader").start()
        self._call("hello", timeout_s=START_TIMEOUT_S)

    @property
    def operator_pid(self) -> int:
        return self._process.pid

    def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None  # PIPE above
        while True:
            line = stdout.readline(MAX_LINE_BYTES + 1)
            if not line or len(line) > MAX_LINE_BYTES:
                self._answers.put(None)
                return
            self._answers.put(line)

    def _call(self, op: str, *, timeout_s: float = CALL_TIMEOUT_S, **fields: Any) -> Any:
        with self._lock:
            if self._broken:
                raise DeployError(f"the operator stopped answering ({self._broken}); see "
                                  f"{self._log.name}")
            if self._process.poll() is not None:
                raise DeployError(f"the operator process exited (code "
                                  f"{self._process.returncode}); see {self._log.name}")
            self._sequence += 1
            stdin = self._process.stdin
            assert stdin is not None  # PIPE above
            try:
                stdin.write(json.dumps({"op": op, "id": self._sequence, **fields}).encode()
                            + b"\n")
                stdin.flush()
            except OSError as err:
                raise DeployError(f"the operator process is gone: {err}") from err
            try:
                line = self._answers.get(timeout=timeout_s)
            except queue.Empty:
                # A late answer would be read as the next call's: no more calls.
                self._broken = f"no answer to {op} within {timeout_s:.0f} s"
                raise DeployError(f"the operator did not answer {op} within "
                                  f"{timeout_s:.0f} s") from None
            if line is None:
                self._answers.put(None)  # every later call sees the end too
                raise DeployError(f"the operator closed its output during {op} (or sent a "
                                  f"line over {MAX_LINE_BYTES} bytes); see {self._log.name}")
        try:
            answer = json.loads(line)
        except ValueError as err:
            raise DeployError(f"the operator's answer to {op} is not JSON: {err}") from err
        if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool) or \
                answer.get("id") != self._sequence:
            raise DeployError(f"the operator's answer to {op} is malformed")
        if not answer["ok"]:
            message = f"the operator could not {op}: {_printable(answer.get('error'))}"
            # The operator's word that the request was bad (a Ray setting, say) is kept as
            # such for the exit code; it changes nothing the owner does.
            raise ConfigError(message) if answer.get("input") is True else DeployError(message)
        return answer.get("result")

    # -- the Launcher protocol, every answer checked ---------------------------------------
    def reserve(self, name: str) -> tuple[str, int]:
        result = self._call("reserve", name=name)
        if not (isinstance(result, list) and len(result) == 2 and isinstance(result[0], str)
                and isinstance(result[1], int) and not isinstance(result[1], bool)
                and 0 < result[1] < 65536 and _is_host(result[0])):
            raise DeployError(f"the operator's address for {name} is malformed")
        return result[0], result[1]

    def start(self, spec: ProcessSpec) -> None:
        self._call("start", name=spec.name, argv=list(spec.argv), env=dict(spec.env),
                   cpus=list(spec.cpus))

    def prepare(self, enclaves: list[tuple[str, int]]) -> None:
        self._call("prepare", enclaves=[[name, cpus] for name, cpus in enclaves])

    def problems(self) -> list[str]:
        if self._process.poll() is not None:
            return [f"the operator process exited (code {self._process.returncode}); see "
                    f"{self._log.name}"]
        result = self._call("problems", timeout_s=30.0)
        if not isinstance(result, list) or not all(isinstance(p, str) for p in result):
            raise DeployError("the operator's problems are malformed")
        return [_printable(problem) for problem in result[:MAX_PROBLEMS]]

    def _counts(self, op: str) -> dict[str, int]:
        result = self._call(op, timeout_s=30.0)
        if not isinstance(result, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in result.values()):
            raise DeployError(f"the operator's {op} are malformed")
        return {str(k): int(v) for k, v in result.items()}

    def restarts(self) -> dict[str, int]:
        return self._counts("restarts")

    def pids(self) -> dict[str, int]:
        """Each process's current pid (local launcher only)."""
        return self._counts("pids")

    def pid(self, name: str) -> int:
        return self.pids()[name]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(SmlaasError):
            if self._process.poll() is None:
                self._call("stop", timeout_s=STOP_GRACE_S + 30.0)
        with contextlib.suppress(OSError):
            if self._process.stdin is not None:
                self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._log.close()


def _printable(value: Any) -> str:
    """The operator's text, bounded, with control characters (terminal escapes) replaced."""
    text = str(value)[:MAX_PROBLEM_CHARS]
    return "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(text))


# -- the child -------------------------------------------------------------------------------
def make_launcher(kind: str, log_dir: Path, *, host: str, ray_address: str | None,
                  placement: str | None = None) -> Launcher:
    """The launcher the operator runs (Ray is imported only here, in the operator)."""
    if kind == "ray":
        from smlaas.deploy.ray_launcher import RayLauncher

        return RayLauncher(log_dir, address=ray_address, placement=placement)
    if kind == "local":
        return LocalLauncher(log_dir, host=host, die_with_parent=True)
    raise ConfigError(f"unknown launcher {kind!r} (local or ray)")


def serve_operator(make: Callable[[], Launcher], requests: IO[bytes],
                   answers: IO[bytes]) -> None:
    """The child's loop: one JSON request per line on ``requests``, one answer per line on
    ``answers``, until ``stop`` or the end of ``requests`` (the owner is gone: stop too).
    The launcher is made on ``hello``, so that a failure to make it is an answer."""
    launcher: Launcher | None = None

    def answer(value: dict[str, Any]) -> None:
        answers.write(json.dumps({**value, "id": request_id}).encode() + b"\n")
        answers.flush()

    request_id: Any = None
    try:
        for line in requests:
            try:
                request = json.loads(line)
                request_id = request.get("id") if isinstance(request, dict) else None
                op = request["op"]
                if op == "hello":
                    launcher = launcher or make()
                    answer({"ok": True, "result": {"pid": os.getpid()}})
                    continue
                if launcher is None:
                    raise ConfigError("say hello first")
                result = _dispatch(launcher, op, request)
                answer({"ok": True, "result": result})
                if op == "stop":
                    launcher = None
                    return
            except (SmlaasError, KeyError, TypeError, ValueError) as err:
                answer({"ok": False, "error": str(err),
                        "input": isinstance(err, InputError)})
    finally:
        if launcher is not None:
            launcher.stop()


def _dispatch(launcher: Launcher, op: str, request: dict[str, Any]) -> Any:
    if op == "reserve":
        return list(launcher.reserve(str(request["name"])))
    if op == "start":
        launcher.start(ProcessSpec(str(request["name"]), [str(a) for a in request["argv"]],
                                   {str(k): str(v) for k, v in dict(request["env"]).items()},
                                   tuple(int(c) for c in request["cpus"])))
        return None
    if op == "prepare":
        launcher.prepare([(str(name), int(cpus)) for name, cpus in request["enclaves"]])
        return None
    if op == "problems":
        return launcher.problems()
    if op == "restarts":
        return launcher.restarts()
    if op == "pids":
        pids = getattr(launcher, "pids", None)
        return pids() if pids is not None else {}
    if op == "stop":
        launcher.stop()
        return None
    raise ConfigError(f"unknown operator request {op!r}")


def run_operator_child(kind: str, log_dir: Path, *, host: str, ray_address: str | None,
                       placement: str | None) -> None:
    """``smlaas operator serve``: the protocol on the original stdout; anything else this
    process (or Ray) prints goes to stderr, the operator's log."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve_operator(lambda: make_launcher(kind, log_dir, host=host, ray_address=ray_address,
                                         placement=placement),
                   sys.stdin.buffer, answers)


def wait_forever(launcher: Launcher, *, poll_s: float = 1.0) -> None:
    """Until Ctrl-C (KeyboardInterrupt) or a process failed for good (DeployError)."""
    while True:
        time.sleep(poll_s)
        problems = launcher.problems()
        if problems:
            raise DeployError("a process failed for good:\n" + "\n".join(problems))


def operator_up(sealed_dir: Path, launcher: Launcher, *, owner_public_key: str,
                layout: ServingLayout, state_dir: Path, replicas: dict[int, int] | None = None,
                max_batch_size: int | None = None, coordinator_mrenclave: str | None = None,
                progress: Callable[[str], None] = lambda _: None) -> CoordinatorSpec:
    """Starts the coordinator (configured with the owner's public key), every stage replica
    and the gateway from the sealed directory's public parts; they register once the owner
    has set the manifest. Returns the coordinator's spec (its address is what the owner
    attests). ``coordinator_mrenclave`` is required for gramine (for sim it is computed)."""
    from smlaas.deploy.topology import pin_plan, prepare_stages, role_specs, stage_replicas
    from smlaas.export.build_dir import read_plan
    from smlaas.export.sealed_build import ServingNote, sealed_directory
    from smlaas.roles import CoordinatorSpec

    sealed = sealed_directory(sealed_dir)
    plan = read_plan(sealed)  # the host's copy: it can only choose what the owner signs over
    counts = stage_replicas(plan, replicas)
    note = ServingNote.of(plan).max_batch_size
    batch = note if max_batch_size is None else min(max_batch_size, note)
    state_dir.mkdir(parents=True, exist_ok=True)
    if layout.backend == "sim":  # made once here, before the processes race to make it
        from smlaas.enclave.backends.sim import default_pki_dir
        from smlaas.enclave.sim_pki import SimulationPKI

        SimulationPKI.load_or_create(default_pki_dir())
    cpus, _ = pin_plan(counts, layout.pin)
    prepare_stages(launcher, replicas=counts, layout=layout, cpus=cpus)
    coordinator = CoordinatorSpec(backend=layout.backend, owner_public_key=owner_public_key,
                                  listen=launcher.reserve("coordinator"),
                                  state_path=str((state_dir / "coordinator.sealed").resolve()))
    if coordinator_mrenclave is None:
        if layout.backend != "sim":
            raise ConfigError("--coordinator-mrenclave is required with this backend (from "
                              "gramine-sgx-sign)")
        coordinator_mrenclave = coordinator.sim_mrenclave()
    launcher.start(ProcessSpec(coordinator.role, coordinator.to_argv()))
    progress(f"coordinator starting on {coordinator.listen[0]}:{coordinator.listen[1]}")
    specs = role_specs(launcher, model_name=plan.model.name, replicas=counts,
                       layout=replace(layout, max_batch_size=batch),
                       coordinator=coordinator.listen, coordinator_mrenclave=coordinator_mrenclave,
                       sealed_dir=sealed, cpus=cpus)
    for spec in specs:
        name = getattr(spec, "process_name", spec.role)
        launcher.start(ProcessSpec(name, spec.to_argv(), cpus=cpus.get(
            (spec.index, spec.replica), ()) if isinstance(spec, StageSpec) else ()))
    progress(f"{sum(counts)} stage worker(s) and the gateway starting; they register once the "
             f"owner sets the manifest")
    return coordinator
