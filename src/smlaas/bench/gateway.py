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

    smlaas bench gateway --out docs/results/gateway.json
"""

from __future__ import annotations

import os
import platform
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort

from smlaas.bench.serving import build, percentiles, plain_session
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.profile import machine_id
from smlaas.transport.v2 import encode_infer_request

PATHS = ("plain", "rest_binary", "rest_json", "grpc")


def run_gateway_benchmark(*, model: str = "resnet50", threads: int = 1, runs: int = 60,
                          blocks: int = 6, say: Callable[[str], None] = print
                          ) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    session = plain_session(model, threads)
    with tempfile.TemporaryDirectory(prefix="smlaas-bench-gateway-") as tmp:
        root = Path(tmp)
        build_dir, keys = build(model, 1, root, threads)
        owner = root / "owner.key"
        OwnerKey.load_or_create(owner)
        state = root / "state"
        settings = DeploySettings(build_dir=build_dir, keys_path=keys, state_dir=state,
                                  owner_key_path=owner, port=free_port(), grpc_port=free_port(),
                                  threads=threads, max_batch_size=0)
        with Deployment(settings, LocalLauncher(state / "logs")) as dep:
            say(f"deployed {model} as one stage at {dep.url} (gRPC {dep.grpc_address})")
            samples = _interleaved(session, dep, x, runs=runs, blocks=blocks)
    results: dict[str, Any] = {
        "model": model, "threads": threads, "runs_per_path": runs,
        "machine": {"id": machine_id(), "cpu": platform.processor(), "cores": os.cpu_count(),
                    "onnxruntime": ort.__version__},
        "latency": {path: percentiles(samples[path]) for path in PATHS}}
    plain_p50 = results["latency"]["plain"]["p50_ms"]
    results["overhead_ms"] = {path: results["latency"][path]["p50_ms"] - plain_p50
                              for path in PATHS[1:]}
    results["ratio"] = {path: results["latency"][path]["p50_ms"] / plain_p50
                        for path in PATHS[1:]}
    say(markdown(results))
    return results


def _interleaved(session: ort.InferenceSession, dep: Deployment, x: np.ndarray, *, runs: int,
                 blocks: int) -> dict[str, list[float]]:
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
    with httpx.Client(verify=context, timeout=60) as http:
        def rest(binary: bool) -> None:
            body, headers = bodies[binary]
            response = http.post(url, content=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(response.text)

        calls: dict[str, Callable[[], Any]] = {
            "plain": lambda: session.run(None, {name: x}),
            "rest_binary": lambda: rest(True),
            "rest_json": lambda: rest(False),
            "grpc": lambda: grpc_client.infer(dep.model_name, [tensor])}
        for call in calls.values():  # warm-up
            for _ in range(3):
                call()
        for _ in range(blocks):
            for path, call in calls.items():
                time.sleep(0.3)
                for _ in range(max(1, runs // blocks)):
                    start = time.perf_counter()
                    call()
                    samples[path].append(time.perf_counter() - start)
    grpc_client.close()
    return samples


def markdown(results: dict[str, Any]) -> str:
    lines = ["| path | p50 ms | p99 ms | overhead over plain (p50) | ratio |",
             "|---|---:|---:|---:|---:|"]
    for path in PATHS:
        latency = results["latency"][path]
        overhead = results["overhead_ms"].get(path)
        ratio = results["ratio"].get(path)
        lines.append(f"| {path} | {latency['p50_ms']:.1f} | {latency['p99_ms']:.1f} | "
                     + (f"{overhead:+.1f} ms | {ratio:.2f} |" if overhead is not None
                        else "- | 1.00 |"))
    return "\n".join(lines)


