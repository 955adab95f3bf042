"""Enclave sizes from measurements: ``sgx.enclave_size``, ``sgx.max_threads`` and the
Kubernetes ``sgx.intel.com/epc`` request of every role.

A role's :class:`RoleFootprint` is what its process used natively, read from
``/proc/PID/status`` after start-up, registration and a few inferences (``smlaas gramine
measure``, or the check of ``tests/component/test_gramine_manifest_files.py``): its peak
virtual size (``VmPeak``), peak resident size (``VmHWM``) and threads.

Note "enclave size". Without EDMM (``sgx.edmm_enable = false``, the only mode of SGX1 and
what smlaas's manifests set) Gramine reserves ``sgx.enclave_size`` of address space and commits
every page of it at start (Gramine's manifest syntax, "Enclave size"); the process can map
nothing beyond it, code and libraries included. So the size must hold the role's whole
virtual size, not only its working set:

    enclave_size = max(MIN_ENCLAVE_MIB, next power of two
                       >= VIRTUAL_HEADROOM * virtual + GRAMINE_RUNTIME_MIB)

where ``virtual`` is the role's measured ``VmPeak`` when a footprint of this very build is
given (a stage's then includes its model), and otherwise the baseline role's ``VmPeak``
(:data:`BASELINE`, measured here with a stage whose model is a few KiB) plus, for a stage,
:data:`MODEL_VIRTUAL_FACTOR` times its working set (``plan.stages[k].measured`` when the
partition measured it, else the cost model's prediction); for the gateway plus its bounded
queue (``max_queue`` requests of stage 0's input and the last stage's output). SGX needs a
power of two (the enclave's address range is naturally aligned). The measured working set
still decides whether the stage runs without paging (``--fit-epc``); the enclave size only
has to be large enough.

Note "threads". ``sgx.max_threads`` is the role's measured thread count, plus Gramine's own
helper threads (:data:`GRAMINE_HELPER_THREADS`), plus, for a stage, ONNX Runtime's further
intra-op threads up to the most the manifest allows (``--threads`` is the host's choice), plus
:data:`THREAD_HEADROOM` for pools that grow with load or with the host's cores and that a
quiet measurement on a small machine does not see. A role that needs more fails to start a
thread (fails closed), it does not run differently.

Note "EPC request". The Intel SGX device plugin registers each node's EPC as the extended
resource ``sgx.intel.com/epc`` (a memory-typed quantity, registered through NFD) and pods
request it; the scheduler places a pod only where the requests of the pods on a node fit the
node's EPC. Nothing enforces it yet (the plugin's RFC #1567 to turn it into the EPC cgroup's
``misc.max``). The pages an enclave takes are the ones it commits: with EDMM off, all of
``sgx.enclave_size`` at start. So each role requests its enclave size: a request of the
working set only would let the scheduler put more enclaves on a node than its EPC holds
committed, which the kernel then pages. An SGX1 node (about 94 MiB of EPC) thus never fits a
1 GiB enclave by this accounting: such nodes need EDMM (SGX2, Linux 6.0+), where committed
pages follow use and the request could be the measured resident size (not done here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_role
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.errors import ConfigError
from smlaas.plan.plan import Plan, StagePlan

if TYPE_CHECKING:
    from smlaas.deploy.settings import DeploySettings

MIB = 1024 * 1024
MIN_ENCLAVE_MIB = 256
GRAMINE_RUNTIME_MIB = 128
"""[ASSUMED] Gramine's PAL and LibOS code and data, its internal heap (the trusted-file
table, handles) and the manifest, inside the enclave size (Gramine's manifest syntax: "The
PAL and library OS code/data count towards this size value"). Not measurable without
Gramine; measure with ``sgx.enable_stats`` on hardware and adjust."""
GRAMINE_HELPER_THREADS = 3
"""Gramine's IPC, async and TLS-handshake threads (manifest syntax, "Number of threads":
``sgx.max_threads`` should be at least 4 even for a single-threaded application)."""
THREAD_HEADROOM = 32
"""Pools created on demand: Python's default executor (the gateway's evidence endpoint) grows
to min(32, cores + 4) threads, which a measurement on 2 cores at low load does not reach."""
DEFAULT_MAX_STAGE_THREADS = 8
"""The most ONNX Runtime intra-op threads a stage's manifest makes room for (``--threads``
is host-chosen; a stage started with more fails at session creation)."""
MODEL_VIRTUAL_FACTOR = 7.0
"""Peak virtual size a stage process adds per byte of its working set, for sizing without a
footprint of the build itself: the sealed file, its plaintext, the parsed model and ONNX
Runtime's copies of the weights, some of them at once while the session is built. Measured
with ``smlaas gramine measure`` on this project's machine: 2.1 to 6.3 (VmPeak over the
baseline stage's, per byte of measured working set) over the five stages of resnet18 and
resnet50 partitioned for 3 machines (``dp-throughput --fit-epc``); the largest, resnet50's
stage 1, 956 MiB with a working set of 86 MiB."""
VIRTUAL_HEADROOM = 1.25
"""[ASSUMED] A role's native peak varies between runs and launchers (the coordinator: 347 MiB
as the manifest runs it, 387 MiB under the local launcher, here), and Gramine's allocations
need not match glibc's natively; a quarter more covers what was seen."""


