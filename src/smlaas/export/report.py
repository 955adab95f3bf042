"""The human-readable report of a build: report.md and report.png."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from smlaas.export.stage_memory import (
    median_working_set_error,
    native_prediction_bytes,
    unmeasured_reason,
)
from smlaas.export.tolerance import NOISE_FACTOR
from smlaas.export.verify import VerificationReport
from smlaas.graph.splitting import SPLIT_NOTE, SplitAxis, SplitOperator
from smlaas.plan.cost_model import MIB
from smlaas.plan.machines import MachinePool
from smlaas.plan.plan import Plan


def prediction_errors(plan: Plan) -> list[float]:
    """|predicted - measured| / measured native time, for stages that were measured."""
    return [abs(s.native_ms - s.measured_native_ms) / s.measured_native_ms
            for s in plan.stages if s.measured_native_ms]


def render_markdown(plan: Plan, *, verification: VerificationReport | None,
                    comparison: list[dict] | None = None, machine: str = "") -> str:
    cm = plan.cost_model
    sgx_label = "predicted by the cost model" if cm.enclave else "no enclave"
    classes = bool(plan.machine_classes)
    budget = (MachinePool(plan.machine_classes).describe() if classes
              else f"{plan.machines or 'unlimited'}")
    lines = [
        f"# smlaas build: {plan.model.name}",
        "",
        f"- source: `{plan.model.source}` (sha256 `{plan.model.sha256[:16]}...`)",
        f"- input shapes: {', '.join(f'{k} {v}' for k, v in plan.model.input_shapes.items())}"
        + (f" (symbolic in the stages: "
           f"{', '.join(f'{k} axis {a}' for k, v in plan.model.dynamic_axes.items() for a in v)})"
           if plan.model.dynamic_axes else ""),
        f"- planner: **{plan.planner}**, cost model **{cm.preset}** (usable EPC "
        f"{cm.usable_epc_mib:g} MiB), fit-epc: {plan.fit_epc}, machines: {budget}",
        f"- nodes: {plan.model.node_count}, stages: {len(plan.stages)}, enclaves (stages times "
        f"replicas): {plan.machine_count}",
        f"- enclave figures are **{sgx_label}**; native times are measured on this machine"
        + (f" ({machine})" if machine else ""),
        "",
        "## Stages",
        "",
        "| stage | nodes | first .. last node | native ms (pred) | native ms (measured) | "
        "enclave ms (predicted) | input MiB | transfer ms (predicted) | weights MiB | "
        "working set MiB (predicted) | working set MiB (measured) | fits EPC | replicas |"
        + (" machine class |" if classes else ""),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|"
        + ("---|" if classes else ""),
    ]
    for s in plan.stages:
        measured = f"{s.measured_native_ms:.2f}" if s.measured_native_ms else "-"
        measured_ws = f"{s.measured.working_set_mib:.1f}" if s.measured is not None else "-"
        fits = plan.fits_epc(s) and plan.measured_fits_epc(s) is not False
        lines.append(
            f"| {s.index} | {s.start}-{s.end - 1} | `{s.first_node}` .. `{s.last_node}` | "
            f"{s.native_ms:.2f} | {measured} | {s.enclave_ms:.2f} | "
            f"{s.input_bytes / MIB:.2f} | {s.transfer_in_ms:.2f} | {s.weight_bytes / MIB:.1f} | "
            f"{s.working_set_mib:.1f} | {measured_ws} | {'yes' if fits else '**no**'} | "
            f"{s.replicas} |" + (f" `{s.machine_class}` |" if classes else ""))
    lines += [
        "",
        f"Predicted end-to-end latency **{plan.latency_ms:.2f} ms**, pipeline throughput "
        f"**{plan.throughput_per_s:.2f} inferences/s** (period {plan.period_ms:.2f} ms), "
        f"on {plan.machine_count} enclave machine(s), largest working set "
        f"{plan.max_working_set_bytes / MIB:.1f} MiB.",
        "",
    ]
    lines += _split_lines(plan)
    lines += _generation_lines(plan)
    lines += _working_set_lines(plan)
    errors = prediction_errors(plan)
    if errors:
        lines += [
            "## Prediction accuracy (native time per stage)",
            "",
            f"Median |predicted - measured| / measured over {len(errors)} stage(s): "
            f"**{100 * statistics.median(errors):.1f}%** (max {100 * max(errors):.1f}%).",
            "",
        ]
    if comparison:
        lines += ["## Planners on the same costs", "",
                  "| planner | stages | machines | replicas per stage | latency ms | "
                  "throughput /s | largest working set MiB |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        for row in comparison:
            if row.get("error"):
                lines.append(f"| {row['planner']} | - | - | - | - | - | "
                             f"infeasible: {row['error']} |")
            else:
                lines.append(f"| {row['planner']} | {row['stages']} | "
                             f"{row.get('machine_count', row['stages'])} | "
                             f"{row.get('layout', '-')} | {row['latency_ms']:.2f} |"
                             f" {row['throughput_per_s']:.2f} | {row['max_working_set_mib']:.1f} |")
        lines.append("")
    if verification is not None:
        lines += ["## Verification", "", verification.summary(), "",
                  "| output | shape | max abs error | max rel error | tolerance | close |",
                  "|---|---|---:|---:|---|:---:|"]
        for o in verification.outputs:
            lines.append(f"| `{o.name}` | {list(o.shape)} | {o.max_abs_error:.3g} | "
                         f"{o.max_rel_error:.3g} | {_table_cell(o.tolerance)} | "
                         f"{'yes' if o.close else '**no**'} |")
        lines += ["", "The verdict uses reference execution (no graph optimisations), where the "
                  "whole model and the chain run identical kernels. With ONNX Runtime's full "
                  "optimisations, fusions differ on either side of a cut; that deviation is "
                  "the last figure of the summary line. Each output is held to the tolerance "
                  "of the least precise float type among itself and the cut tensors it "
                  "depends on: float16/bfloat16 get rtol = 10 eps and atol = 1 eps x "
                  "max|expected|, because ONNX Runtime keeps such intermediates in float32 "
                  "inside one session and rounds them only where they cross a cut. The layers "
                  "after a cut can amplify that rounding, as they amplify any change of "
                  "execution in the whole model, so such outputs get atol at least "
                  f"{NOISE_FACTOR:g} x the whole model's own spread: its largest deviation "
                  "from reference execution under full optimisations, another thread count "
                  "and with every intermediate rounded to its type (the tolerance column "
                  "gives the spread measured).", ""]
    lines += ["![per-node time and memory, cuts and the EPC line](report.png)", ""]
    return "\n".join(lines)


def _table_cell(text: str) -> str:
    """``text`` for a Markdown table cell: its pipes (``max|expected|``) escaped."""
    return text.replace("|", "\\|") or "-"


def _working_set_lines(plan: Plan) -> list[str]:
    """Measured against predicted working set per stage, or why there is no measurement."""
    cm = plan.cost_model
    lines = ["## Working set: predicted and measured", "",
             f"Predicted: `M = k_w*W + A + R + L` with k_w = {cm.weight_factor:g} on the "
             f"weights a stage touches (W), its peak live activations (A), the runtime's R = "
             f"{cm.runtime_overhead_mib:g} MiB and the LibOS's L = "
             f"{cm.libos_overhead_mib:g} MiB (inside an enclave only: a native measurement "
             f"does not see it). "]
    measured = [m for s in plan.stages if (m := s.measured) is not None]
    if not measured:
        return lines[:-1] + [lines[-1] + f"Measured: {unmeasured_reason(plan)}; the "
                             f"prediction stands.", ""]
    first = measured[0]
    lines[-1] += (f"Measured: each stage run natively in its own process as a worker runs "
                  f"it ({first.threads} thread(s)), the pages it touched over "
                  f"{first.inferences} inferences after warm-up ({first.method}; the least "
                  f"of {first.rounds} such counts); RSS "
                  f"also counts what the process loaded and no longer touches.")
    lines += ["", "| stage | touched weights MiB (W) | peak activations MiB (A) | predicted MiB | "
              "of it natively (no L) | measured MiB | error (natively) | RSS MiB | "
              "peak RSS MiB | measured fits EPC |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for s in plan.stages:
        m, native = s.measured, native_prediction_bytes(plan, s)
        if m is None:
            lines.append(f"| {s.index} | {s.touched_weight_bytes / MIB:.1f} | "
                         f"{s.peak_activation_bytes / MIB:.1f} | {s.working_set_mib:.1f} | "
                         f"{native / MIB:.1f} | - | - | - | - | - |")
            continue
        error = (native - m.working_set_bytes) / m.working_set_bytes \
            if m.working_set_bytes else float("nan")
        lines.append(f"| {s.index} | {s.touched_weight_bytes / MIB:.1f} | "
                     f"{s.peak_activation_bytes / MIB:.1f} | {s.working_set_mib:.1f} | "
                     f"{native / MIB:.1f} | {m.working_set_mib:.1f} | {100 * error:+.1f}% | "
                     f"{m.rss_bytes / MIB:.1f} | "
                     f"{m.peak_rss_bytes / MIB:.1f} | "
                     f"{'yes' if plan.measured_fits_epc(s) else '**no**'} |")
    median = median_working_set_error(plan)
    lines += ["", f"Median |predicted - measured| / measured over {len(measured)} stage(s): "
              f"**{100 * (median or 0):.1f}%**.", ""]
    return lines


def split_operators(plan: Plan) -> list[SplitOperator]:
    """The operators split into pieces before planning, as the plan records them."""
    return [SplitOperator.from_dict(s) for s in plan.notes.get(SPLIT_NOTE) or ()]


def _split_lines(plan: Plan) -> list[str]:
    splits = split_operators(plan)
    if not splits:
        return []
    lines = ["## Split operators", "",
             "Operators whose weights alone exceed the usable EPC were rewritten into chains "
             "of pieces before planning; the pieces are ordinary nodes to the planner, and the "
             "transfers between them are charged like any other cut.", "",
             "| operator | op | split along | pieces | weights MiB | largest piece MiB | "
             "bytes between pieces (sum) | stages |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for split in splits:
        along = "K (accumulator)" if split.axis is SplitAxis.REDUCTION else "N (Concat)"
        stages = split.stages(plan.cuts)
        lines.append(f"| `{split.node}` | {split.op_type} | {along} | {split.pieces} | "
                     f"{split.weight_bytes / MIB:.1f} | "
                     f"{split.largest_piece_weight_bytes / MIB:.1f} | "
                     f"{split.transfer_bytes:,} | {', '.join(map(str, stages)) or '-'} |")
    return lines + [""]


def render_plot(plan: Plan, node_ms: np.ndarray, live_bytes: np.ndarray, path: Path) -> None:
    """Three panels: native time per node and memory with the EPC line over node positions
    (cuts as vertical lines, stages shaded and labelled), and per stage its predicted enclave
    time and incoming transfer. Legends sit beside the axes, never over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = plan.cost_model
    positions = np.arange(len(node_ms))
    fig = plt.figure(figsize=(12, 8.5))
    grid = fig.add_gridspec(3, 1, height_ratios=[1.0, 1.0, 0.9], hspace=0.35)
    top = fig.add_subplot(grid[0])
    bottom = fig.add_subplot(grid[1], sharex=top)
    stages_axis = fig.add_subplot(grid[2])
    top.bar(positions, node_ms, width=1.0, color="#4477aa", label="native ms per node")
    top.set_ylabel("native ms per node")
    top.set_title(f"{plan.model.name}: {len(plan.stages)} stage(s) on {plan.machine_count} "
                  f"machine(s) by {plan.planner} ({cm.preset}; enclave figures predicted)",
                  pad=18)
    bottom.plot(positions, live_bytes / MIB, color="#228833", label="live activations")
    for s in plan.stages:
        colour = "#ddcc77" if plan.fits_epc(s) else "#cc6677"
        bottom.hlines(s.working_set_mib, s.start, s.end - 1, colors=colour, linewidth=3,
                      label="stage working set (predicted)" if s.index == 0 else "_nolegend_")
        for axis in (top, bottom):
            axis.axvspan(s.start - 0.5, s.end - 0.5, alpha=0.06 if s.index % 2 else 0.0,
                         color="k")
        label = f"stage {s.index}" + (f" x{s.replicas}" if s.replicas > 1 else "")
        top.text((s.start + s.end - 1) / 2, 1.0, label, transform=top.get_xaxis_transform(),
                 ha="center", va="bottom", fontsize=8)
    for cut in plan.cuts[1:-1]:
        for axis in (top, bottom):
            axis.axvline(cut - 0.5, color="#aa3377", linestyle="--", linewidth=1,
                         label="cut" if axis is bottom and cut == plan.cuts[1] else "_nolegend_")
    if cm.enclave and cm.usable_epc_mib < 1e5:
        bottom.axhline(cm.usable_epc_mib, color="#cc3311", linestyle=":",
                       label=f"usable EPC {cm.usable_epc_mib:g} MiB")
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("node position (topological order)")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    indices = np.arange(len(plan.stages))
    enclave = [s.enclave_ms for s in plan.stages]
    transfer = [s.transfer_in_ms for s in plan.stages]
    stages_axis.bar(indices - 0.2, enclave, 0.4, color="#4477aa",
                    label="enclave ms (predicted)")
    stages_axis.bar(indices + 0.2, transfer, 0.4, color="#ee7733",
                    label="transfer in ms (predicted)")
    for k, (e, t) in enumerate(zip(enclave, transfer)):
        stages_axis.text(k - 0.2, e, f"{e:.1f}", ha="center", va="bottom", fontsize=7)
        stages_axis.text(k + 0.2, t, f"{t:.1f}", ha="center", va="bottom", fontsize=7)
    stages_axis.set_xticks(indices)
    stages_axis.set_xticklabels([f"stage {s.index}" + (f" x{s.replicas}" if s.replicas > 1
                                                       else "") for s in plan.stages])
    stages_axis.set_ylabel("ms per request")
    stages_axis.set_ylim(0, max([*enclave, *transfer, 1e-3]) * 1.25)
    stages_axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.subplots_adjust(left=0.07, right=0.8, top=0.93, bottom=0.06)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _generation_lines(plan: Plan) -> list[str]:
    """A decoder's KV caches: what each stage keeps, and how many sequences of what length
    fit."""
    generation = plan.generation
    if generation is None:
        return []
    lines = ["## Generation: KV caches in the stages", "",
             f"Planned for the decode step: {generation.describe()}; each layer's cache stays "
             f"in the stage that holds the layer (no cut carries one). Whole model, native: "
             f"decode step of {generation.max_sequences} sequence(s) "
             f"{generation.decode_step_ms or 0:.2f} ms, prefill of "
             f"{generation.max_context // 2} tokens {generation.prefill_ms or 0:.2f} ms.", "",
             "| stage | KV caches held | cache MiB | working set MiB (predicted, caches "
             "included) | fits EPC |", "|---:|---|---:|---:|:---:|"]
    for s in plan.stages:
        held = ", ".join(f"`{name}`" for name in s.kv_cache) or "-"
        lines.append(f"| {s.index} | {held} | {s.kv_cache_bytes / MIB:.1f} | "
                     f"{s.working_set_mib:.1f} | {'yes' if plan.fits_epc(s) else '**no**'} |")
    return [*lines, ""]
