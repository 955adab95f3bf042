"""``smlaas worker`` and ``smlaas gateway``: the pipeline's processes (``smlaas deploy``
starts them; run by hand for a custom placement)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from smlaas.serving.enrol import BACKENDS, parse_address, sim_coordinator_mrenclave

_backend = click.option("--backend", type=click.Choice(BACKENDS), default="sim",
                        show_default=True,
                        help="Enclave backend (sim: SIMULATED, INSECURE; for development).")
_coordinator = click.option("--coordinator", "coordinator", required=True, metavar="HOST:PORT",
                            help="The coordinator to register with.")
_coordinator_mr = click.option(
    "--coordinator-mrenclave", metavar="HEX",
    help="The coordinator measurement to trust (default for sim: this code's coordinator).")


def _coordinator_mrenclave(value: str | None, backend: str) -> str:
    if value:
        return value
    if backend != "sim":
        raise click.UsageError("--coordinator-mrenclave is required with this backend")
    return sim_coordinator_mrenclave()


def _log_to_stderr() -> None:
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)


@click.command()
@_coordinator
@click.option("--role", required=True, metavar="stage-K", help="The stage this worker runs.")
@click.option("--build", "build_dir", required=True, type=click.Path(file_okay=False),
              help="Build directory holding sealed/stage_K.sealed.")
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Where the previous role connects.")
@click.option("--next", "next_address", metavar="HOST:PORT",
              help="The next stage (omit for the last stage).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="ONNX Runtime intra-op threads.")
@click.option("--queue-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests waiting here (and in flight downstream) before back-pressure.")
@_backend
@_coordinator_mr
def worker(coordinator: str, role: str, build_dir: str, listen: str, next_address: str | None,
           threads: int, queue_size: int, backend: str, coordinator_mrenclave: str | None
           ) -> int:
    """Run one stage: register, unseal the stage, serve it over mutual TLS."""
    from smlaas.serving.worker import run_worker

    _log_to_stderr()
    run_worker(coordinator=parse_address(coordinator, what="--coordinator"), role=role,
               build_dir=Path(build_dir), listen=parse_address(listen, what="--listen"),
               next_address=parse_address(next_address, what="--next") if next_address
               else None, backend=backend,
               coordinator_mrenclave=_coordinator_mrenclave(coordinator_mrenclave, backend),
               threads=threads, queue_size=queue_size)
    return 0


@click.command()
@_coordinator
@click.option("--first-stage", required=True, metavar="HOST:PORT", help="Stage 0's address.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8443, show_default=True, type=click.IntRange(1, 65535))
@click.option("--model-name", required=True, help="The name clients use in /v2/models/NAME.")
@click.option("--max-batch-size", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: no batch dimension; N: batch up to N rows.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=500,
              show_default=True, help="How long a batch waits to fill.")
@click.option("--max-inflight", type=click.IntRange(min=1), default=4, show_default=True,
              help="Batches in the pipeline at once.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=30.0,
              show_default=True, help="Seconds before a request is answered 504.")
@_backend
@_coordinator_mr
def gateway(coordinator: str, first_stage: str, host: str, port: int, model_name: str,
            max_batch_size: int, max_queue_delay_us: int, max_inflight: int,
            request_timeout: float, backend: str, coordinator_mrenclave: str | None) -> int:
    """Serve the Open Inference Protocol over HTTPS in front of the stages."""
    from smlaas.serving.gateway import GatewaySettings
    from smlaas.serving.gateway_process import run_gateway

    _log_to_stderr()
    run_gateway(coordinator=parse_address(coordinator, what="--coordinator"),
                first_stage=parse_address(first_stage, what="--first-stage"),
                listen=(host, port), backend=backend,
                coordinator_mrenclave=_coordinator_mrenclave(coordinator_mrenclave, backend),
                settings=GatewaySettings(model_name=model_name, max_batch_size=max_batch_size,
                                         max_queue_delay_us=max_queue_delay_us,
                                         max_inflight=max_inflight,
                                         request_timeout_s=request_timeout))
    return 0
