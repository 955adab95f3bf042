"""Benchmark: the deployed pipeline (sim backend, local launcher) against plain ONNX Runtime.

Plain ONNX Runtime: the whole model in this process, default session options, the same
intra-op thread count as each stage. Pipeline: partitioned into 1..4 stages, sealed, deployed
locally, called over HTTPS with binary tensors; clients run in this process. Measures:

- latency at batch 1 (p50/p99, one client, requests back to back);
- throughput with 1, 4 and 16 concurrent clients sending batch-1 requests, with dynamic
  batching (up to 8) and without;
- plain ONNX Runtime throughput at batch 1, 2, 4, 8 (the best is the reference);
- optionally (--fault) a 30-second load with 16 clients during which one worker is killed with
  SIGKILL: every request's outcome, the longest wait, and the time until ready again.

    smlaas bench serving --fault --out docs/results/serving.json
    python benchmarks/serving_overhead.py --fault      (the same)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import ssl
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import seal_build
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.profile import ProfileCache, ProfileSettings, machine_id
from smlaas.transport.v2 import encode_infer_request
from smlaas.zoo import build_model

logger = logging.getLogger(__name__)


def plain_session(model_name: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(build_model(model_name).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3}


def plain_latency(session: ort.InferenceSession, x: np.ndarray, runs: int) -> dict[str, float]:
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: x})
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def plain_throughput(session: ort.InferenceSession, x: np.ndarray, batch: int,
                     seconds: float) -> float:
    name = session.get_inputs()[0].name
    stacked = np.concatenate([x] * batch)
    session.run(None, {name: stacked})
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {name: stacked})
        done += batch
    return done / (time.perf_counter() - start)


class Load:
    """``clients`` threads posting the same request back to back until stopped."""

    def __init__(self, url: str, ca: Path, model: str, x: np.ndarray, clients: int) -> None:
        self.url = f"{url}/v2/models/{model}/infer"
        self.context = ssl.create_default_context(cafile=str(ca))
        self.body, self.headers = encode_infer_request({"input": x})
        self.clients = clients
        self.outcomes: list[tuple[int, float, float]] = []  # status, start, seconds
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _client(self) -> None:
        with httpx.Client(verify=self.context, timeout=60.0) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.post(self.url, content=self.body,
                                         headers=self.headers).status_code
                except httpx.HTTPError as err:
                    with self._lock:
                        self.failures.append(repr(err))
                    continue
                with self._lock:
                    self.outcomes.append((status, start, time.perf_counter() - start))

    def run(self, seconds: float, during: list[tuple[float, object]] | None = None) -> None:
        threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        begin = time.perf_counter()
        for thread in threads:
            thread.start()
        for at, action in during or []:
            time.sleep(max(0.0, begin + at - time.perf_counter()))
            action()  # type: ignore[operator]
        time.sleep(max(0.0, begin + seconds - time.perf_counter()))
        self._stop.set()
        for thread in threads:
            thread.join(timeout=90)

    def throughput(self, warmup_s: float, begin: float, end: float) -> float:
        done = [o for o in self.outcomes if o[0] == 200 and o[1] >= begin + warmup_s
                and o[1] + o[2] <= end]
        return len(done) / max(1e-9, end - begin - warmup_s)


def build(model: str, stages: int, root: Path, threads: int) -> tuple[Path, Path]:
    path = root / f"{model}-{stages}"
    options = PlanOptions(Planner.SINGLE, None, False) if stages == 1 else \
        PlanOptions(Planner.DP_THROUGHPUT, stages, False)
    partition(model, path, cost_model=preset("sgx1"), options=options,
              settings=ProfileSettings(threads=threads, warmup_runs=2, measured_runs=5),
              cache=ProfileCache(), verify=False)
    got = len(read_plan(path).stages)
    if got != stages:
        logger.warning("the planner chose %d stages for K=%d", got, stages)
    keys = root / f"{model}-{stages}.keys"
    seal_build(path, keys)
    return path, keys


def deploy_settings(build_dir: Path, keys: Path, root: Path, *, threads: int, batching: bool,
                    **overrides: Any) -> DeploySettings:
    owner_key = root / "owner.key"
    OwnerKey.load_or_create(owner_key)
    return DeploySettings(build_dir=build_dir, keys_path=keys,
                          state_dir=root / f"state-{free_port()}", owner_key_path=owner_key,
                          port=free_port(), threads=threads,
                          max_batch_size=None if batching else 0, max_queue_delay_us=500,
                          **overrides)


def deploy(build_dir: Path, keys: Path, root: Path, threads: int, batching: bool
           ) -> Deployment:
    settings = deploy_settings(build_dir, keys, root, threads=threads, batching=batching)
    return Deployment(settings, LocalLauncher(settings.state_dir / "logs"))


def paired_latency(session: ort.InferenceSession, dep: Deployment, x: np.ndarray,
                   runs: int, blocks: int = 5) -> tuple[dict[str, float], dict[str, float]]:
    """Batch-1 latency of plain ONNX Runtime and of the pipeline, measured in alternating
    blocks (this VM has slow periods of seconds; alternating spreads them over both). Blocks
    are separated by a pause so that neither side's idle threads disturb the other."""
    load = Load(dep.url, dep.ca_path, dep.model_name, x, 1)
    name = session.get_inputs()[0].name
    plain, piped = [], []
    with httpx.Client(verify=load.context, timeout=60) as client:
        for _ in range(5):
            session.run(None, {name: x})
            client.post(load.url, content=load.body, headers=load.headers)
        for _ in range(blocks):
            time.sleep(0.5)
            for _ in range(runs // blocks):
                start = time.perf_counter()
                session.run(None, {name: x})
                plain.append(time.perf_counter() - start)
            time.sleep(0.5)
            for _ in range(runs // blocks):
                start = time.perf_counter()
                response = client.post(load.url, content=load.body, headers=load.headers)
                piped.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
    return percentiles(plain), percentiles(piped)


def pipeline_throughput(dep: Deployment, x: np.ndarray, clients: int, seconds: float
                        ) -> float:
    load = Load(dep.url, dep.ca_path, dep.model_name, x, clients)
    begin = time.perf_counter()
    load.run(seconds)
    return load.throughput(min(1.0, seconds / 4), begin, begin + seconds)


def fault_run(dep: Deployment, x: np.ndarray, victim: str, seconds: float = 30.0) -> dict:
    load = Load(dep.url, dep.ca_path, dep.model_name, x, 16)
    launcher = dep.launcher
    assert isinstance(launcher, LocalLauncher)
    marks: dict[str, float] = {}

    def kill() -> None:
        marks["killed"] = time.perf_counter()
        os.kill(launcher.pid(victim), signal.SIGKILL)

    def watch_ready() -> None:
        marks["ready_after_s"] = dep.wait_ready(timeout_s=20.0) + (
            time.perf_counter() - marks["killed"])

    load.run(seconds, during=[(10.0, kill), (10.05, watch_ready)])
    statuses = Counter(str(o[0]) for o in load.outcomes)
    return {"victim": victim, "requests": len(load.outcomes), "statuses": dict(statuses),
            "transport_failures": len(load.failures),
            "longest_request_s": max(o[2] for o in load.outcomes),
            "ready_again_after_kill_s": marks.get("ready_after_s")}


def run_serving_benchmark(*, model: str, stages: list[int], threads: int,
                          stage_threads: int | None, seconds: float, runs: int, fault: bool,
                          say: Callable[[str], None] = print) -> dict:
    """Plain ONNX Runtime, then the pipeline at each stage count; see the module docstring."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    session = plain_session(model, threads)
    plain = {"latency": plain_latency(session, x, runs),
             "throughput": {str(b): plain_throughput(session, x, b, seconds)
                            for b in (1, 2, 4, 8)}}
    say(f"plain ORT: {plain}")
    results: dict = {"model": model, "threads": threads, "stage_threads": stage_threads or threads,
                     "machine": {"id": machine_id(), "cpu": platform.processor(),
                                 "cores": os.cpu_count(), "onnxruntime": ort.__version__},
                     "plain_onnxruntime": plain, "pipelines": []}
    with tempfile.TemporaryDirectory(prefix="smlaas-bench-") as tmp:
        root = Path(tmp)
        for count in stages:
            build_dir, keys = build(model, count, root, threads)
            entry: dict = {"stages": len(read_plan(build_dir).stages)}
            for batching in (True, False):
                with deploy(build_dir, keys, root, stage_threads or threads, batching) as dep:
                    mode = "batching" if batching else "no_batching"
                    if batching:
                        entry["deploy_to_ready_s"] = dep.ready_s
                        entry["plain_latency"], entry["latency"] = paired_latency(
                            session, dep, x, runs)
                    entry[mode] = {str(c): pipeline_throughput(dep, x, c, seconds)
                                   for c in (1, 4, 16)}
                    if batching and fault and count >= 3:
                        entry["fault"] = fault_run(dep, x, "stage-1")
            say(f"{count} stage(s): {entry}")
            results["pipelines"].append(entry)
    return results


def main(argv: list[str] | None, *, say: Callable[[str], None]) -> None:
    """Runs the benchmark; ``say`` shows its progress and tables (the CLI's echo)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--stage-threads", type=int, default=None,
                        help="ONNX Runtime threads per stage (default: --threads)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput point")
    parser.add_argument("--runs", type=int, default=50, help="latency samples")
    parser.add_argument("--fault", action="store_true", help="also run the SIGKILL scenario")
    parser.add_argument("--pin", action="store_true",
                        help="instead: the design's setting, each stage replica on its own core "
                             "(see smlaas.bench.pinned)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default docs/results/serving.json, or "
                             "serving-pinned.json with --pin)")
    args = parser.parse_args(argv)
    if args.pin:
        from smlaas.bench.pinned import markdown as pinned_markdown
        from smlaas.bench.pinned import run_pinned_benchmark

        pinned = run_pinned_benchmark(model=args.model, seconds=args.seconds / 2,
                                      runs=args.runs)
        out = args.out or Path("docs/results/serving-pinned.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(pinned, indent=2))
        say(pinned_markdown(pinned))
        return
    args.out = args.out or Path("docs/results/serving.json")
    results = run_serving_benchmark(
        model=args.model, stages=[int(s) for s in args.stages.split(",")],
        threads=args.threads, stage_threads=args.stage_threads, seconds=args.seconds,
        runs=args.runs, fault=args.fault)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    say(markdown(results))


def markdown(results: dict) -> str:
    plain = results["plain_onnxruntime"]
    best = max(plain["throughput"].values())
    best_batch = max(plain["throughput"], key=lambda b: plain["throughput"][b])
    lines = [f"plain ONNX Runtime alone: p50 {plain['latency']['p50_ms']:.1f} ms, p99 "
             f"{plain['latency']['p99_ms']:.1f} ms at batch 1; best throughput "
             f"{best:.1f}/s (batch {best_batch})", "",
             "| stages | p50 ms | p99 ms | plain p50 ms (paired) | p50 / plain | 1 client /s | "
             "4 clients /s | 16 clients /s | 16 clients / best plain | 16 clients, no batching /s |"
             " ready s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in results["pipelines"]:
        lat, tput, nob = entry["latency"], entry["batching"], entry["no_batching"]
        paired = entry["plain_latency"]["p50_ms"]
        lines.append(f"| {entry['stages']} | {lat['p50_ms']:.1f} | {lat['p99_ms']:.1f} | "
                     f"{paired:.1f} | {lat['p50_ms'] / paired:.2f} | {tput['1']:.1f} | "
                     f"{tput['4']:.1f} | {tput['16']:.1f} | {tput['16'] / best:.2f} | "
                     f"{nob['16']:.1f} | {entry['deploy_to_ready_s']:.1f} |")
    for entry in results["pipelines"]:
        if "fault" in entry:
            lines += ["", f"SIGKILL of a worker under 16 clients ({entry['stages']} stages): "
                          f"{json.dumps(entry['fault'])}"]
    return "\n".join(lines)

