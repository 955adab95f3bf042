"""Each process of a deployment, from the sealed build's public parts: the operator's plan.

Given the plan (stages, replicas, what seal recorded about batching), the serving options and
the coordinator's address and MRENCLAVE, :func:`role_specs` asks the launcher for an address
per stage replica and returns the spec of every stage replica and of the gateway. Nothing in
it is secret, so the operator plane (which may be the host) computes it; the owner computes
each role's expected measurement from the same specs' measured parts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smlaas.coordinator.manifest import stage_role
from smlaas.deploy.settings import DeploySettings
from smlaas.errors import ConfigError, DeployError
from smlaas.plan.plan import Plan
from smlaas.roles import Address, GatewaySpec, RoleSpec, StageSpec

if TYPE_CHECKING:
    from smlaas.deploy.launchers import Launcher

logger = logging.getLogger(__name__)
CpuPlan = dict[tuple[int, int], tuple[int, ...]]


@dataclass(frozen=True)
class ServingLayout:
    """Where and how the roles run (host options only: nothing here is measured)."""

    backend: str = "sim"
    host: str = "127.0.0.1"
    port: int = 8443
    grpc_port: int | None = None
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_batch_size: int = 0
    max_queue_delay_us: int = 500
    max_inflight: int | None = None
    labels_path: Path | None = None
    gateway_options: dict[str, Any] = field(default_factory=dict)
    pin: bool = False

    @classmethod
    def of(cls, settings: DeploySettings, *, max_batch_size: int, threads: int
           ) -> ServingLayout:
        return cls(backend=settings.backend, host=settings.host, port=settings.port,
                   grpc_port=settings.grpc_port, threads=threads,
                   max_batch_size=max_batch_size, max_queue_delay_us=settings.max_queue_delay_us,
                   max_inflight=settings.max_inflight, labels_path=settings.labels_path,
                   gateway_options=dict(settings.gateway_options), pin=settings.pin)


def shared_machine_threads(replicas: list[int], *, cores: int | None = None) -> int:
    """ONNX Runtime threads per stage replica when every process runs on this machine: its
    cores divided among the stage replicas and the gateway (at least 1). One thread more than
    a stage's share oversubscribes the machine: ResNet-50 in 3 stages on 2 cores served 12.9
    requests/s with a thread per core per stage against 18.9/s with 1 (issue 18)."""
    available = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, available // (sum(replicas) + 1))


def stage_replicas(plan: Plan, override: dict[int, int] | None) -> list[int]:
    """Replicas per stage: the plan's (1 where it says nothing), then ``override``."""
    replicas = [int(getattr(stage, "replicas", 1) or 1) for stage in plan.stages]
    for index, count in (override or {}).items():
        if not 0 <= index < len(replicas):
            raise ConfigError(f"--replicas names stage {index}; the plan has stages "
                              f"0..{len(replicas) - 1}")
        if count < 1:
            raise ConfigError(f"stage {index} needs at least 1 replica, not {count}")
        if count > 1 and plan.generation is not None:
            raise ConfigError(f"--replicas {index}={count}: a decoder's stage keeps its "
                              f"sequences' KV caches, so it runs as one replica")
        replicas[index] = count
    return replicas


def parse_replicas(specs: tuple[str, ...]) -> dict[int, int]:
    """``--replicas STAGE=COUNT`` options as stage -> count."""
    replicas = {}
    for spec in specs:
        stage, sep, count = spec.partition("=")
        if not sep or not stage.strip().isdigit() or not count.strip().isdigit():
            raise ConfigError(f"--replicas takes STAGE=COUNT, e.g. 1=2; got {spec!r}")
        replicas[int(stage)] = int(count)
    return replicas


def process_name(index: int, replica: int) -> str:
    """The launcher's name for a stage replica (as ``StageSpec.process_name``)."""
    return stage_role(index) + (f".r{replica}" if replica else "")