@dataclass(frozen=True)
class RoleFootprint:
    """One role's process, measured natively (``/proc/PID/status``)."""

    role: str
    vm_peak_bytes: int
    rss_peak_bytes: int
    threads: int
    ort_threads: int = 0
    """A stage's ONNX Runtime intra-op threads when measured (0: not a stage)."""

    @classmethod
    def of_process(cls, pid: int, role: str, *, ort_threads: int = 0) -> RoleFootprint:
        """Reads ``/proc/PID/status`` (Linux). ConfigError elsewhere."""
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError as err:
            raise ConfigError(f"cannot read the status of {role} (pid {pid}): {err}; "
                              f"footprints are measured on Linux") from err
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)

        def kib(name: str) -> int:
            return int(fields[name].split()[0]) * 1024

        return cls(role=role, vm_peak_bytes=kib("VmPeak"), rss_peak_bytes=kib("VmHWM"),
                   threads=int(fields["Threads"]), ort_threads=ort_threads)


@dataclass(frozen=True)
class Footprints:
    """Every role's footprint from one run, and where it came from."""

    roles: tuple[RoleFootprint, ...]
    plan_sha256: str = ""
    """SHA-256 of the sealed plan.json run ('' for the baseline): a stage's footprint sizes
    a manifest only for that build."""
    machine: str = ""
    command: str = ""
    """How to measure again."""

    def get(self, role: str) -> RoleFootprint | None:
        """The role's footprint (a replicated stage's largest replica)."""
        found = [f for f in self.roles if f.role == role]
        return max(found, key=lambda f: f.vm_peak_bytes) if found else None

    def validate(self) -> list[str]:
        problems = [f"{f.role}: {name} {getattr(f, name)} is not positive"
                    for f in self.roles for name in ("vm_peak_bytes", "threads")
                    if getattr(f, name) <= 0]
        if not any(f.role == COORDINATOR_ROLE for f in self.roles):
            problems.append("no coordinator footprint")
        return problems

    def to_json(self) -> str:
        return json.dumps({"plan_sha256": self.plan_sha256, "machine": self.machine,
                           "command": self.command,
                           "roles": [asdict(f) for f in self.roles]}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Footprints:
        try:
            data = json.loads(text)
            footprints = cls(roles=tuple(RoleFootprint(**r) for r in data["roles"]),
                             plan_sha256=data.get("plan_sha256", ""),
                             machine=data.get("machine", ""), command=data.get("command", ""))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"not a footprints file (from `smlaas gramine measure`): "
                              f"{err}") from err
        problems = footprints.validate()
        if problems:
            raise ConfigError("bad footprints: " + "; ".join(problems))
        return footprints

    def text(self) -> str:
        lines = [f"{'role':<14}{'VmPeak MiB':>11}{'VmHWM MiB':>10}{'threads':>8}"]
        lines += [f"{f.role:<14}{f.vm_peak_bytes / MIB:>11.1f}{f.rss_peak_bytes / MIB:>10.1f}"
                  f"{f.threads:>8}" for f in self.roles]
        return "\n".join(lines)


