"""Benchmark: what the gateway adds to one request, per protocol, against plain ONNX Runtime.

The model is deployed as ONE stage (sim backend, local launcher, dynamic batching off), so a
request's time through the gateway is: client encode, HTTPS or gRPC over TLS, the gateway's
decode and checks, one mutual-TLS hop to the worker and back, the worker's run of the whole
model, and the way back. Plain ONNX Runtime runs the same model in this process with the same
thread count. Paths are measured side by side in alternating blocks (this VM has slow periods
of seconds; alternating spreads them over every path), each block after a pause:

- ``plain``        ``session.run`` in this process;
- ``rest_binary``  ``POST .../infer`` with Triton's binary tensor extension (httpx);
- ``rest_json``    the same with JSON tensors;
- ``grpc``         ``tritonclient.grpc`` ``infer`` (raw contents).

Server side (issue 18: at most :data:`SERVER_SIDE_TARGET_MS` per request): after every request
of a served path the gateway's ``/metrics`` are read, and the request's own figures are the
differences from the previous reading (one request at a time, so nothing else is in them):

- ``gateway``: ``smlaas_request_duration_seconds`` of the path's protocol, from the request's
  arrival at the gateway's handler to its response being ready (Triton's ``success``);
- ``stage``: ``smlaas_stage_duration_seconds``, the stages' own runs (the ``stage_ms`` the
  worker reports, timed around its run of the session);
- ``pipeline``: ``nv_inference_compute_infer_duration_us`` (Triton's ``compute_infer``): the
  batcher's wait for the pipeline, i.e. the hop to the stage and back plus the stage's run.

``server_side = gateway - stage`` (the gateway plus one hop), split into ``hop = pipeline -
stage`` and ``front_end = gateway - pipeline`` (body, decoding, checks, queue, encoding). After
the deployment stops, the transport alone (:mod:`~smlaas.bench.transport_floor`: the same
messages over the same mutual TLS to an echo process) shows what of the hop is moving bytes.

    smlaas bench gateway --out docs/results/gateway.json

With ``--compare-threads`` instead: the demo's plan (ResNet-50 in 3 stages, batching as
sealed) deployed three times at once, with the default threads per stage (this machine's cores
shared out, :func:`~smlaas.deploy.topology.shared_machine_threads`) and with ``--threads`` 1
and 2, each loaded by 4 gRPC clients in alternating blocks (:func:`run_threads_comparison`).

    smlaas bench gateway --compare-threads --out docs/results/gateway-threads.json
"""

from __future__ import annotations

import contextlib
import os
import platform
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from smlaas.bench.serving import build, percentiles, plain_session
from smlaas.bench.transport_floor import floor_lines, transport_round_trip
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.deploy.topology import shared_machine_threads
from smlaas.errors import DeployError
from smlaas.partition import default_threads
from smlaas.profile import machine_id
from smlaas.transport.v2 import encode_infer_request

PATHS = ("plain", "rest_binary", "rest_json", "grpc")
PROTOCOL_LABEL = {"rest_binary": "rest", "rest_json": "rest", "grpc": "grpc"}
"""The ``protocol`` label of the gateway's request metrics for each served path."""
SERVER_SIDE_TARGET_MS = 1.0
"""Issue 18: the gateway plus one hop may cost at most this per request (mean), over the
stage's own run, for a ResNet-50 input at batch 1, on the paths in TARGET_PATHS."""
TARGET_PATHS = ("rest_binary", "grpc")
"""The paths the target is for (JSON tensors are measured, not held to it)."""
COMPARED_THREADS: tuple[int | None, ...] = (None, 1, 2)
"""``--compare-threads``: the default (None: the local launcher shares the cores out) against
these explicit ``--threads``."""
WITHIN_BEST = 0.10
"""The default passes when its throughput is within this fraction of the best setting's."""
DEPLOY_ATTEMPTS = 3
"""A port chosen free can be taken (e.g. as a client connection's local port) before the role
listens on it; the deployment then fails and is tried again on new ports."""


