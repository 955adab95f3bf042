"""``smlaas demo``: the main job end to end on a zoo model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from smlaas.cli.console import console, progress_bar, table
from smlaas.errors import VerificationError
from smlaas.partition import PlanOptions, default_threads, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings


@click.command()
@click.option("--model", "-m", default="resnet50", show_default=True,
              help="Zoo model (or ONNX file) to run the demo on.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where to keep the build (default: a temporary directory).")
@click.option("--threads", type=click.IntRange(min=1), default=default_threads(),
              show_default=True)
def demo(model: str, workdir: str | None, threads: int) -> int:
    """Partition a zoo model for SGX v1 enclaves and prove the split computes the same."""
    with tempfile.TemporaryDirectory(prefix="smlaas-demo-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        build = root / f"{Path(model).stem}-build"
        console.print(f"[bold]smlaas demo[/]: partition {model} for SGX v1 enclaves "
                      f"(usable EPC 93.5 MiB), every stage inside the EPC")
        with progress_bar() as progress:
            result = partition(model, build, cost_model=preset("sgx1"),
                               options=PlanOptions(Planner.DP_LATENCY, None, True),
                               settings=ProfileSettings(threads=threads, warmup_runs=2,
                                                        measured_runs=5),
                               cache=ProfileCache(), progress=progress)
        console.print(result.plan.to_table())
        rows = [[r["planner"], r.get("stages", "-"),
                 f"{r['latency_ms']:.1f}" if "latency_ms" in r else "infeasible",
                 f"{r['throughput_per_s']:.2f}" if "throughput_per_s" in r else "-"]
                for r in result.comparison]
        console.print(table("planners on the same predicted costs (sgx1)",
                            ["planner", "stages", "latency ms", "throughput /s"], rows))
        verification = result.verification
        assert verification is not None  # verify=True above
        if not verification.ok:
            raise VerificationError(verification.summary())
        console.print(f"[bold green]the chain of {len(result.plan.stages)} sub-models "
                      f"computes what the whole model computes[/] "
                      f"(max abs error {verification.max_abs_error:.2g})")
        if workdir:
            console.print(f"build kept in {build}")
    return 0
