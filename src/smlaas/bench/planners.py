"""Every planner on every zoo model, under the sgx1 and sgx2 cost models (all PREDICTED).

Per model and preset: for each planner its predicted latency, pipeline throughput on K = 2, 4
and 8 machines (for dp-replicas: K enclaves in all, stages times replicas), stage count and
largest working set; the unpartitioned single enclave (paging included); and planning time.
Node times come from one ONNX Runtime profile per model (cached), so every planner sees the
same costs. A model that no plan fits into the EPC because one operator alone is too big
(VGG's classifier.0, GPT-2's LM head) gets a second set of rows, ``NAME (split)``, with that
operator split as ``smlaas partition --fit-epc`` does; the first set is the paging figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from smlaas import zoo
from smlaas.errors import PlanError
from smlaas.partition import (
    Analysis,
    PlanOptions,
    analyse,
    compare_planners,
    cost_table,
    make_plan,
    measure_nodes,
    open_model,
    split_budget,
)
from smlaas.plan import Planner, preset
from smlaas.plan.costs import SegmentCosts
from smlaas.profile import ProfileCache, ProfileSettings

PRESETS = ("sgx1", "sgx2")
MACHINES = (2, 4, 8, 16)


def planner_rows(model: str, settings: ProfileSettings, *,
                 cache: ProfileCache | None) -> list[dict[str, Any]]:
    """Rows for ``model`` under each preset; where no plan fits the EPC because one operator
    is too big, also rows for the model with that operator split (``model (split)``), as
    ``smlaas partition --fit-epc`` plans it."""
    source, shapes = open_model(model)
    analysis = analyse(source, shapes, threads=settings.threads)
    profile = measure_nodes(analysis, settings, cache=cache)
    rows = []
    for name in PRESETS:
        costs = cost_table(analysis, profile, preset(name))
        fits = _fits_epc(analysis, costs)
        rows += _preset_rows(model, name, analysis, costs, fits)
        if fits:
            continue
        split = analyse(source, shapes, threads=settings.threads,
                        split=split_budget(preset(name)))
        if not split.splits:
            continue
        split_costs = cost_table(split, measure_nodes(split, settings, cache=cache),
                                 preset(name))
        if _fits_epc(split, split_costs):
            for row in _preset_rows(f"{model} (split)", name, split, split_costs, True):
                row["split"] = [record.describe() for record in split.splits]
                rows.append(row)
    return rows


def _preset_rows(model: str, name: str, analysis: Analysis, costs: SegmentCosts,
                 fits: bool) -> list[dict[str, Any]]:
    rows = []
    for row in compare_planners(analysis, costs, machines=None, fit_epc=fits):
        row.update(model=model, preset=name, fit_epc=fits and row["planner"] != "single",
                   nodes=analysis.graph.node_count)
        row["throughput_k"] = {}
        if row["planner"] in ("dp-throughput", "dp-replicas", "dp-latency", "greedy-epc",
                              "seed-bruteforce"):
            for machines in MACHINES:
                started = time.perf_counter()
                try:
                    plan = make_plan(analysis, costs, PlanOptions(
                        Planner(row["planner"]), machines, fits))
                except PlanError:
                    continue
                row["throughput_k"][str(machines)] = {
                    "throughput_per_s": plan.throughput_per_s, "stages": len(plan.stages),
                    "machine_count": plan.machine_count,
                    "planning_ms": (time.perf_counter() - started) * 1e3}
        rows.append(row)
    return rows


def _fits_epc(analysis: Analysis, costs: SegmentCosts) -> bool:
    """Whether some plan keeps every stage inside the EPC (not for VGG's 392 MiB layer)."""
    try:
        make_plan(analysis, costs, PlanOptions(Planner.DP_LATENCY, None, True))
        return True
    except PlanError:
        return False


def planners_benchmark(models: Sequence[str] | None, settings: ProfileSettings, *,
                       cache: ProfileCache | None,
                       progress: Callable[[str, int, int], None] | None = None
                       ) -> list[dict[str, Any]]:
    names = list(models) if models else [m.name for m in zoo.list_models()]
    rows: list[dict[str, Any]] = []
    for done, name in enumerate(names):
        if progress is not None:
            progress("models", done, len(names))
        rows += planner_rows(name, settings, cache=cache)
    if progress is not None:
        progress("models", len(names), len(names))
    return rows


def replicas_markdown(rows: list[dict[str, Any]]) -> str:
    """dp-throughput against dp-replicas at each K (PREDICTED), one line per model and
    preset: throughput, and the shape dp-replicas chose (stages x replicas)."""
    by_key = {(r["model"], r["preset"], r["planner"]): r for r in rows}
    head = " | ".join(f"K={m} dp-thr / dp-rep /s" for m in MACHINES)
    lines = [f"| model | preset | {head} |", "|---|---|" + "---:|" * len(MACHINES)]
    for (model, name, planner), row in by_key.items():
        if planner != "dp-throughput":
            continue
        other = by_key.get((model, name, "dp-replicas"), {}).get("throughput_k", {})
        cells = []
        for m in map(str, MACHINES):
            mine = row.get("throughput_k", {}).get(m)
            theirs = other.get(m)
            cells.append(f"{mine['throughput_per_s']:.1f} / " if mine else "- / ")
            cells[-1] += (f"{theirs['throughput_per_s']:.1f} ({theirs['stages']} st, "
                          f"{theirs['machine_count']} m)" if theirs else "-")
        lines.append(f"| {model} | {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | preset | planner | stages | latency ms | K=2 /s | K=4 /s | K=8 /s | "
             "largest ws MiB | fits EPC | planning ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for row in rows:
        k = row.get("throughput_k", {})
        tput = [f"{k[m]['throughput_per_s']:.1f}" if m in k else "-" for m in ("2", "4", "8")]
        # (K = 16 is in the JSON and in replicas_markdown)
        if "error" in row:
            # dp-replicas has no plan without a machine budget, only the K columns.
            what = "needs K" if row["planner"] == "dp-replicas" else "infeasible"
            lines.append(f"| {row['model']} | {row['preset']} | {row['planner']} | - | "
                         f"{what} | {' | '.join(tput)} | - | - | - |")
            continue
        lines.append(f"| {row['model']} | {row['preset']} | {row['planner']} | "
                     f"{row['stages']} | {row['latency_ms']:.1f} | {' | '.join(tput)} | "
                     f"{row['max_working_set_mib']:.1f} | "
                     f"{'yes' if row['all_fit_epc'] else 'no'} | {row['planning_ms']:.1f} |")
    return "\n".join(lines)