# -- server-side figures from the gateway's /metrics ------------------------------------------
@dataclass(frozen=True)
class ServerCounters:
    """The gateway's cumulative figures for one protocol, as ``/metrics`` shows them (or the
    difference of two readings: one request's, or one block's)."""

    requests: int
    """``smlaas_request_duration_seconds_count`` of the protocol."""
    gateway_s: float
    """``smlaas_request_duration_seconds_sum``: arrival at the gateway to response ready."""
    stage_runs: int
    """``smlaas_stage_duration_seconds_count``, all stages."""
    stage_s: float
    """``smlaas_stage_duration_seconds_sum``, all stages: the stages' own runs."""
    pipeline_us: float
    """``nv_inference_compute_infer_duration_us``: the hop(s) and the stages' runs."""

    @classmethod
    def from_metrics(cls, text: str, *, model: str, protocol: str) -> ServerCounters:
        """The figures in a ``/metrics`` answer (Prometheus text). Names absent count 0 (a
        histogram appears with its first observation)."""
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if labels.get("model") != model or (
                        "protocol" in labels and labels["protocol"] != protocol):
                    continue
                # The parser names counters *_total, Triton's text does not: one name for both.
                name = sample.name.removesuffix("_total")
                values[name] = values.get(name, 0.0) + sample.value
        return cls(requests=int(values.get("smlaas_request_duration_seconds_count", 0)),
                   gateway_s=values.get("smlaas_request_duration_seconds_sum", 0.0),
                   stage_runs=int(values.get("smlaas_stage_duration_seconds_count", 0)),
                   stage_s=values.get("smlaas_stage_duration_seconds_sum", 0.0),
                   pipeline_us=values.get("nv_inference_compute_infer_duration_us", 0.0))

    def minus(self, before: ServerCounters) -> ServerCounters:
        return ServerCounters(self.requests - before.requests, self.gateway_s - before.gateway_s,
                              self.stage_runs - before.stage_runs, self.stage_s - before.stage_s,
                              self.pipeline_us - before.pipeline_us)

    @property
    def server_side_ms(self) -> float:
        """The gateway plus the hop(s), over the stages' own runs."""
        return (self.gateway_s - self.stage_s) * 1e3

    @property
    def hop_ms(self) -> float:
        return self.pipeline_us / 1e3 - self.stage_s * 1e3

    @property
    def front_end_ms(self) -> float:
        return self.gateway_s * 1e3 - self.pipeline_us / 1e3


def server_side_summary(per_request: list[ServerCounters], *, judged: bool = True
                        ) -> dict[str, Any]:
    """Mean (the figure against the target) and percentiles of the server-side cost, and the
    means of its parts, over single-request differences; ``target_met`` is None unless
    ``judged``. ValueError when a difference is not exactly one request (something else ran
    through the gateway)."""
    if not per_request:
        raise ValueError("no server-side samples")
    stray = [c for c in per_request if c.requests != 1 or c.stage_runs < 1]
    if stray:
        raise ValueError(f"{len(stray)} of {len(per_request)} readings of /metrics are not one "
                         f"request each (e.g. {stray[0]}): another client used the gateway")
    count = len(per_request)
    costs = sorted(c.server_side_ms for c in per_request)
    mean_ms = sum(costs) / count
    return {"requests": count, "mean_ms": mean_ms, "p50_ms": statistics.median(costs),
            "p99_ms": costs[min(count - 1, int(count * 0.99))],
            "gateway_mean_ms": sum(c.gateway_s for c in per_request) * 1e3 / count,
            "stage_mean_ms": sum(c.stage_s for c in per_request) * 1e3 / count,
            "hop_mean_ms": sum(c.hop_ms for c in per_request) / count,
            "front_end_mean_ms": sum(c.front_end_ms for c in per_request) / count,
            "target_ms": SERVER_SIDE_TARGET_MS,
            "target_met": mean_ms <= SERVER_SIDE_TARGET_MS if judged else None}