def pin_cpu_sets(count: int, *, available: tuple[int, ...] | None = None
                 ) -> list[tuple[int, ...]] | None:
    """``count`` disjoint, equal CPU sets from the cores this process may use (contiguous
    blocks, the remainder unused), or None when there are fewer cores than sets."""
    cores = tuple(sorted(available if available is not None else os.sched_getaffinity(0)))
    if count < 1 or len(cores) < count:
        return None
    size = len(cores) // count
    return [cores[k * size:(k + 1) * size] for k in range(count)]


def pin_plan(replicas: list[int], pin: bool) -> tuple[CpuPlan, str]:
    """(stage, replica) -> its cores when pinning, and a line saying what was done."""
    if not pin:
        return {}, ""
    keys = [(k, r) for k, count in enumerate(replicas) for r in range(count)]
    sets = pin_cpu_sets(len(keys))
    if sets is None:
        cores = len(os.sched_getaffinity(0))
        logger.warning("--pin: %d stage replicas but %d cores; not pinned", len(keys), cores)
        return {}, f"not pinned ({len(keys)} stage replicas, {cores} cores)"
    cpus: CpuPlan = dict(zip(keys, sets))
    return cpus, ", ".join(f"{stage_role(k)}{'.r' + str(r) if r else ''} on cores "
                           f"{','.join(map(str, cpus[(k, r)]))}" for k, r in keys)


def prepare_stages(launcher: Launcher, *, replicas: list[int], layout: ServingLayout,
                   cpus: CpuPlan) -> None:
    """Tells the launcher, before any address is reserved, every stage replica to come and
    the cores each uses (the Ray launcher books them and the coordinator's in one placement
    group, and refuses a cluster that cannot hold them before anything starts)."""
    launcher.prepare([(process_name(k, r), len(cpus.get((k, r), ())) or layout.threads)
                      for k, count in enumerate(replicas) for r in range(count)])


def max_inflight(chosen: int | None, replicas: list[int]) -> int:
    """Batches the gateway keeps in the pipeline: ``chosen``, else one per stage replica (so
    that each is busy; see :attr:`DeploySettings.max_inflight`)."""
    return chosen or sum(replicas)


RESERVE_ATTEMPTS = 8


def reserve_beside(launcher: Launcher, layout: ServingLayout, name: str) -> Address:
    """An address the launcher reserves for ``name``, never one of the gateway's ports: the
    owner's process chose those, and an operator process hands out ports without knowing
    them (a stage once took the gateway's port so)."""
    for _ in range(RESERVE_ATTEMPTS):
        host, port = launcher.reserve(name)
        if port not in (layout.port, layout.grpc_port):
            return host, port
    raise DeployError(f"the launcher kept reserving the gateway's ports for {name}")


def role_specs(launcher: Launcher, *, model_name: str, replicas: list[int],
               layout: ServingLayout, coordinator: Address, coordinator_mrenclave: str,
               sealed_dir: Path, cpus: CpuPlan) -> list[RoleSpec]:
    """Every stage replica's spec (an address reserved for each) and the gateway's last
    (after :func:`prepare_stages`)."""
    common: dict[str, Any] = {"backend": layout.backend,
                              "coordinator_mrenclave": coordinator_mrenclave,
                              "coordinator": coordinator}
    addresses = [tuple(reserve_beside(launcher, layout, process_name(k, r))
                       for r in range(count)) for k, count in enumerate(replicas)]
    specs: list[RoleSpec] = [
        StageSpec(index=k, replica=r, listen=address, sealed_dir=str(Path(sealed_dir).resolve()),
                  next_stages=addresses[k + 1] if k + 1 < len(replicas) else (),
                  threads=len(cpus.get((k, r), ())) or layout.threads, **common)
        for k, stage in enumerate(addresses) for r, address in enumerate(stage)]
    specs.append(GatewaySpec(
        first_stages=addresses[0], listen=(layout.host, layout.port), model_name=model_name,
        max_batch_size=layout.max_batch_size, max_queue_delay_us=layout.max_queue_delay_us,
        max_inflight=max_inflight(layout.max_inflight, replicas),
        grpc_port=layout.grpc_port or 0,
        labels_path=str(Path(layout.labels_path).resolve()) if layout.labels_path else "",
        **common, **layout.gateway_options))
    return specs
