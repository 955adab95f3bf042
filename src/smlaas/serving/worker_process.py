"""The ``smlaas worker`` process: enrol with the coordinator, unseal the released stage,
check its place in the owner's manifest, and serve it (:class:`~smlaas.serving.worker.StageWorker`)
until SIGTERM or SIGINT, or until its replica slot is lost."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from smlaas.coordinator.client import StageRelease
from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_index, stage_role
from smlaas.enclave.backends import create_backend
from smlaas.errors import AttestationError, ConfigError, DeployError, SmlaasError
from smlaas.graph.kv_cache import find_kv_pairs
from smlaas.plan.plan import Plan
from smlaas.receipts.claims import StageSigner
from smlaas.receipts.cose import ReceiptKey
from smlaas.receipts.evidence import KeyEvidenceSource
from smlaas.roles import StageSpec
from smlaas.runtime.sealed_stage import unseal_stage
from smlaas.runtime.stage_runner import StageRunner, relax_batch_dim
from smlaas.serving.enrol import check_replica_count, enrol
from smlaas.serving.link import replica_set, run_event_loop
from smlaas.serving.sequences import GenerationStage, generation_report
from smlaas.serving.worker import StageStats, StageWorker
from smlaas.transport.tls import client_context, server_context

logger = logging.getLogger(__name__)


def load_stage(sealed_dir: Path, release: StageRelease, *, threads: int
               ) -> tuple[StageRunner, onnx.ModelProto]:
    """Unseals the released stage (in memory only), checks it is the sub-model the owner's
    manifest commits to, and opens its session at any batch size; returns the session and the
    stage as planned (whose shapes the gateway checks against)."""
    model = onnx.load_model_from_string(unseal_stage(
        sealed_dir, release.index, release.key, expected_sha256=release.sha256))
    return StageRunner(relax_batch_dim(model), threads=threads,
                       label=f"stage {release.index}", serving=True), model


def bound_plan(sealed_dir: Path, plan_sha256: str) -> Plan | None:
    """The plan.json the owner's manifest binds (None, logged, if the host's is another or
    none: a host cannot change what it says)."""
    try:
        data = (sealed_dir / "plan.json").read_bytes()
        if hashlib.sha256(data).hexdigest() != plan_sha256:
            logger.warning("plan.json is not the plan the owner's manifest binds (SHA-256 "
                           "differs); it is ignored")
            return None
        return Plan.from_json(data.decode())
    except (OSError, UnicodeDecodeError, SmlaasError) as err:
        logger.info("no plan.json to read: %s", err)
        return None


def predicted_memory(plan: Plan | None, index: int) -> dict[str, int]:
    """The plan's prediction for stage ``index`` (for metrics only)."""
    if plan is None or not 0 <= index < len(plan.stages):
        return {}
    return {"working_set_bytes": plan.stages[index].working_set_bytes,
            "usable_epc_bytes": int(plan.cost_model.usable_epc_bytes)}


def generation_stage(plan: Plan | None, runner: StageRunner, model: onnx.ModelProto, *,
                     index: int) -> GenerationStage | None:
    """A decoder stage's generation state, sized by the owner's plan; None for other
    models. ConfigError for a stage holding a KV cache without the plan that sizes it."""
    if plan is None or plan.generation is None:
        if find_kv_pairs(model):
            raise ConfigError(f"stage {index} holds a KV cache but the plan.json the owner's "
                              f"manifest binds is not at hand to size it")
        return None
    return GenerationStage(runner, model, max_sequences=plan.generation.max_sequences,
                           max_context=plan.generation.max_context,
                           last=index == len(plan.stages) - 1)


def check_place_in_topology(spec: StageSpec, topology: tuple[str, ...]) -> None:
    """The last stage of the manifest answers; every other one forwards. A host that drops or
    adds ``--next`` (to serve a truncated chain's intermediate tensors as outputs) is
    refused."""
    last = max(stage_index(role) for role in topology if role != GATEWAY_ROLE)
    if (not spec.next_stages) != (spec.index == last):
        raise ConfigError(f"{spec.role} of a {last + 1}-stage manifest "
                          + ("must forward to the next stage (--next is missing)"
                             if not spec.next_stages else
                             "is the last stage; it cannot have a --next"))


def run_worker(spec: StageSpec) -> None:
    """The ``smlaas worker`` process: enrol, unseal, serve until SIGTERM or SIGINT."""
    index, role = spec.index, spec.role
    enclave = create_backend(spec.backend, role, spec.measured_config())
    registration = enrol(spec.coordinator, role=role, backend=enclave,
                         coordinator_mrenclave=spec.coordinator_mrenclave, hosts=[],
                         slot=spec.replica, hold=True)
    release, lease = registration.stage, registration.lease
    if release is None or release.index != index or lease is None:
        raise AttestationError(f"the coordinator released no key (or no slot) for {role}")
    lost: list[str] = []
    stoppers: list[Callable[[], object]] = []

    def on_lost(reason: str) -> None:  # the lease thread: stop serving at once
        lost.append(reason)
        for stop_serving in list(stoppers):
            stop_serving()

    lease.keep(on_lost)  # heartbeats from now on, loading the stage included
    attested_at = time.time()
    check_place_in_topology(spec, registration.topology)
    if spec.next_stages:
        check_replica_count(spec.next_stages, stage_role(index + 1),
                            registration.replicas_of(index + 1))
    runner, model = load_stage(Path(spec.sealed_dir), release, threads=spec.threads)
    plan = bound_plan(Path(spec.sealed_dir), registration.plan_sha256)
    generation = generation_stage(plan, runner, model, index=index)
    stats = StageStats(index, attested_at=attested_at, replica=spec.replica,
                       predicted=predicted_memory(plan, index))
    identity = (registration.certificate_pem, registration.key, registration.ca_pem)
    receipt_key = ReceiptKey()  # made in the enclave; its quote binds it to role and replica
    evidence = KeyEvidenceSource(enclave, receipt_key, role=role, replica=spec.replica,
                                 manifest_digest=registration.manifest_digest)
    signer = StageSigner(receipt_key, role, spec.replica, registration.manifest_digest,
                         registration.release.release.version if registration.release else 0,
                         release.sha256)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        stoppers.append(lambda: loop.call_soon_threadsafe(stop.set))
        if lost:  # lost while the stage loaded: never serve
            return
        next_link = replica_set(stage_role(index + 1), spec.next_stages,
                                client_context(*identity),
                                manifest_digest=registration.manifest_digest) \
            if spec.next_stages else None
        worker = StageWorker(index=index, runner=runner, model=model,
                             server_context=server_context(*identity),
                             upstream_role=GATEWAY_ROLE if index == 0 else stage_role(index - 1),
                             manifest_digest=registration.manifest_digest,
                             next_link=next_link, queue_size=spec.queue_size, stats=stats,
                             signer=signer, evidence=evidence, generation=generation,
                             generation_report=generation_report(plan) if index == 0 else None)
        await worker.serve(*spec.listen, stop=stop)

    try:
        run_event_loop(main())
    finally:
        lease.close()
    if lost:
        raise DeployError(f"{spec.process_name} lost its replica slot {lease.slot} and "
                          f"stopped serving: {lost[0]}")
