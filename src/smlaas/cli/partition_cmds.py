"""``smlaas partition``, ``smlaas verify`` and ``smlaas plan ...``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from smlaas.cli.console import console, print_json, progress_bar, table
from smlaas.errors import VerificationError
from smlaas.export import read_plan
from smlaas.export.stage_memory import median_working_set_error, working_set_summary
from smlaas.partition import (
    PlanOptions,
    analyse,
    compare_planners,
    cost_table,
    default_threads,
    measure_nodes,
    open_model,
    read_machines_file,
    split_budget,
    verify_build,
)
from smlaas.partition import (
    partition as run_partition,
)
from smlaas.plan import MACHINE_FILE_PLANNERS, PRESETS, CostModel, MachinePool, Planner, preset
from smlaas.plan.generation import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_SEQUENCES, GenerationSizes
from smlaas.profile import ProfileCache, ProfileSettings
from smlaas.profile.samples import load_sample_file, parse_input_values, sample_feeds

PLANNER_NAMES = [p.value for p in Planner]


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that profiles and plans a model."""
    options = [
        click.option("--model", "-m", "model", required=True,
                     help="An ONNX file, or a zoo model name (see `smlaas zoo list`)."),
        click.option("--input-size", "--input_size", "input_sizes", multiple=True,
                     help="Input shape, e.g. 1,3,224,224; per input as NAME:1,128 "
                          "(repeatable)."),
        click.option("--sample-inputs", "sample_inputs", type=click.Path(dir_okay=False),
                     help="An .npz file of input arrays (numpy.savez, by input name) to "
                          "profile and verify on instead of random values; inputs it holds "
                          "need no --input-size."),
        click.option("--input-value", "input_values", multiple=True,
                     help="NAME=VALUE: a value for an input (filled into its shape), e.g. "
                          "sr=16000 for a model that branches on it (repeatable)."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)), default="sgx1",
                     show_default=True, help="Cost model preset."),
        click.option("--cost-model", "cost_model_file", type=click.Path(dir_okay=False),
                     help="TOML file overriding cost model parameters (see `smlaas "
                          "calibrate`)."),
        click.option("--machines", "-k", type=click.IntRange(min=1),
                     help="At most this many enclave machines: one per stage, or per replica "
                          "with dp-replicas (which needs this or --machines-file)."),
        click.option("--machines-file", "machines_file", type=click.Path(dir_okay=False),
                     help="TOML file of machine classes ([[class]] name, count, "
                          "usable_epc_mib, speed, network_mib_per_s) for dp-latency, "
                          "dp-throughput and dp-replicas to assign stages to; instead of "
                          "--machines."),
        click.option("--fit-epc", is_flag=True,
                     help="Every stage's working set must fit the usable EPC."),
        click.option("--split-oversize/--no-split-oversize", "split_oversize", default=None,
                     help="Before planning, split MatMul/Gemm/Conv operators whose weights "
                          "alone exceed the usable EPC into pieces that fit (default: on "
                          "with --fit-epc)."),
        click.option("--threads", type=click.IntRange(min=1), default=default_threads(),
                     show_default=True, help="ONNX Runtime intra-op threads."),
        click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Measured runs per timing (after 3 warm-up runs)."),
        click.option("--no-cache", is_flag=True, help="Profile again even if cached."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _cost_model(preset_name: str, file: str | None) -> CostModel:
    base = preset(preset_name)
    return CostModel.from_toml(file, base=base) if file else base


def _machine_pool(machines: int | None, machines_file: str | None, cost_model: CostModel
                  ) -> MachinePool | None:
    """The machines file's classes; --machines and --machines-file are alternatives."""
    if machines_file is None:
        return None
    if machines is not None:
        raise click.UsageError("--machines and --machines-file are alternatives; give one",
                               ctx=click.get_current_context())
    return read_machines_file(machines_file, cost_model=cost_model)


def _check_planner_budget(planner: Planner, machines: int | None,
                          pool: MachinePool | None) -> None:
    if planner is Planner.DP_REPLICAS and machines is None and pool is None:
        raise click.UsageError("--planner dp-replicas needs --machines K (at most K enclaves "
                               "in all) or --machines-file FILE",
                               ctx=click.get_current_context())
    if pool is not None and planner not in MACHINE_FILE_PLANNERS:
        raise click.UsageError(f"--planner {planner.value} does not assign machine classes; "
                               f"with --machines-file use "
                               f"{', '.join(p.value for p in MACHINE_FILE_PLANNERS)}",
                               ctx=click.get_current_context())


def _settings(threads: int, runs: int) -> ProfileSettings:
    return ProfileSettings(threads=threads, warmup_runs=3, measured_runs=runs)


@click.command()
@model_options
@click.option("--build-dir", "--build_dir", "build_dir", required=True,
              type=click.Path(file_okay=False), help="Directory to write the build into.")
@click.option("--planner", type=click.Choice(PLANNER_NAMES), default="dp-latency",
              show_default=True, help="How to choose the cuts.")
@click.option("--no-verify", is_flag=True, help="Skip running the chain against the model.")
@click.option("--dynamic-axis", "dynamic_axes", multiple=True, metavar="NAME:AXIS",
              help="Keep this symbolic axis of an input symbolic in the stages (e.g. a "
                   "sequence axis, input_ids:1); the batch axis always is.")
@click.option("--measure-memory/--no-measure-memory", "measure_memory", default=True,
              show_default=True,
              help="Measure each exported stage's working set natively (a process per "
                   "stage, as a worker runs it) into plan.json's stages[k].measured; with "
                   "--fit-epc a stage measured above the usable EPC refuses the plan.")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help=f"A decoder (KV cache inputs): tokens per sequence, prompt and generated, "
                   f"that every stage keeps a cache for [default: {DEFAULT_MAX_CONTEXT}].")
