"""``smlaas worker`` and ``smlaas gateway``: the pipeline's processes (``smlaas deploy``
starts them; run by hand for a custom placement).

Each builds its role's spec (:mod:`smlaas.roles`) from its options: the measured ones
(role, coordinator MRENCLAVE) are arguments only; the host's (addresses, threads, ...) may also
come from ``SMLAAS_*`` environment variables, which is how Gramine passes them into an
enclave whose arguments are fixed by its measured manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click

from smlaas.enclave.backends import BACKENDS
from smlaas.roles import GatewaySpec, StageSpec, host_envvar
from smlaas.transport.addresses import parse_address, parse_addresses


def host_option(flag: str, *names: str, **kwargs: Any) -> Callable[[Any], Any]:
    """A host-chosen option, also read from its ``SMLAAS_*`` variable."""
    return click.option(flag, *names, envvar=host_envvar(flag), show_envvar=True, **kwargs)


_backend = click.option("--backend", type=click.Choice(BACKENDS), default="sim",
                        show_default=True,
                        help="Enclave backend (sim: SIMULATED, INSECURE; for development).")
_coordinator = host_option("--coordinator", required=True, metavar="HOST:PORT",
                           help="The coordinator to register with.")
_coordinator_mr = click.option(
    "--coordinator-mrenclave", required=True, metavar="HEX",
    help="The coordinator measurement to trust (measured: part of this role's identity).")


def _log_to_stderr() -> None:
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)


@click.command()
@click.option("--role", required=True, metavar="stage-K", help="The stage this worker runs.")
@_backend
@_coordinator_mr
@_coordinator
@host_option("--build", "sealed_dir", required=True, type=click.Path(file_okay=False),
             help="The sealed directory (plan.json and stage_K.sealed).")
@host_option("--listen", required=True, metavar="HOST:PORT",
             help="Where the previous role connects.")
@host_option("--next", "next_address", metavar="HOST:PORT",
             help="The next stage's replicas, comma-separated (omit for the last stage).")
@host_option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
             help="ONNX Runtime intra-op threads.")
@host_option("--queue-size", type=click.IntRange(min=1), default=4, show_default=True,
             help="Requests waiting here (and in flight downstream) before back-pressure.")
@host_option("--replica", type=click.IntRange(min=0), default=0, show_default=True,
             help="Which replica of its stage this worker is (names its metrics).")
def worker(role: str, backend: str, coordinator_mrenclave: str, coordinator: str,
           sealed_dir: str, listen: str, next_address: str | None, threads: int,
           queue_size: int, replica: int) -> int:
    """Run one stage: register, unseal the stage, serve it over mutual TLS."""
    from smlaas.coordinator.manifest import stage_index
    from smlaas.serving.worker import run_worker

    _log_to_stderr()
    run_worker(StageSpec(
        index=stage_index(role), backend=backend, coordinator_mrenclave=coordinator_mrenclave,
        coordinator=parse_address(coordinator, what="--coordinator"),
        listen=parse_address(listen, what="--listen"), sealed_dir=sealed_dir,
        next_stages=parse_addresses(next_address, what="--next") if next_address else (),
        threads=threads, queue_size=queue_size, replica=replica))
    return 0


@click.command()
@_backend
@_coordinator_mr
@_coordinator
@host_option("--first-stage", required=True, metavar="HOST:PORT", help="Stage 0's address.")
@host_option("--host", default="127.0.0.1", show_default=True)
@host_option("--port", default=8443, show_default=True, type=click.IntRange(1, 65535))
@host_option("--model-name", required=True, help="The name clients use in /v2/models/NAME.")
@host_option("--max-batch-size", type=click.IntRange(min=0), default=0, show_default=True,
             help="0: no batch dimension; N: batch up to N rows.")
@host_option("--max-queue-delay-us", type=click.IntRange(min=0), default=500,
             show_default=True, help="How long a batch waits to fill.")
@host_option("--max-inflight", type=click.IntRange(min=1), default=4, show_default=True,
             help="Batches in the pipeline at once.")
@host_option("--request-timeout", type=click.FloatRange(min=0.1), default=30.0,
             show_default=True, help="Seconds before a request is answered 504.")
@host_option("--max-queue", type=click.IntRange(min=1), default=128, show_default=True,
             help="Requests waiting for the pipeline before the gateway answers 503.")
@host_option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0,
             show_default=True, help="Seconds a request's headers may take to arrive.")
@host_option("--body-timeout", type=click.FloatRange(min=0.1), default=30.0,
             show_default=True, help="Seconds a request's body may take after its headers.")
@host_option("--grpc-port", type=click.IntRange(0, 65535), default=0, show_default=True,
             help="Also serve the KServe V2 gRPC API here (0: no gRPC).")
@host_option("--labels", "labels_path", type=click.Path(dir_okay=False),
             help="Class labels (one per line) for the classification extension; must be the "
                  "file whose SHA-256 the manifest names.")
def gateway(backend: str, coordinator_mrenclave: str, coordinator: str, first_stage: str,
            host: str, port: int, model_name: str, max_batch_size: int,
            max_queue_delay_us: int, max_inflight: int, request_timeout: float,
            max_queue: int, header_timeout: float, body_timeout: float, grpc_port: int,
            labels_path: str | None) -> int:
    """Serve the Open Inference Protocol over HTTPS in front of the stages."""
    from smlaas.serving.gateway_process import run_gateway

    _log_to_stderr()
    run_gateway(GatewaySpec(
        backend=backend, coordinator_mrenclave=coordinator_mrenclave,
        coordinator=parse_address(coordinator, what="--coordinator"),
        first_stages=parse_addresses(first_stage, what="--first-stage"), listen=(host, port),
        model_name=model_name, max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us, max_inflight=max_inflight,
        request_timeout_s=request_timeout, max_queue=max_queue, header_timeout_s=header_timeout,
        body_timeout_s=body_timeout, grpc_port=grpc_port, labels_path=labels_path or ""))
    return 0
