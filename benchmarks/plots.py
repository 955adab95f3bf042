"""Plots for docs/BENCHMARKS.md from the JSON results in docs/results.

    python benchmarks/plots.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path("docs/results")


def serving_plot(out: Path) -> None:
    data = json.loads((RESULTS / "serving.json").read_text())
    best = max(data["plain_onnxruntime"]["throughput"].values())
    stages = [p["stages"] for p in data["pipelines"]]
    latency = [p["latency"]["p50_ms"] / p["plain_latency"]["p50_ms"] for p in data["pipelines"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(stages, latency, "o-", label="pipeline p50 / plain ORT p50")
    left.axhline(1.10, color="red", linestyle="--", label="target 1.10")
    left.axhline(1.0, color="grey", linewidth=0.5)
    left.set_xlabel("stages (processes, sharing 2 cores)")
    left.set_ylabel("latency ratio at batch 1")
    left.set_xticks(stages)
    left.set_ylim(0.9, max(max(latency), 1.10) * 1.08)
    left.legend()
    for clients in ("1", "4", "16"):
        right.plot(stages, [p["batching"][clients] / best for p in data["pipelines"]], "o-",
                   label=f"{clients} clients, batching")
    right.plot(stages, [p["no_batching"]["16"] / best for p in data["pipelines"]], "x--",
               label="16 clients, no batching")
    right.axhline(0.9, color="red", linestyle="--", label="target 0.9")
    right.set_xticks(stages)
    right.set_ylim(0, 1.1)
    right.set_xlabel("stages")
    right.set_ylabel("throughput / best plain ORT")
    right.legend(fontsize=8)
    figure.suptitle(f"{data['model']}: deployed pipeline (sim backend) vs plain ONNX Runtime, "
                    f"measured")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def planners_plot(out: Path) -> None:
    """Each planner's predicted latency over the best one's, per model (1 = the best): where
    the planners differ, and by how much; and dp-replicas' throughput over dp-throughput's at
    each K."""
    rows = json.loads((RESULTS / "planners.json").read_text())
    planners = ["greedy-epc", "seed-bruteforce", "single", "dp-latency"]
    figure, axes = plt.subplots(2, 2, figsize=(13, 8))
    for column, name in enumerate(("sgx1", "sgx2")):
        chosen = [r for r in rows if r["preset"] == name and "latency_ms" in r]
        models = list(dict.fromkeys(r["model"] for r in chosen))
        axis = axes[0][column]
        width = 0.8 / len(planners)
        highest = 1.0
        for k, planner in enumerate(planners):
            ratios = []
            for model in models:
                found = {r["planner"]: r["latency_ms"] for r in chosen if r["model"] == model}
                best = min(found.values())
                ratios.append(found.get(planner, float("nan")) / best)
            highest = max([highest, *(r for r in ratios if r == r)])
            axis.bar([i + k * width for i in range(len(models))], ratios, width, label=planner)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_ylim(0.9, max(1.25, highest * 1.1))
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
        axis.set_xticklabels(models, rotation=60, fontsize=7)
        axis.set_ylabel("latency / best planner's (PREDICTED)")
        axis.set_title(f"{name}: latency relative to the best plan")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axis = axes[1][column]
        by = {(r["model"], r["planner"]): r.get("throughput_k", {}) for r in rows
              if r["preset"] == name}
        for k_index, machines in enumerate(("2", "4", "8", "16")):
            ratios = []
            for model in models:
                mine = by.get((model, "dp-replicas"), {}).get(machines)
                theirs = by.get((model, "dp-throughput"), {}).get(machines)
                ratios.append(mine["throughput_per_s"] / theirs["throughput_per_s"]
                              if mine and theirs else float("nan"))
            axis.bar([i + k_index * 0.2 for i in range(len(models))], ratios, 0.2,
                     label=f"K = {machines}")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([i + 0.3 for i in range(len(models))])
        axis.set_xticklabels(models, rotation=60, fontsize=7)
        axis.set_ylabel("dp-replicas / dp-throughput (PREDICTED)")
        axis.set_title(f"{name}: throughput of dp-replicas over dp-throughput")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def pinned_plot(out: Path) -> None:
    """The pinned serving run against its targets (ratios to plain ONNX Runtime on 1 core)."""
    data = json.loads((RESULTS / "serving-pinned.json").read_text())
    plain_cpu = data["plain"]["cpu_s_per_request"]
    measures = [("8-client throughput", lambda e: e["throughput"]["8"]["per_s"]
                 / e["plain_per_s_alternating"], 1.8, "at least"),
                ("batch-1 p50 latency", lambda e: e["latency"]["p50_ms"]
                 / e["plain_latency"]["p50_ms"], 1.15, "at most"),
                ("CPU per request", lambda e: e["throughput"]["8"]["cpu_s_per_request"]
                 / plain_cpu, 1.10, "at most")]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4))
    for axis, (title, measure, target, sense) in zip(axes, measures):
        labels = [e["setup"].split(",")[0] for e in data["setups"]]
        values = [measure(e) for e in data["setups"]]
        axis.bar(labels, values, color=["#4477aa", "#66ccee"])
        axis.axhline(target, color="red", linestyle="--", label=f"target: {sense} {target}")
        axis.axhline(1.0, color="grey", linewidth=0.6)
        axis.set_ylim(0, max(max(values), target) * 1.2)
        for x, value in enumerate(values):
            axis.text(x, value, f"{value:.2f}", ha="center", va="bottom", fontsize=9)
        axis.set_title(f"{title} / plain", fontsize=10)
        axis.tick_params(axis="x", labelsize=8)
        axis.legend(fontsize=8, loc="upper right")
    figure.suptitle(f"{data['model']}, a core per enclave (deploy --pin), measured on "
                    f"{data['cores']} cores")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    serving_plot(Path("docs/serving.png"))
    planners_plot(Path("docs/planners.png"))
    pinned_plot(Path("docs/serving-pinned.png"))
    print("wrote docs/serving.png, docs/planners.png and docs/serving-pinned.png")
