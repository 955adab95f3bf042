"""``smlaas bench generation``: token generation through the enclave pipeline against plain ONNX
Runtime decoding of the whole model with its KV cache, side by side in one run.

- plain: the whole decoder in this process, 1 intra-op thread on a thread pinned to core 0;
  one stream, then ``streams`` prompts decoded as one left-padded batch (its best case);
- smlaas: the decoder partitioned into ``stages`` stages (dp-throughput on native time), sealed,
  deployed on the sim backend with each stage pinned to its own core (``--pin``), the gateway
  and clients on whatever cores are left (on a 2-core machine: shared), asked over HTTPS with
  the generate_stream endpoint (server-sent events), then over gRPC streaming
  (``ModelStreamInfer``, a response per token) by as many calls.

Reported: time to first token (a ``prompt``-token prompt), tokens/s with 1 and with
``streams`` concurrent streams, tokens/s per core used (plain: 1; smlaas: its stage cores),
and what the hops cost per token: the gateway's time per decode step minus the stages' own
session time for it (from the stages' run-time counters).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2

from smlaas.bench.pinned import process_cpu_seconds
from smlaas.bench.serving import deploy_settings
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment
from smlaas.deploy.launchers import LocalLauncher
from smlaas.errors import DeployError
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import seal_build
from smlaas.generation.reference import decode_batch
from smlaas.generation.sampling import SamplingParams
from smlaas.partition import PlanOptions, partition
from smlaas.plan import Planner, preset
from smlaas.plan.generation import GenerationSizes
from smlaas.profile import ProfileCache, ProfileSettings, machine_id
from smlaas.serving.data_plane import PROBE_INTERVAL_S
from smlaas.zoo import build_model

GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _prompts(count: int, length: int, vocab: int = 256) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, length).tolist() for _ in range(count)]


def _plain_session(model: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(build_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _on_cores(cores: list[int], work: Callable[[], Any]) -> Any:
    """Runs ``work`` on a thread pinned to ``cores`` (threads it starts inherit them); its
    result."""
    out: list[Any] = []

    def pinned() -> None:
        os.sched_setaffinity(0, set(cores))
        out.append(work())

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    return out[0]


def plain_figures(model: str, prompts: list[list[int]], tokens: int, cores: list[int]
                  ) -> dict[str, float]:
    """Plain ONNX Runtime decoding on ``cores`` (one intra-op thread each)."""
    greedy = SamplingParams()

    def measure() -> dict[str, float]:
        session = _plain_session(model, len(cores))
        decode_batch(session, prompts[:1], 4, greedy)  # warm up
        start = time.perf_counter()
        decode_batch(session, prompts[:1], 1, greedy)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        one = decode_batch(session, prompts[:1], tokens, greedy)
        single = len(one[0]) / (time.perf_counter() - start)
        start = time.perf_counter()
        many = decode_batch(session, prompts, tokens, greedy)
        batched = sum(len(t) for t in many) / (time.perf_counter() - start)
        return {"ttft_ms": ttft * 1e3, "tokens_per_s_1": single,
                "tokens_per_s_many": batched, "cores": len(cores)}

    return dict(_on_cores(cores, measure))


async def _stream(client: httpx.AsyncClient, url: str, prompt: list[int], tokens: int
                  ) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) of one generate_stream call."""
    body = {"input_ids": prompt, "parameters": {"max_tokens": tokens, "temperature": 0,
                                                "stop": False}}
    start = time.perf_counter()
    first, count = 0.0, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"generate_stream answered {response.status_code}: "
                               f"{(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"generation failed: {event['error']}")
            got = len(event.get("output_ids") or [])
            if got and not count:
                first = time.perf_counter() - start
            count += got
    return first, count, time.perf_counter() - start


