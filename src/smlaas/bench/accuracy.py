"""Benchmark: prediction accuracy and planning time over the zoo.

For every zoo model: partition with the given planner, measure each exported stage, and compare
the predicted native stage time with the measured one; time planning (cost table + planner +
plan) separately from profiling. Writes JSON and prints a Markdown table.

    smlaas bench accuracy --out docs/results/partition_accuracy.json
    python benchmarks/partition_accuracy.py        (the same)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from smlaas import zoo
from smlaas.errors import SmlaasError
from smlaas.graph import segment_memory
from smlaas.partition import (
    PlanOptions,
    analyse,
    cost_table,
    make_plan,
    measure_nodes,
    open_model,
    partition,
)
from smlaas.plan import Planner, choose_cuts, choose_layout, preset
from smlaas.plan.costs import synthetic_costs
from smlaas.profile import ProfileCache, ProfileSettings, machine_id


def planning_time_ms(name: str, settings: ProfileSettings, repeats: int = 5) -> dict:
    """Median time of segment memory, cost table and dp planners, profiling excluded."""
    source, shapes = open_model(name)
    analysis = analyse(source, shapes, threads=settings.threads)
    profile = measure_nodes(analysis, settings, cache=ProfileCache())
    memory_ms, latency_ms, throughput_ms = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        segment_memory(analysis.graph)
        memory_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        costs = cost_table(analysis, profile, preset("sgx1"))
        make_plan(analysis, costs, PlanOptions(Planner.DP_LATENCY, None, True))
        latency_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        costs = cost_table(analysis, profile, preset("sgx1"))
        make_plan(analysis, costs, PlanOptions(Planner.DP_THROUGHPUT, 8, True))
        throughput_ms.append((time.perf_counter() - start) * 1000)
    return {"model": name, "nodes": analysis.graph.node_count,
            "segment_memory_ms": statistics.median(memory_ms),
            "dp_latency_ms": statistics.median(latency_ms),
            "dp_throughput_k8_ms": statistics.median(throughput_ms)}


def synthetic_planning_ms(repeats: int = 5) -> list[dict]:
    """Median planner time on random cost tables of zoo sizes (no model, no profiling): the
    700-node table every planner plans, and dp-replicas on a ResNet-152-sized table for 64
    machines."""
    rows = []
    rng = np.random.default_rng(0)
    n = 700
    table = synthetic_costs(rng.uniform(0.01, 2, n), rng.uniform(0, 2, n), rng.uniform(0, 5, n),
                            rng.uniform(0, 2, n + 1), preset("sgx1"))
    runs: list[tuple[str, Callable[[], object]]] = [
        (p.value, partial(choose_cuts, p, table, fit_epc=True))
        for p in (Planner.DP_LATENCY, Planner.DP_THROUGHPUT, Planner.SEED_BRUTEFORCE,
                      Planner.GREEDY_EPC)]
    runs.append(("dp-throughput K=16", partial(choose_cuts, Planner.DP_THROUGHPUT, table,
                                               machines=16, fit_epc=True)))
    for label, plan in runs:
        rows.append({"table": "random, 700 nodes", "planner": label, "ms": _median_ms(plan,
                                                                                     repeats)})
    rng = np.random.default_rng(1)
    n = 515
    table152 = synthetic_costs(rng.uniform(0.01, 2, n), rng.uniform(0, 2, n),
                               rng.uniform(0, 5, n), rng.uniform(0, 0.05, n + 1), preset("sgx1"))
    rows.append({"table": "random, 515 nodes (ResNet-152 size)", "planner": "dp-replicas K=64",
                 "ms": _median_ms(lambda: choose_layout(Planner.DP_REPLICAS, table152,
                                                        machines=64, fit_epc=True), repeats)})
    return rows


def _median_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None, *, say: Callable[[str], None]) -> None:
    """Runs the benchmark; ``say`` shows its progress and tables (the CLI's echo)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[m.name for m in zoo.list_models()])
    parser.add_argument("--machines", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/results/partition_accuracy.json"))
    args = parser.parse_args(argv)
    settings = ProfileSettings(threads=args.threads, warmup_runs=3, measured_runs=args.runs)
    rows: list[dict] = []
    all_errors: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            started = time.perf_counter()
            try:
                result = partition(name, Path(tmp) / name, cost_model=preset("sgx1"),
                                   options=PlanOptions(Planner.DP_THROUGHPUT, args.machines,
                                                       False),
                                   # No cache: profile and stage timings must come from the
                                   # same minute, as this VM has slow periods of seconds.
                                   settings=settings, cache=None, verify=True)
            except SmlaasError as err:
                rows.append({"model": name, "error": str(err)})
                continue
            stages = [{"stage": s.index, "predicted_ms": s.native_ms,
                       "measured_ms": measured,
                       "error": abs(s.native_ms - measured) / measured}
                      for s in result.plan.stages
                      for measured in [float(s.measured_native_ms or float("nan"))]]
            errors = [float(s["error"]) for s in stages]
            all_errors += errors
            rows.append({"model": name, "stages": stages,
                         "median_error": statistics.median(errors),
                         "verified": bool(result.verification and result.verification.ok),
                         "seconds": time.perf_counter() - started})
            say(f"{name}: {len(stages)} stages, median error "
                f"{100 * rows[-1]['median_error']:.1f}%")
    planning = [planning_time_ms(name, settings) for name in ("resnet152", "densenet201",
                                                              "bert_base")]
    synthetic = synthetic_planning_ms()
    summary = {"machine": machine_id(), "python": platform.python_version(),
               "threads": args.threads, "runs": args.runs, "machines": args.machines,
               "median_error_all_stages": statistics.median(all_errors) if all_errors else None,
               "stage_count": len(all_errors), "models": rows, "planning": planning,
               "planning_synthetic": synthetic}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    say("\n| model | stages | median error | max error | verified |")
    say("|---|---:|---:|---:|:---:|")
    for row in rows:
        if "error" in row:
            say(f"| {row['model']} | - | - | - | {row['error']} |")
            continue
        errors = [s["error"] for s in row["stages"]]
        say(f"| {row['model']} | {len(errors)} | {100 * row['median_error']:.1f}% | "
              f"{100 * max(errors):.1f}% | {'yes' if row['verified'] else 'NO'} |")
    say(f"\nmedian over all {len(all_errors)} stages: "
          f"{100 * summary['median_error_all_stages']:.1f}%")
    say("\n| model | nodes | segment memory ms | dp-latency ms | dp-throughput K=8 ms |")
    say("|---|---:|---:|---:|---:|")
    for p in planning:
        say(f"| {p['model']} | {p['nodes']} | {p['segment_memory_ms']:.1f} | "
              f"{p['dp_latency_ms']:.1f} | {p['dp_throughput_k8_ms']:.1f} |")
    say("\n| cost table | planner | ms |")
    say("|---|---|---:|")
    for row in synthetic:
        say(f"| {row['table']} | {row['planner']} | {row['ms']:.1f} |")