BASELINE = Footprints(
    roles=(RoleFootprint(COORDINATOR_ROLE, vm_peak_bytes=int(347.0 * MIB),
                         rss_peak_bytes=int(99.4 * MIB), threads=3),
           RoleFootprint(GATEWAY_ROLE, vm_peak_bytes=int(542.2 * MIB),
                         rss_peak_bytes=int(122.3 * MIB), threads=8),
           RoleFootprint("stage", vm_peak_bytes=int(521.5 * MIB),
                         rss_peak_bytes=int(113.2 * MIB), threads=8, ort_threads=1)),
    machine="the project's 2-core x86-64 CI machine, CPython 3.11.7, onnxruntime 1.32",
    command="tests/component/test_gramine_manifest_files.py (a 2-stage chain model of 64x64 "
            "layers, threads=1, 5 inferences)")
"""Footprints measured on this project's machine with a model of a few KiB: what a role
needs before any model (a stage's is ``stage``)."""


@dataclass(frozen=True)
class EnclaveSizing:
    """One role's ``sgx.enclave_size``, ``sgx.max_threads`` and how they were found."""

    role: str
    enclave_mib: int
    max_threads: int
    virtual_bytes: int
    basis: str

    @property
    def epc_request_mib(self) -> int:
        """The ``sgx.intel.com/epc`` request (note "EPC request"): the committed size."""
        return self.enclave_mib


def size_roles(plan: Plan, *, footprints: Footprints | None = None, plan_sha256: str = "",
               max_stage_threads: int = DEFAULT_MAX_STAGE_THREADS,
               gateway_max_queue: int = 128) -> dict[str, EnclaveSizing]:
    """Every role's sizing (notes "enclave size" and "threads"); ``footprints`` measured for
    another build size only the coordinator and the gateway."""
    if max_stage_threads < 1:
        raise ConfigError(f"a stage needs at least 1 thread, not {max_stage_threads}")
    same_build = footprints is not None and bool(plan_sha256) \
        and footprints.plan_sha256 == plan_sha256
    first, last = plan.stages[0], plan.stages[-1]
    queue_bytes = gateway_max_queue * (first.input_bytes + last.output_bytes)
    sizes = {
        COORDINATOR_ROLE: _size(COORDINATOR_ROLE, _measured(COORDINATOR_ROLE, footprints),
                                extra_bytes=0, extra_threads=0, what=""),
        GATEWAY_ROLE: _size(GATEWAY_ROLE, _measured(GATEWAY_ROLE, footprints),
                            extra_bytes=queue_bytes, extra_threads=0,
                            what=f" + queue {queue_bytes / MIB:.1f} MiB"),
    }
    for stage in plan.stages:
        role = stage_role(stage.index)
        own = footprints.get(role) if footprints is not None and same_build else None
        if own is not None and footprints is not None:
            extra, what = 0, " (its model included)"
            footprint = own, f"measured ({footprints.machine})"
        else:
            working_set, source = working_set_of(stage)
            extra = int(MODEL_VIRTUAL_FACTOR * working_set)
            what = (f" + {MODEL_VIRTUAL_FACTOR:g} x {source} working set "
                    f"{working_set / MIB:.1f} MiB")
            footprint = _measured("stage", footprints)
        ort_measured = max(footprint[0].ort_threads, 1)
        sizes[role] = _size(role, footprint, extra_bytes=extra,
                            extra_threads=max(0, max_stage_threads - ort_measured), what=what)
    return sizes


def working_set_of(stage: StagePlan) -> tuple[int, str]:
    """The stage's working set: measured natively when the plan carries it, else predicted."""
    measured = getattr(stage, "measured", None)
    measured_bytes = getattr(measured, "working_set_bytes", None)
    if isinstance(measured_bytes, int) and measured_bytes > 0:
        return measured_bytes, "measured"
    return stage.working_set_bytes, "predicted"


