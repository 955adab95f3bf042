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
    left.legend()
    for clients in ("1", "4", "16"):
        right.plot(stages, [p["batching"][clients] / best for p in data["pipelines"]], "o-",
                   label=f"{clients} clients, batching")
    right.plot(stages, [p["no_batching"]["16"] / best for p in data["pipelines"]], "x--",
               label="16 clients, no batching")
    right.axhline(0.9, color="red", linestyle="--", label="target 0.9")
    right.set_xlabel("stages")
    right.set_ylabel("throughput / best plain ORT")
    right.legend(fontsize=8)
    figure.suptitle(f"{data['model']}: deployed pipeline (sim backend) vs plain ONNX Runtime, "
                    f"measured")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def planners_plot(out: Path) -> None:
    rows = json.loads((RESULTS / "planners.json").read_text())
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for axis, name in zip(axes, ("sgx1", "sgx2")):
        chosen = [r for r in rows if r["preset"] == name and "latency_ms" in r]
        models = sorted({r["model"] for r in chosen}, key=[r["model"] for r in chosen].index)
        planners = ["dp-latency", "greedy-epc", "seed-bruteforce", "single"]
        width = 0.2
        for k, planner in enumerate(planners):
            values = [next((r["latency_ms"] for r in chosen if r["model"] == m and
                            r["planner"] == planner), 0) for m in models]
            axis.bar([i + k * width for i in range(len(models))], values, width,
                     label=planner)
        axis.set_yscale("log")
        axis.set_xticks([i + 1.5 * width for i in range(len(models))])
        axis.set_xticklabels(models, rotation=60, fontsize=7)
        axis.set_ylabel("PREDICTED latency ms (log)")
        axis.set_title(f"{name} cost model (predicted)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    serving_plot(Path("docs/serving.png"))
    planners_plot(Path("docs/planners.png"))
    print("wrote docs/serving.png and docs/planners.png")
