"""The whole data plane in one process: the REST front end (``httpx.ASGITransport``), the
data plane and its batcher, and three real stage workers (ONNX Runtime sessions of a model
split by smlaas's own extractor) joined by in-memory hops with the network's typed messages
and deadlines. The chain's answers equal the whole model's; one client's bad input fails
only its own request, with a short message that names no node."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from smlaas.errors import Status
from smlaas.export import StageExtractor
from smlaas.graph import resolve_input_sizes
from smlaas.partition import ModelSource, analyse
from smlaas.runtime.stage_runner import StageRunner, relax_batch_dim
from smlaas.serving.data_plane import DataPlane, GatewaySettings
from smlaas.serving.gateway import create_app
from smlaas.serving.hop import LocalHop
from smlaas.serving.protocol import Describe, Failure, Infer, deadline_in
from smlaas.serving.worker import StageWorker
from smlaas.transport.v2 import decode_infer_response, encode_infer_request

MODEL, VOCAB, WIDTH, TOKENS = "tiny", 50, 8, 4
URL = f"/v2/models/{MODEL}/infer"


def embedding_model() -> onnx.ModelProto:
    """ids[N, TOKENS] -> Gather from a VOCAB x WIDTH table -> Tanh -> sum over tokens ->
    MatMul -> Tanh -> y[N, WIDTH]. An id outside the table makes ONNX Runtime fail."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((VOCAB, WIDTH)).astype(np.float32), "e")
    weight = numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("Gather", ["e", "ids"], ["g"], name="embed"),
             helper.make_node("Tanh", ["g"], ["t0"], name="t0"),
             helper.make_node("ReduceSum", ["t0", "axes"], ["s"], keepdims=0, name="pool"),
             helper.make_node("MatMul", ["s", "w"], ["m"], name="project"),
             helper.make_node("Tanh", ["m"], ["y"], name="out")]
    graph = helper.make_graph(
        nodes, MODEL, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, TOKENS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        [table, weight, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def three_stages(model: onnx.ModelProto) -> list[onnx.ModelProto]:
    shapes = resolve_input_sizes(model, {"": (1, TOKENS)})
    analysis = analyse(ModelSource(name=MODEL, source="test", sha256="-", model=model),
                       shapes, threads=1)
    extractor = StageExtractor(analysis.prepared, analysis.graph)
    cuts = [0, 2, 3, analysis.graph.node_count]
    return [extractor.extract(a, b, name=f"s{k}") for k, (a, b) in
            enumerate(zip(cuts, cuts[1:]))]


@contextlib.asynccontextmanager
async def in_process_gateway(**settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient,
                                                                     DataPlane]]:
    stages = three_stages(embedding_model())
    workers: list[StageWorker] = []
    next_hop: LocalHop | None = None
    for index in reversed(range(len(stages))):
        worker = StageWorker(
            index=index, model=stages[index], server_context=None,
            runner=StageRunner(relax_batch_dim(stages[index]), threads=1, serving=True,
                               label=f"stage {index}"),
            upstream_role="gateway", manifest_digest="-", next_link=next_hop)
        await worker.start()
        workers.append(worker)
        next_hop = LocalHop(f"stage-{index}", worker)
    assert next_hop is not None
    gateway_settings = GatewaySettings(model_name=MODEL, max_batch_size=8,
                                       max_queue_delay_us=5000, stage_count=len(stages),
                                       **settings)
    plane = DataPlane(gateway_settings, next_hop)
    app = create_app(gateway_settings, next_hop, plane=plane)
    await plane.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gateway", timeout=10) as client:
            yield client, plane
    finally:
        await plane.stop()
        for worker in workers:
            await worker.stop()


def whole_model(ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(relax_batch_dim(embedding_model()).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"ids": ids})[0])


async def infer(client: httpx.AsyncClient, ids: np.ndarray, *, binary: bool
                ) -> httpx.Response:
    body, headers = encode_infer_request({"ids": ids}, binary=binary)
    return await client.post(URL, content=body, headers=headers)


def test_the_chain_in_one_process_answers_what_the_whole_model_does() -> None:
    rng = np.random.default_rng(1)
    requests = [rng.integers(0, VOCAB, (1 + i % 2, TOKENS)).astype(np.int64) for i in range(12)]

    async def main() -> None:
        async with in_process_gateway() as (client, plane):
            assert (await client.get("/v2/health/ready")).status_code == 200
            metadata = (await client.get(f"/v2/models/{MODEL}")).json()
            assert metadata["inputs"] == [{"name": "ids", "datatype": "INT64",
                                           "shape": [-1, TOKENS]}]
            answers = await asyncio.gather(*(infer(client, ids, binary=i % 2 == 0)
                                             for i, ids in enumerate(requests)))
            for ids, answer in zip(requests, answers):
                assert answer.status_code == 200, answer.text
                outputs = decode_infer_response(
                    answer.content, answer.headers.get("Inference-Header-Content-Length"))
                np.testing.assert_allclose(outputs["y"], whole_model(ids), rtol=1e-5,
                                           atol=1e-6)
            assert plane.statistics.execution_count < len(requests)  # batched

    asyncio.run(main())


def test_one_clients_bad_input_fails_only_its_own_request_with_a_short_message() -> None:
    good = [np.full((1, TOKENS), i, np.int64) for i in range(7)]
    bad = np.full((1, TOKENS), VOCAB + 1000, np.int64)  # outside the table

    async def main() -> None:
        async with in_process_gateway() as (client, _):
            answers = await asyncio.gather(*(infer(client, ids, binary=True)
                                             for ids in [*good[:3], bad, *good[3:]]))
            statuses = [a.status_code for a in answers]
            assert statuses == [200] * 3 + [400] + [200] * 4, statuses
            message = answers[3].json()["error"]
            assert "could not run the model" in message and "reference" in message
            assert not any(name in message for name in ("embed", "Gather", "project"))

    asyncio.run(main())


def test_typed_messages_reach_a_stage_and_its_deadline_holds() -> None:
    """A request whose deadline has passed gets a DEADLINE failure from the stage, and a
    describe reports every stage in order."""
    stages = three_stages(embedding_model())

    async def main() -> None:
        worker = StageWorker(index=0, model=stages[-1], server_context=None,
                             runner=StageRunner(relax_batch_dim(stages[-1]), threads=1),
                             upstream_role="gateway", manifest_digest="-", next_link=None)
        await worker.start()
        try:
            hop = LocalHop("stage-0", worker)
            x = {name: np.zeros([d if isinstance(d, int) else 1 for d in arg.shape],
                                np.float32) for name, arg in worker.runner.inputs.items()}
            late = await hop.request(Infer(x, deadline_in(-1)))
            assert isinstance(late, Failure) and late.status == Status.DEADLINE
            description = await hop.describe(Describe(deadline_in(2)))
            assert not isinstance(description, Failure)
            assert description.stages == (0,) and description.outputs[0].name == "y"
        finally:
            await worker.stop()

    asyncio.run(main())
