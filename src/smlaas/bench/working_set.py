"""Benchmark: predicted against measured working set of every stage of the zoo and of the real
exporters' models of ``smlaas bench exporters``.

Each model is partitioned by ``dp-throughput --machines 3`` on the ``sgx1`` cost model
(``--fit-epc`` off, so stages of every size occur) and every stage's working set is measured
natively (:mod:`smlaas.runtime.working_set`). Per stage: the prediction of what a native
measurement sees, ``k_w*W + A + R`` with the preset's constants (the enclave's prediction adds
the LibOS's ``L``, which no native measurement sees), the measurement, and the relative error;
over all stages the median and worst error, and the stages measured above the usable EPC while
the enclave's prediction fits (the ones that would page although the plan says they fit). The
constants are also fitted to the measurements
(:func:`smlaas.profile.calibrate.fit_memory_constants`), in sample and leaving each model out in
turn, to show what calibration would buy.

    smlaas bench working-set --out docs/results/working_set.json
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smlaas import zoo
from smlaas.errors import SmlaasError
from smlaas.export.stage_memory import native_prediction_bytes, unmeasured_reason
from smlaas.memory_calibration import memory_samples
from smlaas.partition import measured_plan
from smlaas.plan import CostModel, Plan, preset
from smlaas.plan.cost_model import MIB
from smlaas.profile import ProfileCache, ProfileSettings, machine_id
from smlaas.profile.calibrate import MemoryFit, MemorySample, fit_memory_constants

MACHINES = 3
TARGET_MEDIAN_ERROR = 0.10
"""The issue's target: median |predicted - measured| / measured at most 10%."""
LARGE_STAGE_MIB = 16.0
"""Stages measured at least this large are also summarised apart: below it the runtime's
few MiB decide the relative error, and such a stage is far from any EPC."""


@dataclass(frozen=True)
class Model:
    """One model to measure: how ``smlaas partition`` is told about it."""

    name: str
    family: str
    """``zoo`` or the exporter that made it."""
    spec: Callable[[Path], Path | str]
    input_sizes: tuple[str, ...] = ()
    input_values: tuple[str, ...] = ()
    skip_reason: str | None = None


def models(names: Sequence[str] = (), *, exporters: bool = True) -> list[Model]:
    """The zoo's models and (with ``exporters``) those of ``smlaas bench exporters``;
    only ``names`` if given."""
    chosen = [Model(m.name, "zoo", _zoo_spec(m.name)) for m in zoo.list_models()]
    if exporters:
        from smlaas.bench.exporters import cases

        for case in cases():
            chosen.append(Model(case.name, case.exporter, case.make, case.input_sizes,
                                case.input_values,
                                skip_reason=f"refused by design ({case.notes})"
                                if case.expect_refusal else None))
    return [m for m in chosen if not names or m.name in names]


def _zoo_spec(name: str) -> Callable[[Path], Path | str]:
    return lambda _work: name


def _stage_rows(plan: Plan, model: Model) -> list[dict[str, Any]]:
    rows = []
    for s in plan.stages:
        if s.measured is None:
            continue
        epc = plan.usable_epc_bytes(s)
        measured = s.measured.working_set_bytes
        native = native_prediction_bytes(plan, s)  # what the native measurement can see
        rows.append({
            "model": model.name, "family": model.family, "stage": s.index,
            "nodes": s.node_count,
            "touched_weight_mib": s.touched_weight_bytes / MIB,
            "peak_activation_mib": s.peak_activation_bytes / MIB,
            "predicted_mib": native / MIB,
            "predicted_enclave_mib": s.working_set_bytes / MIB,
            "measured_mib": measured / MIB,
            "rss_mib": s.measured.rss_bytes / MIB,
            "peak_rss_mib": s.measured.peak_rss_bytes / MIB,
            "error": (native - measured) / measured,
            "over_epc_predicted_to_fit": measured > epc >= s.working_set_bytes,
        })
    return rows


