"""Benchmark in the design's setting: one machine per enclave, modelled by pinning each stage
replica to its own core (``smlaas bench serving --pin``).

Side by side in one run, ResNet-50 (by default) at batch 1:

- plain ONNX Runtime, 1 intra-op thread on 1 core (the single machine), in this process;
- a 2-stage pipeline, each stage pinned to its own core with 1 thread (two machines);
- 1 stage with 2 replicas, each pinned to its own core with 1 thread (two machines,
  replicated).

For each deployment: batch-1 latency (paired with plain ONNX Runtime in alternating blocks),
throughput under 1, 4 and 8 clients (the 8-client figure the median of alternating blocks with
plain ONNX Runtime's), and the CPU cost per request: core-seconds of every smlaas process
(coordinator, workers, gateway) over the requests they served, against plain ONNX Runtime's
core-seconds per request. The clients run in this process, unpinned, as does the gateway: on a
2-core machine they share the stages' cores, which the results say.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from smlaas.bench.serving import Load, deploy_settings, percentiles
from smlaas.deploy.deployment import Deployment
from smlaas.deploy.launchers import LocalLauncher
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import seal_build
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings, machine_id
from smlaas.zoo import build_model

CLIENTS = (1, 4, 8)
_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


class PinnedPlain:
    """Plain ONNX Runtime, 1 thread, run on a thread pinned to one core."""

    def __init__(self, model: str, core: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(build_model(model).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        self.core = core

    def measure(self, x: np.ndarray, *, seconds: float = 0.0, runs: int = 0
                ) -> dict[str, Any]:
        """Back-to-back batch-1 runs for ``seconds`` (or ``runs`` of them) on the core."""
        result: dict[str, Any] = {}

        def work() -> None:
            os.sched_setaffinity(0, {self.core})
            self.session.run(None, {self.name: x})
            samples: list[float] = []
            cpu0, start = time.thread_time(), time.perf_counter()
            while (runs and len(samples) < runs) or \
                    (seconds and time.perf_counter() - start < seconds):
                begin = time.perf_counter()
                self.session.run(None, {self.name: x})
                samples.append(time.perf_counter() - begin)
            elapsed = time.perf_counter() - start
            result.update(samples=samples, per_s=len(samples) / elapsed,
                          cpu_s_per_request=(time.thread_time() - cpu0) / len(samples))

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return result


def _build(model: str, root: Path, *, stages: int) -> tuple[Path, Path]:
    """Stages balanced on *native* time (the ``native`` cost model): these machines have no
    EPC, so a plan balanced for sgx1's paging would leave one pinned core idle part of the
    time."""
    path = root / f"{model}-{stages}"
    options = PlanOptions(Planner.SINGLE, None, False) if stages == 1 else \
        PlanOptions(Planner.DP_THROUGHPUT, stages, False)
    partition(model, path, cost_model=preset("native"), options=options,
              settings=ProfileSettings(threads=1, warmup_runs=2, measured_runs=5),
              cache=ProfileCache(), verify=False)
    keys = root / f"{model}-{stages}.keys"
    seal_build(path, keys)
    return path, keys


def _smlaas_cpu(dep: Deployment) -> float:
    launcher = dep.launcher
    assert isinstance(launcher, LocalLauncher)
    return sum(process_cpu_seconds(pid) for pid in launcher.pids().values())


def _throughput(dep: Deployment, x: np.ndarray, clients: int, seconds: float
                ) -> dict[str, float]:
    load = Load(dep.url, dep.ca_path, dep.model_name, x, clients)
    cpu0 = _smlaas_cpu(dep)
    begin = time.perf_counter()
    load.run(seconds)
    served = sum(1 for o in load.outcomes if o[0] == 200)
    return {"per_s": load.throughput(min(1.0, seconds / 4), begin, begin + seconds),
            "cpu_s_per_request": (_smlaas_cpu(dep) - cpu0) / max(1, served),
            "errors": len(load.outcomes) - served + len(load.failures)}


def _paired_latency(plain: PinnedPlain, dep: Deployment, x: np.ndarray, runs: int,
                    blocks: int = 4) -> tuple[dict[str, float], dict[str, float]]:
    load = Load(dep.url, dep.ca_path, dep.model_name, x, 1)
    plain_samples, piped = [], []
    with httpx.Client(verify=load.context, timeout=60) as client:
        for _ in range(3):
            client.post(load.url, content=load.body, headers=load.headers)
        for _ in range(blocks):
            plain_samples += plain.measure(x, runs=runs // blocks)["samples"]
            time.sleep(0.3)
            for _ in range(runs // blocks):
                start = time.perf_counter()
                response = client.post(load.url, content=load.body, headers=load.headers)
                piped.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
            time.sleep(0.3)
    return percentiles(plain_samples), percentiles(piped)


def run_pinned_benchmark(*, model: str = "resnet50", seconds: float = 6.0, runs: int = 40,
                         blocks: int = 3, say: Callable[[str], None] = print
                         ) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError("--pin needs at least 2 cores")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    plain = PinnedPlain(model, cores[0])
    alone = plain.measure(x, seconds=seconds)
    say(f"plain ONNX Runtime, 1 thread on core {cores[0]}: {alone['per_s']:.2f}/s, "
        f"{alone['cpu_s_per_request'] * 1e3:.1f} ms CPU per request")
    results: dict[str, Any] = {
        "model": model, "cores": len(cores),
        "machine": {"id": machine_id(), "cpu": platform.processor(),
                    "onnxruntime": ort.__version__},
        "plain": {"per_s": alone["per_s"], "cpu_s_per_request": alone["cpu_s_per_request"],
                  "latency": percentiles(alone["samples"])},
        "setups": []}
    setups = [("2-stage pipeline, a core per stage", 2, None),
              ("1 stage x 2 replicas, a core per replica", 1, {0: 2})]
    with tempfile.TemporaryDirectory(prefix="smlaas-bench-pin-") as tmp:
        root = Path(tmp)
        for label, stages, replicas in setups:
            build_dir, keys = _build(model, root, stages=stages)
            settings = deploy_settings(build_dir, keys, root, threads=1, batching=True,
                                       replicas=replicas, pin=True)
            with Deployment(settings, LocalLauncher(settings.state_dir / "logs"),
                            progress=say) as dep:
                entry: dict[str, Any] = {
                    "setup": label, "stages": len(read_plan(build_dir).stages),
                    "replicas": dep.replicas, "max_batch_size": dep.max_batch_size}
                entry["plain_latency"], entry["latency"] = _paired_latency(
                    plain, dep, x, runs)
                entry["throughput"] = {str(c): _throughput(dep, x, c, seconds)
                                       for c in CLIENTS[:-1]}
                alternating: list[dict[str, float]] = []
                plain_blocks: list[float] = []
                for _ in range(blocks):
                    plain_blocks.append(plain.measure(x, seconds=seconds / 2)["per_s"])
                    alternating.append(_throughput(dep, x, CLIENTS[-1], seconds))
                entry["throughput"][str(CLIENTS[-1])] = {
                    "per_s": statistics.median(a["per_s"] for a in alternating),
                    "cpu_s_per_request": statistics.median(a["cpu_s_per_request"]
                                                           for a in alternating),
                    "errors": sum(int(a["errors"]) for a in alternating),
                    "blocks": alternating}
                entry["plain_per_s_alternating"] = statistics.median(plain_blocks)
            say(f"{label}: {summary_line(entry, results['plain'])}")
            results["setups"].append(entry)
    return results


def summary_line(entry: dict[str, Any], plain: dict[str, Any]) -> str:
    top = entry["throughput"][str(CLIENTS[-1])]
    return (f"8 clients {top['per_s']:.2f}/s = "
            f"{top['per_s'] / entry['plain_per_s_alternating']:.2f}x plain 1-core; "
            f"batch-1 p50 {entry['latency']['p50_ms']:.1f} ms = "
            f"{entry['latency']['p50_ms'] / entry['plain_latency']['p50_ms']:.2f}x plain; "
            f"CPU per request {top['cpu_s_per_request'] / plain['cpu_s_per_request']:.2f}x "
            f"plain")


def markdown(results: dict[str, Any]) -> str:
    plain = results["plain"]
    lines = [f"plain ONNX Runtime, 1 thread on 1 core: {plain['per_s']:.2f}/s, p50 "
             f"{plain['latency']['p50_ms']:.1f} ms, {plain['cpu_s_per_request'] * 1e3:.1f} ms "
             f"CPU per request", "",
             "| setup | p50 ms (plain, paired) | p50 / plain | 1 client /s | 4 clients /s | "
             "8 clients /s (plain 1-core, alternating) | 8 clients / plain | CPU per request "
             "/ plain | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in results["setups"]:
        tput = entry["throughput"]
        top = tput[str(CLIENTS[-1])]
        alt = entry["plain_per_s_alternating"]
        lines.append(
            f"| {entry['setup']} | {entry['latency']['p50_ms']:.1f} "
            f"({entry['plain_latency']['p50_ms']:.1f}) | "
            f"{entry['latency']['p50_ms'] / entry['plain_latency']['p50_ms']:.2f} | "
            f"{tput['1']['per_s']:.2f} | {tput['4']['per_s']:.2f} | {top['per_s']:.2f} "
            f"({alt:.2f}) | {top['per_s'] / alt:.2f} | "
            f"{top['cpu_s_per_request'] / plain['cpu_s_per_request']:.2f} | "
            f"{sum(int(t['errors']) for t in tput.values())} |")
    return "\n".join(lines)
