"""Every role of a sim deployment run natively *as its Gramine manifest runs it*, recording what
each opens.

The launcher (:class:`AuditLauncher`, a :class:`~smlaas.deploy.launchers.Launcher` the
:class:`~smlaas.deploy.deployment.Deployment` drives) starts each role with the manifest's
``loader.argv``: the same ``argv[0]`` (a venv's interpreter path), the same interpreter flags,
``-m smlaas`` and the measured arguments, the backend name aside (``sim`` stands in for
``gramine``); and with the manifest's environment only: its fixed ``loader.env`` values (the
mount paths turned into the host directories they map) and the host options the deployment
chose, each of which must be a passthrough variable of the manifest. Nothing else of this
process's environment reaches the role but ``SMLAAS_CACHE_DIR``, where the sim backend keeps
its simulation PKI (the stand-in for ``/dev/attestation``).

Before anything else runs in the role, :data:`BOOTSTRAP` installs a ``sys.addaudithook`` hook
that records every ``open`` (read or write), ``os.listdir``/``os.scandir`` and
``ctypes.dlopen`` event; it starts Python with ``-S`` and runs ``site.main()`` itself after the
hook is in place, so that ``site``'s own reads (``pyvenv.cfg``, ``.pth`` files) are seen too.
What the hook cannot see (C code opening files: the dynamic loader, OpenSSL, glibc) is read
from ``/proc/PID/maps`` (every mapped file: the interpreter, libpython, extension modules and
their libraries) and, where ``strace`` exists, from the open system calls it traces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from smlaas.coordinator.server import free_port
from smlaas.deploy.gramine_files import LIBOS_STANDIN, RUNTIME_STANDIN, Opened
from smlaas.deploy.gramine_sizes import RoleFootprint
from smlaas.deploy.launchers import ProcessSpec
from smlaas.roles import CoordinatorSpec, GatewaySpec, StageSpec, host_envvar

STOP_TIMEOUT_S = 20.0
BOOTSTRAP = r'''
import os, sys
_log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
_seen = set()
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _record(kind, path):
    if (kind, path) not in _seen:
        _seen.add((kind, path))
        os.write(_log, (kind + "\t" + path + "\n").encode("utf-8", "surrogateescape"))

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        write = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool(isinstance(flags, int) and flags & _WRITE)
        _record("write" if write else "read", os.path.abspath(os.fsdecode(path)))
    elif event in ("os.listdir", "os.scandir"):
        if args and not isinstance(args[0], int):
            _record("list", os.path.abspath(os.fsdecode(args[0] if args[0] is not None
                                                        else ".")))
    elif event == "ctypes.dlopen" and args and args[0]:
        _record("dlopen", os.fsdecode(args[0]))

sys.addaudithook(_hook)
for _module in list(sys.modules.values()):
    if getattr(_module, "__file__", None):
        _record("read", _module.__file__)
import site
site.main()  # what -S held back, now under the hook
del sys.argv[1]
sys.argv[0] = "smlaas"
import runpy
runpy.run_module("smlaas", run_name="__main__", alter_sys=True)
'''
_COMMANDS = {"coordinator": CoordinatorSpec, "worker": StageSpec, "gateway": GatewaySpec}
_TRACE = re.compile(r'^\d+\s+open(?:at2?)?\((?:(?:AT_FDCWD|\d+)<([^>]*)>, )?"([^"]+)", '
                    r'([A-Z_|]+)')
"""An ``open``/``openat`` line of ``strace -y``: (the directory a relative path is in: the
dirfd's or the working directory, the path, the flags)."""


@dataclass(frozen=True)
class Manifest:
    """What the launcher takes from a rendered manifest template."""

    role: str
    argv: list[str]
    fixed_env: dict[str, str]
    passthrough: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Manifest:
        data = tomllib.loads(text.replace("{{ gramine.libos }}", LIBOS_STANDIN)
                            .replace("{{ gramine.runtimedir() }}", RUNTIME_STANDIN))
        env = data["loader"]["env"]
        return cls(role=env["SMLAAS_ROLE"], argv=data["loader"]["argv"],
                   fixed_env={k: v for k, v in env.items() if isinstance(v, str)},
                   passthrough=frozenset(k for k, v in env.items()
                                         if v == {"passthrough": True}))

    @property
    def interpreter_flags(self) -> list[str]:
        return self.argv[1:self.argv.index("-m")]

    @property
    def measured_argv(self) -> list[str]:
        return self.argv[self.argv.index("-m") + 2:]


@dataclass
class RoleRun:
    """One role's process: how it was started and what it left."""

    name: str
    role: str
    record: Path
    process: subprocess.Popen[bytes]
    trace: Path | None
    maps: str = ""
    footprint: RoleFootprint | None = None
    log: Path = field(default_factory=Path)
    cwd: Path = field(default_factory=Path)
    """Its working directory (empty: a relative path it opens shows as one)."""

    def opened(self) -> list[Opened]:
        """Every file the role opened (existing ones, or written), mapped or listed."""
        found: list[Opened] = []
        for line in self.record.read_text(errors="surrogateescape").splitlines():
            kind, _, path = line.partition("\t")
            if kind == "list":
                if os.path.isdir(path):
                    found.append(Opened(path, directory=True, how="list"))
            elif kind == "write" or os.path.exists(path):
                found.append(Opened(path, write=kind == "write",
                                    directory=os.path.isdir(path), how=kind))
        for line in self.maps.splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith(
                    "(deleted)"):
                found.append(Opened(parts[5], how="map"))
        if self.trace is not None and self.trace.exists():
            for line in self.trace.read_text(errors="replace").splitlines():
                match = _TRACE.match(line)
                if match and "= -1 " not in line:
                    directory, path, flags = match.groups()
                    path = os.path.join(directory or str(self.cwd), path)
                    write = any(f in flags for f in ("O_WRONLY", "O_RDWR", "O_CREAT"))
                    found.append(Opened(path, write=write, directory="O_DIRECTORY" in flags
                                        or os.path.isdir(path), how="native"))
        return found


class AuditLauncher:
    """Starts every role as its manifest would (module docstring), under the audit hook."""

    name = "local"

    def __init__(self, manifests: dict[str, Manifest], out_dir: Path, *,
                 mount_hosts: dict[str, str], cache_dir: Path, strace: bool) -> None:
        self.manifests, self.out_dir = manifests, out_dir
        self.mount_hosts = mount_hosts
        """Enclave mount path -> the host directory it maps (for fixed env values)."""
        self.cache_dir = cache_dir
        self.strace = strace and strace_works()
        self.runs: dict[str, RoleRun] = {}
        out_dir.mkdir(parents=True, exist_ok=True)

    # -- the Launcher protocol -------------------------------------------------------------
    def reserve(self, name: str) -> tuple[str, int]:
        return "127.0.0.1", free_port()

    def prepare(self, enclaves: list[tuple[str, int]]) -> None:
        pass

    def start(self, spec: ProcessSpec) -> None:
        measured, host_env = split_argv(spec.argv)
        role = measured[measured.index("--role") + 1] if "--role" in measured else measured[0]
        manifest = self.manifests[role]
        expected = [("sim" if a == "gramine" else a) for a in manifest.measured_argv]
        assert measured == expected, (role, measured, expected)
        unpassed = set(host_env) - manifest.passthrough - set(manifest.fixed_env)
        assert not unpassed, f"{role}: the deployment sets {unpassed}, the manifest drops them"
        env = {name: self._host_value(value) for name, value in manifest.fixed_env.items()}
        env.update({k: v for k, v in host_env.items() if k not in manifest.fixed_env})
        env["SMLAAS_CACHE_DIR"] = str(self.cache_dir)  # the sim PKI: the stand-in's
        record = self.out_dir / f"{spec.name}.files"
        trace = self.out_dir / f"{spec.name}.strace" if self.strace else None
        command = [manifest.argv[0], *manifest.interpreter_flags, "-S", "-c", BOOTSTRAP,
                   str(record), *measured]
        if trace is not None:
            command = ["strace", *STRACE_OPTIONS, "-e", "trace=open,openat,openat2",
                       "-e", "signal=none", "-o", str(trace), *command]
        log, cwd = self.out_dir / f"{spec.name}.log", self.out_dir.parent / f"cwd-{spec.name}"
        cwd.mkdir(exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       cwd=cwd, preexec_fn=_die_with_parent)
        self.runs[spec.name] = RoleRun(spec.name, role, record, process, trace, log=log,
                                       cwd=cwd)

    def problems(self) -> list[str]:
        return [f"{run.name} exited with {run.process.returncode}:\n"
                f"{run.log.read_text(errors='replace')[-3000:]}"
                for run in self.runs.values() if run.process.poll() is not None]

    def restarts(self) -> dict[str, int]:
        return {}

    def pids(self) -> dict[str, int]:
        return {name: self.role_pid(run) for name, run in self.runs.items()}

    def stop(self) -> None:
        for run in self.runs.values():  # the role itself: strace then exits with it
            if run.process.poll() is None:
                try:
                    os.kill(self.role_pid(run), signal.SIGTERM)
                except (ProcessLookupError, AssertionError):
                    run.process.send_signal(signal.SIGTERM)
        for run in self.runs.values():
            try:
                run.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait(timeout=10)

    # -- reading the roles ---------------------------------------------------------------
    def snapshot(self) -> None:
        """Each role's mappings and footprint, while it runs (after the inferences)."""
        for run in self.runs.values():
            pid = self.role_pid(run)
            run.maps = Path(f"/proc/{pid}/maps").read_text()
            ort_threads = 1 if run.role.startswith("stage-") else 0
            run.footprint = RoleFootprint.of_process(pid, run.role, ort_threads=ort_threads)

    @staticmethod
    def role_pid(run: RoleRun) -> int:
        """The Python process's pid (under strace, strace's only child)."""
        if run.trace is None:
            return run.process.pid
        children = Path(f"/proc/{run.process.pid}/task/{run.process.pid}/children")
        for _ in range(100):
            found = children.read_text().split()
            if found:
                return int(found[0])
            time.sleep(0.05)
        raise AssertionError(f"{run.name}: strace started no child")

    def _host_value(self, value: str) -> str:
        for inside, outside in self.mount_hosts.items():
            if value == inside or value.startswith(inside + "/"):
                return outside + value[len(inside):]
        return value


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """A deployment's ``to_argv()`` back into the measured arguments and the host options as
    the environment variables a manifest passes them by."""
    flags = {option.flag for option in _COMMANDS[argv[0]].HOST_OPTIONS}
    measured: list[str] = []
    env: dict[str, str] = {}
    index = 0
    while index < len(argv):
        if argv[index] in flags:
            env[host_envvar(argv[index])] = argv[index + 1]
            index += 2
        else:
            measured.append(argv[index])
            index += 1
    return measured, env


STRACE_OPTIONS = ("-f", "-qq", "-y", "--seccomp-bpf")


def strace_works() -> bool:
    """Whether strace is installed and may trace here (ptrace can be forbidden)."""
    if shutil.which("strace") is None:
        return False
    done = subprocess.run(["strace", *STRACE_OPTIONS, "-e", "trace=openat", "-o", os.devnull,
                           "true"], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """SIGKILL when the test process dies (under strace this covers strace; :meth:`stop`
    ends the roles on every other way out)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