def run_model(model: Model, work: Path, *, settings: ProfileSettings, cost_model: CostModel,
              cache: ProfileCache | None) -> dict[str, Any]:
    """One model's row: its stages, or why it was skipped."""
    row: dict[str, Any] = {"model": model.name, "family": model.family}
    if model.skip_reason:
        return {**row, "skipped": model.skip_reason}
    started = time.perf_counter()
    try:
        spec = model.spec(work)
    except Exception as err:  # an exporter or a download failed: not smlaas, but say so
        return {**row, "skipped": f"model not obtained: {type(err).__name__}: {err}"}
    try:
        plan = measured_plan(str(spec), machines=MACHINES, settings=settings,
                             cost_model=cost_model, input_size_specs=model.input_sizes,
                             input_values=model.input_values, cache=cache)
    except SmlaasError as err:
        return {**row, "skipped": f"{type(err).__name__}: {str(err).splitlines()[0]}",
                "seconds": time.perf_counter() - started}
    stages = _stage_rows(plan, model)
    if not stages:
        return {**row, "skipped": unmeasured_reason(plan)}
    return {**row, "stages": stages, "seconds": time.perf_counter() - started,
            "samples": [s.__dict__ for s in memory_samples(plan)]}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _leave_one_model_out(rows: list[dict[str, Any]]) -> list[float]:
    """|error| of every stage predicted with constants fitted to the other models."""
    errors = []
    for row in rows:
        others = [MemorySample(**s) for r in rows if r is not row for s in r["samples"]]
        try:
            fit = fit_memory_constants(others)
        except ValueError:
            continue
        errors += [abs(fit.predict_bytes(sample) - sample.measured_bytes) / sample.measured_bytes
                   for sample in (MemorySample(**s) for s in row["samples"])]
    return errors


def summarise(rows: list[dict[str, Any]], cost_model: CostModel) -> dict[str, Any]:
    """Median and worst error, stages over the EPC though predicted to fit, and the same
    errors with calibrated constants."""
    measured = [r for r in rows if "stages" in r]
    stages = [s for r in measured for s in r["stages"]]
    summary: dict[str, Any] = {
        "stage_count": len(stages), "model_count": len(measured),
        "skipped": {r["model"]: r["skipped"] for r in rows if "skipped" in r},
        "assumed": {"weight_factor": cost_model.weight_factor,
                    "runtime_overhead_mib": cost_model.runtime_overhead_mib,
                    "libos_overhead_mib": cost_model.libos_overhead_mib,
                    "usable_epc_mib": cost_model.usable_epc_mib},
        "target_median_error": TARGET_MEDIAN_ERROR,
    }
    if not stages:
        return summary
    errors = [abs(s["error"]) for s in stages]
    worst = max(stages, key=lambda s: abs(s["error"]))
    summary.update(
        median_error=statistics.median(errors),
        worst_error=abs(worst["error"]),
        worst_stage=f"{worst['model']} stage {worst['stage']}",
        under_predicted_stages=sum(s["error"] < 0 for s in stages),
        over_epc_predicted_to_fit=[f"{s['model']} stage {s['stage']}" for s in stages
                                   if s["over_epc_predicted_to_fit"]],
        median_error_large=_median([abs(s["error"]) for s in stages
                                    if s["measured_mib"] >= LARGE_STAGE_MIB]),
        large_stage_mib=LARGE_STAGE_MIB,
        large_stage_count=sum(s["measured_mib"] >= LARGE_STAGE_MIB for s in stages),
        median_error_zoo=_median([abs(s["error"]) for s in stages if s["family"] == "zoo"]),
        median_error_exporters=_median([abs(s["error"]) for s in stages
                                        if s["family"] != "zoo"]),
    )
    samples = [MemorySample(**s) for r in measured for s in r["samples"]]
    try:
        fit: MemoryFit | None = fit_memory_constants(samples)
    except ValueError:
        fit = None
    if fit is not None:
        calibrated = [abs(fit.predict_bytes(s) - s.measured_bytes) / s.measured_bytes
                      for s in samples]
        held_out = _leave_one_model_out(measured)
        epc, libos = cost_model.usable_epc_bytes, cost_model.libos_overhead_mib * MIB
        summary["calibrated"] = {
            **fit.to_dict(),
            "median_error_in_sample": statistics.median(calibrated),
            "median_error_large_in_sample": _median([
                error for error, sample in zip(calibrated, samples)
                if sample.measured_bytes >= LARGE_STAGE_MIB * MIB]),
            "worst_error_in_sample": max(calibrated),
            "median_error_leave_one_model_out": statistics.median(held_out)
            if held_out else None,
            "worst_error_leave_one_model_out": max(held_out) if held_out else None,
            "over_epc_predicted_to_fit": sum(
                s.measured_bytes > epc >= fit.predict_bytes(s) + libos for s in samples),
        }
    return summary