def plan_digest(sealed_dir: Path) -> str:
    """SHA-256 of the sealed directory's plan.json (what footprints are tied to)."""
    return hashlib.sha256((sealed_dir / "plan.json").read_bytes()).hexdigest()


def _measured(role: str, footprints: Footprints | None) -> tuple[RoleFootprint, str]:
    found = footprints.get(role) if footprints is not None else None
    if found is not None and footprints is not None:
        return found, f"measured ({footprints.machine})"
    baseline = BASELINE.get(role)
    assert baseline is not None  # BASELINE names every kind of role
    return baseline, "baseline measured on " + BASELINE.machine


def _size(role: str, footprint: tuple[RoleFootprint, str], *, extra_bytes: int,
          extra_threads: int, what: str) -> EnclaveSizing:
    measured, source = footprint
    virtual = measured.vm_peak_bytes + extra_bytes
    needed_mib = VIRTUAL_HEADROOM * virtual / MIB + GRAMINE_RUNTIME_MIB
    enclave_mib = max(MIN_ENCLAVE_MIB, 2 ** math.ceil(math.log2(needed_mib)))
    threads = measured.threads + extra_threads + GRAMINE_HELPER_THREADS + THREAD_HEADROOM
    basis = (f"{VIRTUAL_HEADROOM:g} x (VmPeak {measured.vm_peak_bytes / MIB:.0f} MiB{what}) "
             f"+ Gramine {GRAMINE_RUNTIME_MIB} MiB -> {enclave_mib} MiB; threads "
             f"{measured.threads} + {extra_threads} ONNX Runtime + "
             f"{GRAMINE_HELPER_THREADS} Gramine + {THREAD_HEADROOM} headroom; {source}")
    return EnclaveSizing(role=role, enclave_mib=enclave_mib, max_threads=threads,
                         virtual_bytes=virtual, basis=basis)


def measure_footprints(settings: DeploySettings, *, requests: int = 5,
                       progress: Callable[[str], None] = lambda _: None) -> Footprints:
    """Deploys the sealed build on this machine (the sim backend: the same processes minus
    the enclave), sends ``requests`` inferences through the gateway, and reads every role's
    footprint before stopping it."""
    from smlaas.deploy.deployment import Deployment

    sealed = _sealed_dir(settings.build_dir)
    with Deployment.on_this_machine(settings, progress=progress) as deployment:
        with deployment.client() as client:
            inputs = sample_inputs(client.metadata())
            for _ in range(requests):
                client.infer(inputs)
        pids = deployment.launcher.pids()  # type: ignore[attr-defined]
        ort_threads = settings.threads or 1
        roles = tuple(RoleFootprint.of_process(
            pid, name.split(".")[0],
            ort_threads=ort_threads if name.startswith("stage-") else 0)
            for name, pid in sorted(pids.items()))
    return Footprints(roles=roles, plan_sha256=plan_digest(sealed), machine=machine_text(),
                      command=f"smlaas gramine measure {settings.build_dir} --keys "
                              f"{settings.keys_path}")


def sample_inputs(metadata: Mapping[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """Seeded inputs for a model's V2 metadata (a dynamic dimension taken as 1)."""
    import numpy as np

    from smlaas.transport.v2 import DATATYPES

    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in metadata["inputs"]:
        shape = [d if d > 0 else 1 for d in spec["shape"]]
        kind = DATATYPES.get(spec["datatype"], "")
        if kind in ("float16", "float32", "float64"):
            inputs[spec["name"]] = rng.standard_normal(shape).astype(kind)
        elif kind == "bool" or kind.startswith(("int", "uint")):
            inputs[spec["name"]] = rng.integers(0, 2, size=shape).astype(kind)
        else:
            raise ConfigError(f"cannot make a sample for input {spec['name']!r} of type "
                              f"{spec['datatype']}: measure with a model of numeric inputs")
    return inputs


def machine_text() -> str:
    return (f"{platform.node()}: {os.cpu_count()} cores {platform.machine()}, "
            f"CPython {platform.python_version()}")


def _sealed_dir(build_dir: Path) -> Path:
    from smlaas.export.sealed_build import sealed_directory

    return sealed_directory(build_dir)