# -- the gateway overhead per protocol ---------------------------------------------------------
def run_gateway_benchmark(*, model: str = "resnet50", threads: int = 1, runs: int = 60,
                          blocks: int = 6, say: Callable[[str], None] = print
                          ) -> dict[str, Any]:
    """Client latency per path against plain ONNX Runtime, and the server-side cost per served
    path (see the module docstring), ``runs`` requests per path in ``blocks`` rounds."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    session = plain_session(model, threads)
    with tempfile.TemporaryDirectory(prefix="smlaas-bench-gateway-") as tmp:
        root = Path(tmp)
        say(f"building {model} as one stage")
        build_dir, keys = build(model, 1, root, threads)
        with _deployed(build_dir, keys, root, "one-stage", say=say, threads=threads,
                       max_batch_size=0) as dep:
            say(f"deployed {model} as one stage at {dep.url} (gRPC {dep.grpc_address})")
            samples, server = _interleaved(session, dep, x, runs=runs, blocks=blocks, say=say)
    results: dict[str, Any] = {
        "model": model, "threads": threads, "runs_per_path": runs, "blocks": blocks,
        "machine": _machine(),
        "latency": {path: percentiles(samples[path]) for path in PATHS}}
    plain_p50 = results["latency"]["plain"]["p50_ms"]
    results["overhead_ms"] = {path: results["latency"][path]["p50_ms"] - plain_p50
                              for path in PATHS[1:]}
    results["ratio"] = {path: results["latency"][path]["p50_ms"] / plain_p50
                        for path in PATHS[1:]}
    results["server_side"] = {path: server_side_summary(server[path],
                                                        judged=path in TARGET_PATHS)
                              for path in PATHS[1:]}
    results["server_side_ms"] = {path: results["server_side"][path]["mean_ms"]
                                 for path in PATHS[1:]}
    results["server_side_target_ms"] = SERVER_SIDE_TARGET_MS
    say("timing the transport alone (an echo process over the same mutual TLS)")
    results["transport_floor"] = transport_round_trip({"input": x}, reply_bytes=4000)
    say(markdown(results))
    return results


def _interleaved(session: ort.InferenceSession, dep: Deployment, x: np.ndarray, *, runs: int,
                 blocks: int, say: Callable[[str], None]
                 ) -> tuple[dict[str, list[float]], dict[str, list[ServerCounters]]]:
    """Client latency per path (seconds) and, per served path, each request's server-side
    figures (the difference of the gateway's /metrics after it and before it)."""
    import tritonclient.grpc as triton

    context = ssl.create_default_context(cafile=str(dep.ca_path))
    url = f"{dep.url}/v2/models/{dep.model_name}/infer"
    bodies = {binary: encode_infer_request({"input": x}, binary=binary) for binary in (True,
                                                                                      False)}
    name = session.get_inputs()[0].name
    grpc_client = triton.InferenceServerClient(str(dep.grpc_address), ssl=True,
                                               root_certificates=str(dep.ca_path))
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    server: dict[str, list[ServerCounters]] = {path: [] for path in PATHS[1:]}
    # Readings go on their own connection, so the measured REST client keeps its own.
    with httpx.Client(verify=context, timeout=60) as http, \
            httpx.Client(verify=context, timeout=60) as scraper:
        def rest(binary: bool) -> None:
            body, headers = bodies[binary]
            response = http.post(url, content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(response.text)

        def read(path: str) -> ServerCounters:
            response = scraper.get(f"{dep.url}/metrics")
            response.raise_for_status()
            return ServerCounters.from_metrics(response.text, model=dep.model_name,
                                               protocol=PROTOCOL_LABEL[path])

        calls: dict[str, Callable[[], Any]] = {
            "plain": lambda: session.run(None, {name: x}),
            "rest_binary": lambda: rest(True),
            "rest_json": lambda: rest(False),
            "grpc": lambda: grpc_client.infer(dep.model_name, [tensor])}
        for call in calls.values():  # warm-up
            for _ in range(3):
                call()
        per_block = max(1, runs // blocks)
        for block in range(blocks):
            for path, call in calls.items():
                served = path != "plain"
                before = read(path) if served else None
                time.sleep(0.3)
                for _ in range(per_block):
                    start = time.perf_counter()
                    call()
                    samples[path].append(time.perf_counter() - start)
                    if before is not None:
                        after = read(path)
                        server[path].append(after.minus(before))
                        before = after
            say(f"block {block + 1}/{blocks}: " + _block_line(samples, server, per_block))
    grpc_client.close()
    return samples, server


def _block_line(samples: dict[str, list[float]], server: dict[str, list[ServerCounters]],
                count: int) -> str:
    """The last block's medians per path: client latency, and the server side."""
    parts = []
    for path in PATHS:
        part = f"{path} {statistics.median(samples[path][-count:]) * 1e3:.1f} ms"
        if path in server:
            side = statistics.median([c.server_side_ms for c in server[path][-count:]])
            part += f" (server side {side:.2f} ms)"
        parts.append(part)
    return ", ".join(parts)


# -- default threads against the best explicit --threads ------------------------------------
def run_threads_comparison(*, model: str = "resnet50", stages: int = 3, clients: int = 4,
                           seconds: float = 10.0, rounds: int = 2, warmup_s: float = 2.0,
                           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Throughput and latency of the demo's plan (``stages`` stages, planned as the demo plans
    them, batching as sealed) deployed with each of :data:`COMPARED_THREADS`, all at once,
    each loaded by ``clients`` gRPC clients for ``warmup_s`` + ``seconds`` in each of
    ``rounds`` rounds (the order reversed every other round, so that neither position nor a
    slow period of the VM favours one setting). Only the ``seconds`` after each warm-up count."""
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    windows: dict[str, list[tuple[float, list[float], int]]] = {}
    entries: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="smlaas-bench-threads-") as tmp, \
            contextlib.ExitStack() as running:
        root = Path(tmp)
        say(f"building {model} in {stages} stages (profiled with {default_threads()} threads, "
            f"as the demo)")
        build_dir, keys = build(model, stages, root, default_threads())
        deployments: dict[str, Deployment] = {}
        for threads in COMPARED_THREADS:
            label = _setting(threads)
            dep = running.enter_context(_deployed(build_dir, keys, root, label, say=say,
                                                  threads=threads))
            deployments[label] = dep
            per_stage = threads or shared_machine_threads(dep.replicas)
            entries[label] = {"threads": threads, "threads_per_stage": per_stage,
                              "stages": dep.stage_count, "max_batch_size": dep.max_batch_size,
                              "ready_s": dep.ready_s}
            windows[label] = []
            say(f"deployed {label}: {dep.stage_count} stages, {per_stage} thread(s) per stage, "
                f"max batch {dep.max_batch_size}, ready in {dep.ready_s:.1f} s")
        order = list(deployments)
        for number in range(rounds):
            for label in order if number % 2 == 0 else order[::-1]:
                time.sleep(1.0)  # the previous block's stages go idle
                latencies, failures = _grpc_load(deployments[label], x, clients=clients,
                                                 seconds=seconds, warmup_s=warmup_s)
                per_s = len(latencies) / seconds
                windows[label].append((per_s, latencies, failures))
                say(f"round {number + 1}/{rounds}, {label}: {per_s:.1f} req/s, p50 "
                    f"{statistics.median(latencies) * 1e3 if latencies else float('nan'):.0f}"
                    f" ms, {failures} failed")
    for label, entry in entries.items():
        latencies = [s for _, block, _ in windows[label] for s in block]
        entry["throughput_per_s"] = statistics.fmean(t for t, _, _ in windows[label])
        entry["throughput_per_round"] = [t for t, _, _ in windows[label]]
        entry["latency"] = percentiles(latencies) if latencies else {}
        entry["failed"] = sum(f for _, _, f in windows[label])
    results: dict[str, Any] = {
        "model": model, "clients": clients, "seconds_per_block": seconds, "rounds": rounds,
        "warmup_s": warmup_s, "machine": _machine(),
        "threads_comparison": entries, "verdict": threads_verdict(entries)}
    say(markdown(results))
    return results


def threads_verdict(entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the default setting's throughput is within :data:`WITHIN_BEST` of the best."""
    default = _setting(None)
    best = max(entries, key=lambda label: entries[label]["throughput_per_s"])
    best_tput = entries[best]["throughput_per_s"]
    default_tput = entries[default]["throughput_per_s"]
    return {"best": best, "best_per_s": best_tput, "default_per_s": default_tput,
            "default_over_best": default_tput / best_tput if best_tput else 0.0,
            "within": WITHIN_BEST,
            "default_within_best": default_tput >= (1 - WITHIN_BEST) * best_tput}


@contextlib.contextmanager
def _deployed(build_dir: Path, keys: Path, root: Path, label: str, *,
              say: Callable[[str], None], **options: Any) -> Iterator[Deployment]:
    """A running deployment of ``build_dir`` on this machine (REST and gRPC on new ports on
    127.0.0.1; ``options`` are further DeploySettings), stopped on exit; tried again on new
    ports when it fails to start (see :data:`DEPLOY_ATTEMPTS`)."""
    owner = root / "owner.key"
    OwnerKey.load_or_create(owner)
    for attempt in range(1, DEPLOY_ATTEMPTS + 1):
        state = root / f"state-{label.replace(' ', '-')}-{attempt}"
        settings = DeploySettings(build_dir=build_dir, keys_path=keys, state_dir=state,
                                  owner_key_path=owner, host="127.0.0.1", port=free_port(),
                                  grpc_port=free_port(), **options)
        dep = Deployment(settings, LocalLauncher(state / "logs"))
        try:
            dep.start()
        except BaseException as err:
            dep.stop()
            if not isinstance(err, DeployError) or attempt == DEPLOY_ATTEMPTS:
                raise
            say(f"{label}: the deployment failed ({str(err).splitlines()[-1]}); trying again "
                f"on new ports")
            continue
        try:
            yield dep
        finally:
            dep.stop()
        return


def _setting(threads: int | None) -> str:
    return "default" if threads is None else f"--threads {threads}"


def _grpc_load(dep: Deployment, x: np.ndarray, *, clients: int, seconds: float,
               warmup_s: float) -> tuple[list[float], int]:
    """``clients`` threads calling ``infer`` back to back (each its own gRPC channel) for
    ``warmup_s + seconds``: the latencies (seconds) of the requests that started after the
    warm-up and ended within the window, and the calls that failed meanwhile."""
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    stop = threading.Event()
    lock = threading.Lock()
    outcomes: list[tuple[float, float]] = []  # start, seconds
    failures: list[str] = []

    def client() -> None:
        with _grpc_client(triton, dep) as grpc_client:
            tensor = triton.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    grpc_client.infer(dep.model_name, [tensor], client_timeout=60)
                except InferenceServerException as err:
                    with lock:
                        failures.append(str(err))
                    continue
                with lock:
                    outcomes.append((start, time.perf_counter() - start))

    workers = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    begin = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(warmup_s + seconds)
    stop.set()
    for worker in workers:
        worker.join(timeout=90)
    window_start, window_end = begin + warmup_s, begin + warmup_s + seconds
    counted = [duration for start, duration in outcomes
               if start >= window_start and start + duration <= window_end]
    return counted, len(failures)


@contextlib.contextmanager
def _grpc_client(triton: Any, dep: Deployment) -> Iterator[Any]:
    grpc_client = triton.InferenceServerClient(str(dep.grpc_address), ssl=True,
                                               root_certificates=str(dep.ca_path))
    try:
        yield grpc_client
    finally:
        grpc_client.close()


def _machine() -> dict[str, Any]:
    return {"id": machine_id(), "cpu": platform.processor(), "cores": os.cpu_count(),
            "onnxruntime": ort.__version__}


# -- tables ----------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    """The result tables: client latency per path and the server-side cost (the gateway
    benchmark), or the thread settings side by side (``--compare-threads``)."""
    if "threads_comparison" in results:
        return _threads_markdown(results)
    lines = ["| path | p50 ms | p99 ms | overhead over plain (p50) | ratio |",
             "|---|---:|---:|---:|---:|"]
    for path in PATHS:
        latency = results["latency"][path]
        overhead = results["overhead_ms"].get(path)
        ratio = results["ratio"].get(path)
        lines.append(f"| {path} | {latency['p50_ms']:.1f} | {latency['p99_ms']:.1f} | "
                     + (f"{overhead:+.1f} ms | {ratio:.2f} |" if overhead is not None
                        else "- | 1.00 |"))
    if "server_side" in results:
        target = results.get("server_side_target_ms", SERVER_SIDE_TARGET_MS)
        lines += ["", f"Server side per request: the gateway (arrival to response ready) "
                      f"minus the stage's own run; target at most {target:g} ms (mean) for "
                      f"{' and '.join(TARGET_PATHS)}.", "",
                  "| path | gateway ms | stage run ms | server side ms (mean) | p50 | p99 | "
                  "of which hop | of which front end | target met |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for path in PATHS[1:]:
            s = results["server_side"][path]
            lines.append(f"| {path} | {s['gateway_mean_ms']:.2f} | {s['stage_mean_ms']:.2f} | "
                         f"**{s['mean_ms']:.2f}** | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                         f"{s['hop_mean_ms']:.2f} | {s['front_end_mean_ms']:.2f} | "
                         f"{_met(s['target_met'])} |")
        if "transport_floor" in results:
            lines += floor_lines(results["transport_floor"], {
                path: results["server_side"][path]["hop_mean_ms"] for path in TARGET_PATHS})
    return "\n".join(lines)


def _met(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "**no**"


def _threads_markdown(results: dict[str, Any]) -> str:
    lines = [f"{results['model']}, {results['clients']} gRPC clients, {results['rounds']} "
             f"round(s) of {results['seconds_per_block']:g} s per setting after "
             f"{results['warmup_s']:g} s of warm-up each", "",
             "| setting | threads per stage | stages | max batch | req/s | per round | p50 ms | "
             "p99 ms | failed |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for label, entry in results["threads_comparison"].items():
        latency = entry["latency"]
        per_round = ", ".join(f"{t:.1f}" for t in entry["throughput_per_round"])
        lines.append(f"| {label} | {entry['threads_per_stage']} | {entry['stages']} | "
                     f"{entry['max_batch_size']} | {entry['throughput_per_s']:.1f} | "
                     f"{per_round} | {latency.get('p50_ms', float('nan')):.0f} | "
                     f"{latency.get('p99_ms', float('nan')):.0f} | {entry['failed']} |")
    verdict = results["verdict"]
    lines += ["", f"default: {verdict['default_per_s']:.1f} req/s, "
                  f"{verdict['default_over_best']:.0%} of the best ({verdict['best']}, "
                  f"{verdict['best_per_s']:.1f} req/s): "
                  + ("within" if verdict["default_within_best"] else "NOT within")
                  + f" {verdict['within']:.0%} of the best"]
    return "\n".join(lines)