def working_set_benchmark(names: Sequence[str] = (), *, settings: ProfileSettings,
                          exporters: bool = True, work_dir: Path | None = None,
                          cache: ProfileCache | None = None,
                          say: Callable[[str], None] = lambda _line: None) -> dict[str, Any]:
    """Every chosen model measured (see the module docstring); ``say`` gets a line per
    model as it finishes."""
    cost_model = preset("sgx1")
    chosen = models(names, exporters=exporters)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smlaas-working-set-bench-") as tmp:
        work = work_dir or Path(tmp)
        for index, model in enumerate(chosen, 1):
            rows.append(run_model(model, work, settings=settings, cost_model=cost_model,
                                  cache=cache))
            say(f"[{index}/{len(chosen)}] {progress_line(rows[-1])}")
    return {"machine": machine_id(), "python": platform.python_version(),
            "threads": settings.threads, "machines": MACHINES, "preset": cost_model.preset,
            "seconds": time.perf_counter() - started,
            "summary": summarise(rows, cost_model), "models": rows}


def progress_line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"{row['model']}: skipped: {row['skipped']}"
    return f"{row['model']}: " + ", ".join(
        f"stage {s['stage']} predicted {s['predicted_mib']:.1f} MiB, measured "
        f"{s['measured_mib']:.1f} ({100 * s['error']:+.0f}%)" for s in row["stages"]) + \
        f" [{row['seconds']:.0f} s]"


def markdown(result: dict[str, Any]) -> str:
    """The per-stage table and the summary lines."""
    summary = result["summary"]
    lines = ["| model | exporter | stage | W MiB | A MiB | predicted MiB | measured MiB | "
             "error | RSS MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["models"]:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['family']} | - | | | | | | skipped: "
                         f"{row['skipped'][:100]} |")
            continue
        for s in row["stages"]:
            over = " **over EPC, predicted to fit**" if s["over_epc_predicted_to_fit"] else ""
            lines.append(f"| {row['model']} | {row['family']} | {s['stage']} | "
                         f"{s['touched_weight_mib']:.1f} | {s['peak_activation_mib']:.1f} | "
                         f"{s['predicted_mib']:.1f} | {s['measured_mib']:.1f}{over} | "
                         f"{100 * s['error']:+.1f}% | {s['rss_mib']:.0f} |")
    lines.append("")
    if not summary["stage_count"]:
        return "\n".join(lines + ["no stage measured"])
    assumed = summary["assumed"]
    lines.append(f"{summary['stage_count']} stages of {summary['model_count']} models; with the "
                 f"preset's constants (k_w {assumed['weight_factor']:g}, R "
                 f"{assumed['runtime_overhead_mib']:g} MiB; the enclave's L "
                 f"{assumed.get('libos_overhead_mib', 0):g} MiB left out, as a native "
                 f"measurement does not see it): median |predicted - measured| / "
                 f"measured **{100 * summary['median_error']:.1f}%**, worst "
                 f"{100 * summary['worst_error']:.1f}% ({summary['worst_stage']}); "
                 f"{summary['under_predicted_stages']} stage(s) under-predicted; measured "
                 f"above the usable EPC ({assumed['usable_epc_mib']:g} MiB) while predicted to "
                 f"fit: {len(summary['over_epc_predicted_to_fit'])}"
                 + (f" ({', '.join(summary['over_epc_predicted_to_fit'])})"
                    if summary["over_epc_predicted_to_fit"] else "")
                 + (f". Over the {summary['large_stage_count']} stages measured at "
                    f"{summary['large_stage_mib']:g} MiB or more: median "
                    f"{100 * summary['median_error_large']:.1f}%"
                    if summary["median_error_large"] is not None else "")
                 + (f"; zoo {100 * summary['median_error_zoo']:.1f}%"
                    if summary["median_error_zoo"] is not None else "")
                 + (f", exporters {100 * summary['median_error_exporters']:.1f}%"
                    if summary["median_error_exporters"] is not None else "") + ".")
    calibrated = summary.get("calibrated")
    if calibrated:
        held_out = calibrated["median_error_leave_one_model_out"]
        lines.append("")
        lines.append(f"Fitted to these stages: k_w {calibrated['weight_factor']:.4f}, R "
                     f"{calibrated['runtime_overhead_mib']:.2f} MiB: median error "
                     f"{100 * calibrated['median_error_in_sample']:.1f}% (worst "
                     f"{100 * calibrated['worst_error_in_sample']:.1f}%) in sample"
                     + (f" ({100 * calibrated['median_error_large_in_sample']:.1f}% over "
                        f"the stages of {summary['large_stage_mib']:g} MiB or more)"
                        if calibrated["median_error_large_in_sample"] is not None else "")
                     + (f", {100 * held_out:.1f}% (worst "
                        f"{100 * calibrated['worst_error_leave_one_model_out']:.1f}%) with "
                        f"each model predicted from the others' fit" if held_out is not None
                        else "")
                     + f"; measured above the EPC while predicted to fit: "
                       f"{calibrated['over_epc_predicted_to_fit']}.")
    return "\n".join(lines)