@click.option("--max-sequences", type=click.IntRange(min=1), default=None,
              help=f"A decoder: sequences generated at once, each with its cache in every "
                   f"stage [default: {DEFAULT_MAX_SEQUENCES}].")
def partition(model: str, input_sizes: tuple[str, ...], sample_inputs: str | None,
              input_values: tuple[str, ...], preset: str,
              cost_model_file: str | None, machines: int | None, machines_file: str | None,
              fit_epc: bool, split_oversize: bool | None, threads: int, runs: int,
              no_cache: bool, as_json: bool, build_dir: str, planner: str, no_verify: bool,
              dynamic_axes: tuple[str, ...], measure_memory: bool, max_context: int | None,
              max_sequences: int | None) -> int:
    """Partition MODEL into enclave-sized stages and write BUILD_DIR.

    BUILD_DIR gets plan.json, stage_<k>.onnx, report.md and report.png, or nothing at all if
    any step fails. dp-replicas also gives stages replicas (at most --machines enclaves in
    all); with --machines-file the dp planners give each stage a machine class. Each
    stage's working set is measured natively after export (--no-measure-memory skips it).
    """
    chosen = Planner(planner)
    cost_model = _cost_model(preset, cost_model_file)
    pool = _machine_pool(machines, machines_file, cost_model)
    _check_planner_budget(chosen, machines, pool)
    options = PlanOptions(chosen, machines, fit_epc, pool, split_oversize)
    with progress_bar(enabled=not as_json) as progress:
        result = run_partition(model, Path(build_dir), input_size_specs=input_sizes,
                               cost_model=cost_model, options=options,
                               settings=_settings(threads, runs),
                               cache=None if no_cache else ProfileCache(),
                               verify=not no_verify, progress=progress,
                               sample_arrays=load_sample_file(sample_inputs)
                               if sample_inputs else None, input_values=input_values,
                               dynamic_axes=dynamic_axes, measure_memory=measure_memory,
                               generation=None if max_context is None and max_sequences is None
                               else GenerationSizes(max_context or DEFAULT_MAX_CONTEXT,
                                                    max_sequences or DEFAULT_MAX_SEQUENCES))
    plan = result.plan
    verification = result.verification
    if as_json:
        print_json({"build_dir": str(result.build_dir), "plan": plan.to_dict(),
                    "planning_ms": result.planning_ms,
                    "median_prediction_error": result.median_prediction_error,
                    "median_working_set_error": median_working_set_error(plan),
                    "split_operators": [s.to_dict() for s in result.splits],
                    "verified": None if verification is None else verification.ok,
                    "max_abs_error": None if verification is None
                    else verification.max_abs_error})
    else:
        for record in result.splits:
            console.print(f"split {record.describe()}", soft_wrap=True)
        console.print(plan.to_table())
        console.print(f"planning took {result.planning_ms:.1f} ms; median stage prediction "
                      f"error {100 * (result.median_prediction_error or 0):.1f}% (native)")
        console.print(working_set_summary(plan), soft_wrap=True)
        if plan.generation is not None:
            console.print(f"generation: every stage holds its layers' KV cache for "
                          f"{plan.generation.describe()}", soft_wrap=True)
        if verification is not None:
            console.print(verification.summary())
        console.print(f"build written to {result.build_dir} (report: "
                      f"{result.build_dir / 'report.md'})")
    if verification is not None and not verification.ok:
        raise VerificationError(verification.summary())
    return 0