async def _grpc_stream(channel: grpc.aio.Channel, model: str, prompt: list[int], tokens: int
                       ) -> tuple[float, int, float]:
    """(time to first token, tokens, total seconds) of one gRPC ModelStreamInfer generation
    (``stream`` true: a response per token), as Triton's LLM clients ask."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input_ids", datatype="INT64", shape=[len(prompt)])
    request.inputs.add(name="stream", datatype="BOOL", shape=[1])
    request.raw_input_contents.extend([np.array(prompt, dtype="<i8").tobytes(), b"\x01"])
    request.parameters["max_tokens"].int64_param = tokens
    request.parameters["temperature"].double_param = 0.0
    request.parameters["stop"].bool_param = False
    call = channel.stream_stream(GRPC_STREAM)(iter([request.SerializeToString()]))
    start = time.perf_counter()
    first, count = 0.0, 0
    async for raw in call:
        answer = service_pb2.ModelStreamInferResponse.FromString(raw)
        if answer.error_message:
            raise RuntimeError(f"generation failed: {answer.error_message}")
        got = answer.infer_response.outputs[1].shape[0]
        if got and not count:
            first = time.perf_counter() - start
        count += got  # to the stream's end: the last response carries no token
    return first, count, time.perf_counter() - start


def grpc_figures(dep: Deployment, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """Tokens/s at 1 and at ``len(prompts)`` streams over gRPC streaming, one call each (on
    one channel: one HTTP/2 connection, where the REST phase's client keeps one per
    stream)."""
    address = dep.grpc_address
    if address is None:
        raise DeployError("the deployment has no gRPC port")

    async def run() -> dict[str, float]:
        credentials = grpc.ssl_channel_credentials(Path(dep.ca_path).read_bytes())
        async with grpc.aio.secure_channel(address, credentials) as channel:
            model = dep.model_name
            await _grpc_stream(channel, model, prompts[0], 4)  # warm up
            ttfts = [(await _grpc_stream(channel, model, prompts[0], 1))[0] for _ in range(5)]
            _, count, seconds = await _grpc_stream(channel, model, prompts[0], tokens)
            start = time.perf_counter()
            results = await asyncio.gather(*(_grpc_stream(channel, model, p, tokens)
                                             for p in prompts))
            elapsed = time.perf_counter() - start
        return {"ttft_ms": statistics.median(ttfts) * 1e3, "tokens_per_s_1": count / seconds,
                "tokens_per_s_many": sum(r[1] for r in results) / elapsed}

    return asyncio.run(run())


def smlaas_figures(dep: Deployment, prompts: list[list[int]], tokens: int
                   ) -> dict[str, float]:
    url = f"{dep.url}/v2/models/{dep.model_name}/generate_stream"

    async def run() -> dict[str, float]:
        context = ssl.create_default_context(cafile=str(dep.ca_path))
        async with httpx.AsyncClient(verify=context, timeout=300) as client:
            await _stream(client, url, prompts[0], 4)  # warm up
            ttfts = [(await _stream(client, url, prompts[0], 1))[0] for _ in range(5)]
            # the stages' counters reach the gateway's metrics with its next probe
            await asyncio.sleep(PROBE_INTERVAL_S + 1.0)
            before = await _stage_run_seconds(client, dep.url)
            _, count, seconds = await _stream(client, url, prompts[0], tokens)
            single = count / seconds
            await asyncio.sleep(PROBE_INTERVAL_S + 1.0)
            after = await _stage_run_seconds(client, dep.url)
            staged = sum(after.values()) - sum(before.values())
            cpu = _smlaas_cpu(dep)
            start = time.perf_counter()
            results = await asyncio.gather(*(_stream(client, url, p, tokens)
                                             for p in prompts))
            elapsed = time.perf_counter() - start
            produced = sum(r[1] for r in results)
            cores_busy = (_smlaas_cpu(dep) - cpu) / elapsed
            await asyncio.sleep(PROBE_INTERVAL_S + 1.0)
            busiest = max(v - after.get(k, 0.0)
                          for k, v in (await _stage_run_seconds(client, dep.url)).items())
        return {"ttft_ms": statistics.median(ttfts) * 1e3, "tokens_per_s_1": single,
                "tokens_per_s_many": produced / elapsed, "cpu_cores_busy_many": cores_busy,
                "stage_ms_per_token": staged / count * 1e3,
                "hop_ms_per_token": (seconds - staged) / count * 1e3,
                "busiest_stage_run_s_many": busiest,
                "ceiling_tokens_per_s_many": produced / busiest}

    return asyncio.run(run())


def run_generation_benchmark(*, model: str = "gpt2_small4_kv", stages: int = 2,
                             streams: int = 8, prompt: int = 32, tokens: int = 64,
                             max_context: int = 256, max_inflight: int | None = None,
                             say: Callable[[str], None] = print) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < stages:
        raise RuntimeError(f"--pin needs a core per stage: {stages} stages, {len(cores)} "
                           f"cores")
    prompts = _prompts(streams, prompt)
    results: dict[str, Any] = {
        "model": model, "stages": stages, "streams": streams, "prompt_tokens": prompt,
        "new_tokens": tokens, "cores": len(cores),
        "machine": {"id": machine_id(), "cpu": platform.processor(),
                    "onnxruntime": ort.__version__}}
    say(f"plain ONNX Runtime, 1 thread on core {cores[0]}, then {stages} on the stages' "
        f"cores ...")
    results["plain"] = plain_figures(model, prompts, tokens, cores[:1])
    say(f"plain, 1 core: {_line(results['plain'])}")
    results["plain_same_cores"] = plain_figures(model, prompts, tokens, cores[:stages])
    say(f"plain, {stages} cores: {_line(results['plain_same_cores'])}")
    with tempfile.TemporaryDirectory(prefix="smlaas-bench-generation-") as tmp:
        root = Path(tmp)
        build = root / "build"
        partition(model, build, cost_model=preset("native"),
                  options=PlanOptions(Planner.DP_THROUGHPUT, stages, False),
                  settings=ProfileSettings(threads=1, warmup_runs=1, measured_runs=3),
                  cache=ProfileCache(), verify=False, measure_memory=False,
                  generation=GenerationSizes(max_context, streams))
        keys = root / "keys.json"
        seal_build(build, keys)
        settings = deploy_settings(build, keys, root, threads=1, batching=False, pin=True,
                                   max_inflight=max_inflight, grpc_port=free_port(),
                                   gateway_options={"max_sequences_per_client": streams})
        with Deployment(settings, LocalLauncher(settings.state_dir / "logs"),
                        progress=say) as dep:
            figures = smlaas_figures(dep, prompts, tokens)
            say(f"smlaas over REST (server-sent events): {_line(figures)}; now over gRPC "
                f"streaming ...")
            results["smlaas_grpc"] = grpc_figures(dep, prompts, tokens)
        figures["stages"] = len(read_plan(build).stages)
        figures["max_inflight"] = max_inflight or figures["stages"]
        figures["cores"] = figures["stages"]
    results["smlaas"] = figures
    ours_per_core = figures["tokens_per_s_many"] / figures["cores"]
    results["per_core_ratio"] = ours_per_core / results["plain"]["tokens_per_s_many"]
    same = results["plain_same_cores"]
    results["per_core_ratio_same_cores"] = ours_per_core / (same["tokens_per_s_many"]
                                                            / same["cores"])
    # What the stages' own runs allow: the tokens of the 8 streams over the busiest stage's
    # run time (hops, gateway and clients costing nothing).
    results["ceiling_per_core_ratio_same_cores"] = (
        figures["ceiling_tokens_per_s_many"] / figures["cores"]) / (
        same["tokens_per_s_many"] / same["cores"])
    say(f"smlaas ({figures['stages']} stages pinned): {_line(figures)}; per core "
        f"{results['per_core_ratio']:.2f}x plain on 1 core, "
        f"{results['per_core_ratio_same_cores']:.2f}x plain on the same cores (its processes kept "
        f"{figures['cpu_cores_busy_many']:.2f} cores busy); per token at 1 stream: stages "
        f"{figures['stage_ms_per_token']:.2f} ms, hops and gateway "
        f"{figures['hop_ms_per_token']:.2f} ms; the stages' own runs alone would allow "
        f"{figures['ceiling_tokens_per_s_many']:.0f} tokens/s at many "
        f"({results['ceiling_per_core_ratio_same_cores']:.2f}x per core)")
    return results


async def _stage_run_seconds(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    """Each stage replica's session time so far (its run-time counter, from the gateway's
    metrics, as of its last probe), by its labels."""
    text = (await client.get(f"{url}/metrics")).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("smlaas_stage_run_seconds_total")}


def _smlaas_cpu(dep: Deployment) -> float:
    """CPU seconds so far of every smlaas process of the deployment (coordinator, stages,
    gateway)."""
    launcher = dep.launcher
    assert isinstance(launcher, LocalLauncher)
    return sum(process_cpu_seconds(pid) for pid in launcher.pids().values())


def _line(figures: dict[str, float]) -> str:
    return (f"time to first token {figures['ttft_ms']:.1f} ms, {figures['tokens_per_s_1']:.1f} "
            f"tokens/s at 1 stream, {figures['tokens_per_s_many']:.1f} tokens/s at many")


def markdown(results: dict[str, Any]) -> str:
    plain, same, ours = results["plain"], results["plain_same_cores"], results["smlaas"]
    rpc = results["smlaas_grpc"]
    return "\n".join([
        f"| setup | cores | time to first token ms | tokens/s, 1 stream | tokens/s, "
        f"{results['streams']} streams | per core |",
        "|---|---:|---:|---:|---:|---:|",
        f"| plain ONNX Runtime, whole model with KV cache (1 thread) | 1 | "
        f"{plain['ttft_ms']:.1f} | {plain['tokens_per_s_1']:.1f} | "
        f"{plain['tokens_per_s_many']:.1f} | {plain['tokens_per_s_many']:.1f} |",
        f"| plain ONNX Runtime, the same cores ({same['cores']} threads) | {same['cores']} | "
        f"{same['ttft_ms']:.1f} | {same['tokens_per_s_1']:.1f} | "
        f"{same['tokens_per_s_many']:.1f} | {same['tokens_per_s_many'] / same['cores']:.1f} |",
        f"| smlaas, {ours['stages']} stages pinned (sim; its processes kept "
        f"{ours['cpu_cores_busy_many']:.2f} cores busy at {results['streams']} streams) | "
        f"{ours['cores']} | "
        f"{ours['ttft_ms']:.1f} | {ours['tokens_per_s_1']:.1f} | "
        f"{ours['tokens_per_s_many']:.1f} | "
        f"{ours['tokens_per_s_many'] / ours['cores']:.1f} |",
        f"| smlaas, the same deployment asked over gRPC streaming (ModelStreamInfer, a "
        f"response per token) | {ours['cores']} | {rpc['ttft_ms']:.1f} | "
        f"{rpc['tokens_per_s_1']:.1f} | {rpc['tokens_per_s_many']:.1f} | "
        f"{rpc['tokens_per_s_many'] / ours['cores']:.1f} |",
        f"| smlaas's ceiling: the same tokens over the busiest stage's own run time (hops, "
        f"gateway and clients free) | {ours['cores']} | | | "
        f"{ours['ceiling_tokens_per_s_many']:.1f} | "
        f"{ours['ceiling_tokens_per_s_many'] / ours['cores']:.1f} |",
    ])