def model_markdown(result: dict[str, Any]) -> str:
    """One row per model: its stages' predicted and measured working sets and errors."""
    lines = ["| model | exporter | predicted MiB per stage | measured MiB per stage | "
             "error per stage |", "|---|---|---|---|---|"]
    for row in result["models"]:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['family']} | skipped: "
                         f"{row['skipped'][:90]} | | |")
            continue
        stages = row["stages"]
        lines.append(f"| {row['model']} | {row['family']} | "
                     + ", ".join(f"{s['predicted_mib']:.1f}" for s in stages) + " | "
                     + ", ".join(f"{s['measured_mib']:.1f}"
                                 + (" (over EPC)" if s["over_epc_predicted_to_fit"] else "")
                                 for s in stages) + " | "
                     + ", ".join(f"{100 * s['error']:+.0f}%" for s in stages) + " |")
    return "\n".join(lines)


def render_plot(result: dict[str, Any], path: Path) -> None:
    """Predicted against measured working set per stage, log axes, y = x and the EPC: with
    the preset's constants, and with constants fitted to the other models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    measured_rows = [r for r in result["models"] if "stages" in r]
    stages = [s for r in measured_rows for s in r["stages"]]
    epc = summary["assumed"]["usable_epc_mib"]
    panels: list[tuple[str, list[tuple[float, float, bool]]]] = [(
        f"preset constants (k_w {summary['assumed']['weight_factor']:g}, "
        f"R {summary['assumed']['runtime_overhead_mib']:g} MiB): median error "
        f"{100 * summary.get('median_error', float('nan')):.1f}%",
        [(s["measured_mib"], s["predicted_mib"], s["family"] == "zoo") for s in stages])]
    calibrated = summary.get("calibrated")
    if calibrated:
        points = []
        for row in measured_rows:
            others = [MemorySample(**s) for r in measured_rows if r is not row
                      for s in r["samples"]]
            try:
                fit = fit_memory_constants(others)
            except ValueError:
                continue
            points += [(s.measured_bytes / MIB, fit.predict_bytes(s) / MIB,
                        row["family"] == "zoo")
                       for s in (MemorySample(**x) for x in row["samples"])]
        held_out = calibrated["median_error_leave_one_model_out"]
        panels.append((f"fitted to the other models (leave one model out): median error "
                       f"{100 * held_out:.1f}%" if held_out is not None else "fitted", points))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    values = [v for _title, points in panels for p in points for v in p[:2]] or [1.0]
    low, high = min(values) / 1.5, max(values) * 1.5
    for axis, (title, points) in zip(axes[0], panels):
        for zoo_family, colour, label in ((True, "#4477aa", "zoo"),
                                          (False, "#ee7733", "real exporters")):
            chosen = [p for p in points if p[2] == zoo_family]
            axis.scatter([p[0] for p in chosen], [p[1] for p in chosen], s=18, color=colour,
                         alpha=0.8, label=f"{label} ({len(chosen)} stages)")
        axis.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
        axis.fill_between([low, high], [low / 1.1, high / 1.1], [low * 1.1, high * 1.1],
                          color="grey", alpha=0.15, label="within 10%")
        axis.axvline(epc, color="#cc3311", linestyle=":", label=f"usable EPC {epc:g} MiB")
        axis.axhline(epc, color="#cc3311", linestyle=":")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(low, high)
        axis.set_ylim(low, high)
        axis.set_xlabel("measured working set, MiB (pages touched per inference, native)")
        axis.set_ylabel("predicted working set, MiB (k_w*W + A + R)")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=8, loc="upper left")
    figure.suptitle(f"Working set per stage: predicted vs measured ({summary['stage_count']} "
                    f"stages, dp-throughput --machines {result['machines']}, "
                    f"{result['threads']} threads)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