@click.command()
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many seeded random inputs to compare on.")
@click.option("--rtol", type=float, default=1e-4, show_default=True)
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=default_threads(),
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(build_dir: str, seeds: int, rtol: float, atol: float, threads: int,
           as_json: bool) -> int:
    """Check that BUILD_DIR's chain of stages computes what the whole model computes.

    Exits 0 when every output is close (rtol/atol; float16/bfloat16 outputs: ulps or the
    whole model's own spread), 1 when not. --json prints the report either way; the error
    line goes to stderr.
    """
    report = verify_build(Path(build_dir), threads=threads, seeds=range(seeds), rtol=rtol,
                          atol=atol, check=False)
    if as_json:
        print_json(report.to_dict())
    elif report.ok:
        console.print(report.summary())
    if not report.ok:
        raise VerificationError(report.summary())
    return 0


@click.group()
def plan() -> None:
    """Inspect and compare plans."""


@plan.command("compare")
@model_options
def plan_compare(model: str, input_sizes: tuple[str, ...], sample_inputs: str | None,
                 input_values: tuple[str, ...], preset: str,
                 cost_model_file: str | None, machines: int | None, machines_file: str | None,
                 fit_epc: bool, split_oversize: bool | None, threads: int, runs: int,
                 no_cache: bool, as_json: bool) -> int:
    """Every planner on the same predicted costs, side by side.

    dp-replicas runs only with --machines or --machines-file. With --machines-file, the
    planners that do not assign machine classes run on the cost model's machine.
    """
    cost_model = _cost_model(preset, cost_model_file)
    pool = _machine_pool(machines, machines_file, cost_model)
    with progress_bar(enabled=not as_json) as progress:
        arrays = load_sample_file(sample_inputs) if sample_inputs else {}
        source, shapes = open_model(model, input_sizes, sample_shapes={
            k: tuple(v.shape) for k, v in arrays.items()})
        samples = sample_feeds(source.model, shapes, arrays=arrays,
                               values=parse_input_values(input_values))
        splits = PlanOptions(fit_epc=fit_epc, split_oversize=split_oversize).splits_oversize
        analysis = analyse(source, shapes, threads=threads, samples=samples,
                           split=split_budget(cost_model, pool) if splits else None)
        profile = measure_nodes(analysis, _settings(threads, runs),
                                cache=None if no_cache else ProfileCache(), progress=progress)
    costs = cost_table(analysis, profile, cost_model)
    rows = compare_planners(analysis, costs, machines=machines, fit_epc=fit_epc, pool=pool)
    if as_json:
        print_json({"model": source.name, "preset": cost_model.preset, "machines": machines,
                    "split_operators": [s.to_dict() for s in analysis.splits],
                    "machine_classes": None if pool is None else
                    [asdict(c) for c in pool.classes], "fit_epc": fit_epc, "planners": rows})
        return 0
    for record in analysis.splits:
        console.print(f"split {record.describe()}", soft_wrap=True)
    label = "predicted" if cost_model.enclave else "predicted (no enclave)"
    on = f", machines {pool.describe()}" if pool is not None else ""
    console.print(table(
        f"{source.name}: planners on the same costs ({cost_model.preset}, {label}{on})",
        ["planner", "stages", "machines", "replicas per stage", "latency ms", "throughput /s",
         "largest ws MiB", "fits EPC"],
        [[r["planner"], "-", "-", "-", "-", "-", "-", "infeasible"] if r.get("error") else
         [r["planner"], r["stages"], r["machine_count"], r["layout"], f"{r['latency_ms']:.2f}",
          f"{r['throughput_per_s']:.2f}", f"{r['max_working_set_mib']:.1f}",
          "yes" if r["all_fit_epc"] else "no"]
         for r in rows]))
    for r in rows:
        if r.get("error"):
            console.print(f"  {r['planner']}: {r['error']}", soft_wrap=True)
    if pool is not None:
        console.print("  planners other than " + ", ".join(p.value for p in MACHINE_FILE_PLANNERS)
                      + " do not assign machine classes: their rows are on the cost model's "
                      "machine", soft_wrap=True)
    return 0


@plan.command("show")
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_show(build_dir: str, as_json: bool) -> int:
    """Print the plan of BUILD_DIR."""
    loaded = read_plan(Path(build_dir))
    if as_json:
        print_json(loaded.to_dict())
    else:
        console.print(loaded.to_table())
    return 0
