"""``smlaas demo``: the main job end to end on a zoo model.

Partition for SGX v1 enclaves, verify the chain, seal the stages, deploy them locally as an
attested pipeline (sim backend: SIMULATED, INSECURE), attest the gateway, run inference through
it (a decoder: generate text, :mod:`smlaas.cli.demo_generation`), compare with the
unpartitioned model, print a summary, shut everything down.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np

from smlaas.cli.console import console, progress_bar, table
from smlaas.cli.demo_deployment import attested_demo
from smlaas.cli.demo_generation import generate_and_compare
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import DeploySettings
from smlaas.errors import VerificationError
from smlaas.export.sealed_build import SEALED_DIR, seal_build
from smlaas.partition import PlanOptions, default_threads, open_model, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings
from smlaas.profile.inputs import random_inputs
from smlaas.profile.session import create_session

RTOL, ATOL = 1e-4, 1e-5


@click.command()
@click.option("--model", "-m", default="resnet50", show_default=True,
              help="Zoo model (or ONNX file) to run the demo on.")
@click.option("--machines", "-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="Pipeline stages to plan for (best throughput on K enclave machines).")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where to keep the build, keys and logs (default: a temporary directory).")
@click.option("--threads", type=click.IntRange(min=1),
              help="ONNX Runtime threads for profiling and plain ONNX Runtime (default: all "
                   "cores) and per stage (default: the cores divided among the stages and the "
                   "gateway).")
@click.option("--requests", type=click.IntRange(min=1), default=10, show_default=True,
              help="Inference requests to time through the pipeline.")
def demo(model: str, machines: int, workdir: str | None, threads: int | None,
         requests: int) -> int:
    """Partition, seal, deploy (sim), attest and serve a model; check it computes the same."""
    with tempfile.TemporaryDirectory(prefix="smlaas-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        build = root / f"{Path(model).stem}-build"
        console.print(f"[bold]smlaas demo[/]: {model} as a pipeline of SGX v1 enclaves "
                      f"(usable EPC 93.5 MiB each), best throughput on {machines} machines")
        with progress_bar() as progress:
            result = partition(model, build, cost_model=preset("sgx1"),
                               options=PlanOptions(Planner.DP_THROUGHPUT, machines, True),
                               settings=ProfileSettings(threads=threads or default_threads(),
                                                        warmup_runs=2,
                                                        measured_runs=5),
                               cache=ProfileCache(), progress=progress)
        console.print(result.plan.to_table())
        verification = result.verification
        assert verification is not None  # verify=True above
        if not verification.ok:
            raise VerificationError(verification.summary())
        console.print(f"[green]verified offline[/]: the {len(result.plan.stages)} sub-models "
                      f"compute what the whole model computes "
                      f"(max abs error {verification.max_abs_error:.2g})")
        owner_key = root / "owner.key"
        console.print(f"owner signing key {owner_key} (fingerprint "
                      f"{OwnerKey.load_or_create(owner_key).fingerprint}): the coordinator "
                      f"will obey it only")
        keys = root / "owner-keys.json"
        seal_build(build, keys)
        console.print(f"sealed {len(result.plan.stages)} stages (AES-256-GCM) into "
                      f"{build / SEALED_DIR}; keys in {keys}")
        console.print("[bold yellow]deploying with the sim backend: SIMULATED SGX, "
                      "INSECURE[/] (real quote formats and checks, no hardware protection)")
        settings = DeploySettings(build_dir=build / SEALED_DIR, keys_path=keys,
                                  state_dir=root / f"state-{time.strftime('%H%M%S')}",
                                  owner_key_path=owner_key, port=free_port(), threads=threads)
        summary = generate_and_compare(settings, model, threads or default_threads()) \
            if result.plan.generation is not None else \
            _serve_and_compare(settings, model, requests, threads or default_threads())
        console.print(table("summary", ["", "value"], summary))
        if workdir:
            console.print(f"build, keys and logs kept in {root}")
    return 0


def _serve_and_compare(settings: DeploySettings, model: str, requests: int,
                       threads: int) -> list[list[str]]:
    source, shapes = open_model(model)
    inputs = random_inputs(source.model, {k: tuple(v) for k, v in shapes.items()})
    whole = create_session(source.model, threads=threads, serving=True)
    expected = dict(zip([o.name for o in whole.get_outputs()], whole.run(None, inputs)))
    with attested_demo(settings) as demo:
        client = demo.client
        outputs = client.infer(inputs)
        latencies = []
        for _ in range(requests):
            begin = time.perf_counter()
            client.infer(inputs)
            latencies.append(time.perf_counter() - begin)
    ready_s, stages = demo.ready_s, demo.stages
    worst = 0.0
    for name, value in expected.items():
        got = outputs[name]
        if got.shape != value.shape or not np.allclose(got, value, rtol=RTOL, atol=ATOL):
            raise VerificationError(f"the pipeline's output {name!r} differs from the whole "
                                    f"model's (max abs error "
                                    f"{float(np.max(np.abs(got - value))):.3g})")
        worst = max(worst, float(np.max(np.abs(got - value))))
    local = []
    for _ in range(requests):
        begin = time.perf_counter()
        whole.run(None, inputs)
        local.append(time.perf_counter() - begin)
    console.print(f"[bold green]the pipeline's output equals the whole model's output[/] "
                  f"(rtol {RTOL}, atol {ATOL}; max abs error {worst:.2g})")
    return [["model", model], ["stages (enclaves)", str(stages)],
            ["time to ready", f"{ready_s:.1f} s"],
            ["latency through the gateway (median)",
             f"{np.median(latencies) * 1e3:.1f} ms"],
            ["plain ONNX Runtime, whole model (median)", f"{np.median(local) * 1e3:.1f} ms"],
            ["backend", "sim (SIMULATED, INSECURE)"]]

