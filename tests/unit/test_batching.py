"""Dynamic batching: stacking, splitting, limits, requests that leave or expire before they run;
and which models can be batched at all."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from smlaas.errors import QueueFull, Status
from smlaas.export.batching import batching_problem, relax_batch_dim
from smlaas.serving.batcher import BatchStats, DynamicBatcher
from smlaas.serving.protocol import Failure, Outputs
from tests.models import chain_model


def run_batcher(requests: list[np.ndarray], *, max_batch_size: int, fail: bool = False
                ) -> tuple[list[Outputs | Failure], list[int]]:
    seen: list[int] = []

    async def pipeline(inputs: dict[str, np.ndarray], **_: object) -> Outputs | Failure:
        seen.append(len(inputs["x"]))
        await asyncio.sleep(0.01)
        if fail:
            return Failure(Status.UNAVAILABLE, "stage-1 is unavailable")
        return Outputs({"y": inputs["x"] * 2})

    async def main() -> list[Outputs | Failure]:
        stats: list[BatchStats] = []
        batcher = DynamicBatcher(pipeline, max_batch_size=max_batch_size,
                                 max_queue_delay_us=20_000, max_inflight=1, max_queue=64,
                                 on_batch=stats.append)
        batcher.start()
        replies = await asyncio.gather(*(batcher.submit({"x": x}, len(x)) for x in requests))
        await batcher.stop()
        assert sum(s.requests for s in stats) == len(requests)
        return list(replies)

    return asyncio.run(main()), seen


def test_requests_are_stacked_and_split_back_in_order() -> None:
    requests = [np.full((1 + i % 2, 3), i, np.float32) for i in range(10)]
    replies, seen = run_batcher(requests, max_batch_size=4)
    for x, reply in zip(requests, replies):
        np.testing.assert_array_equal(reply.tensors["y"], x * 2)
    assert max(seen) <= 4 and len(seen) < len(requests)  # batched, within the limit
    assert sum(seen) == sum(len(x) for x in requests)


def test_without_a_batch_dimension_every_request_travels_alone() -> None:
    replies, seen = run_batcher([np.ones((1, 3), np.float32)] * 5, max_batch_size=0)
    assert seen == [1] * 5 and all(isinstance(r, Outputs) for r in replies)


def test_one_requests_bad_input_fails_only_that_request() -> None:
    """A hostile client's rows make the batched run fail (ONNX Runtime refuses its values):
    the batch is run again request by request, so its neighbours all get their answers."""
    runs: list[int] = []

    async def pipeline(inputs: dict[str, np.ndarray], **_: object) -> Outputs | Failure:
        runs.append(len(inputs["x"]))
        await asyncio.sleep(0.005)
        if (inputs["x"] < 0).any():
            return Failure(Status.BAD_INPUT, "stage 0 could not run the model")
        return Outputs({"y": inputs["x"] * 2})

    async def main() -> list[Outputs | Failure]:
        batcher = DynamicBatcher(pipeline, max_batch_size=8, max_queue_delay_us=20_000,
                                 max_inflight=1, max_queue=64)
        batcher.start()
        requests = [np.full((1, 3), -1.0 if i == 3 else i, np.float32) for i in range(8)]
        replies = await asyncio.gather(*(batcher.submit({"x": x}, 1) for x in requests))
        await batcher.stop()
        return list(replies)

    replies = asyncio.run(main())
    assert isinstance(replies[3], Failure) and replies[3].status == Status.BAD_INPUT
    for i, reply in enumerate(replies):
        if i != 3:
            assert isinstance(reply, Outputs), reply
            np.testing.assert_array_equal(reply.tensors["y"], np.full((1, 3), 2.0 * i))
    assert max(runs) > 1 and runs.count(1) >= 7  # batched, then one by one


def test_a_failed_batch_fails_every_request_in_it() -> None:
    replies, _ = run_batcher([np.ones((1, 3), np.float32)] * 4, max_batch_size=4, fail=True)
    assert all(isinstance(r, Failure) and r.status == Status.UNAVAILABLE for r in replies)


class _HeldPipeline:
    """A pipeline that holds every batch until released, recording what it was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, float | None, int]] = []
        self.release = asyncio.Event()

    async def __call__(self, inputs: dict[str, np.ndarray], *, deadline: float | None,
                       requests: int, receipt: object = None) -> Outputs | Failure:
        self.sent.append((len(inputs["x"]), deadline, requests))
        await self.release.wait()
        return Outputs({"y": inputs["x"] * 2})


def test_requests_whose_callers_left_leave_the_queue_at_once() -> None:
    """Issue 18: a burst of requests whose clients hung up filled the queue, and later
    requests got 503 until the batcher reached them."""

    async def main() -> None:
        pipeline = _HeldPipeline()
        abandoned: list[int] = []
        batcher = DynamicBatcher(pipeline, max_batch_size=0, max_queue_delay_us=0,
                                 max_inflight=1, max_queue=4, on_abandoned=abandoned.append)
        batcher.start()
        x = np.ones((1, 3), np.float32)
        running = asyncio.ensure_future(batcher.submit({"x": x}, 1))  # holds the pipeline
        await asyncio.sleep(0.01)
        gone = [asyncio.ensure_future(batcher.submit({"x": x}, 1)) for _ in range(4)]
        await asyncio.sleep(0.01)
        assert batcher.queue_depth == 4
        with pytest.raises(QueueFull):
            await batcher.submit({"x": x}, 1)
        for waiter in gone:
            waiter.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        assert batcher.queue_depth == 0 and batcher.abandoned == 4 and sum(abandoned) == 4
        later = [asyncio.ensure_future(batcher.submit({"x": x}, 1)) for _ in range(4)]
        await asyncio.sleep(0.01)
        pipeline.release.set()
        replies = await asyncio.gather(running, *later)
        await batcher.stop()
        assert all(isinstance(r, Outputs) for r in replies)
        assert len(pipeline.sent) == 5  # the first and the four later ones, none of the gone

    asyncio.run(main())


def test_a_request_whose_client_is_gone_is_never_sent() -> None:
    """The ``gone`` check runs when a request is batched and again just before its batch is
    sent: a client that left while its request waited costs no stage any work."""

    async def main() -> None:
        pipeline = _HeldPipeline()
        batcher = DynamicBatcher(pipeline, max_batch_size=4, max_queue_delay_us=50_000,
                                 max_inflight=1, max_queue=64)
        batcher.start()
        x = np.ones((1, 3), np.float32)
        left = {"a": False, "b": False}
        full = np.ones((4, 3), np.float32)
        first = asyncio.ensure_future(batcher.submit({"x": full}, 4))
        await asyncio.sleep(0.01)  # a full batch at once, held in the pipeline
        queued = {name: asyncio.ensure_future(batcher.submit(
            {"x": x * 3}, 1, gone=lambda name=name: left[name])) for name in left}
        stays = asyncio.ensure_future(batcher.submit({"x": x * 5}, 1))
        await asyncio.sleep(0.01)
        left["a"] = True  # a client leaves while queued: never batched
        pipeline.release.set()
        await first
        await asyncio.sleep(0)
        left["b"] = True  # another leaves while its batch fills: never sent
        reply = await stays
        assert isinstance(reply, Outputs)
        np.testing.assert_array_equal(reply.tensors["y"], x * 10)
        for name in left:
            withdrawn = await queued[name]
            assert isinstance(withdrawn, Failure) and "client has gone" in withdrawn.message
        await batcher.stop()
        assert [rows for rows, _, _ in pipeline.sent] == [4, 1]
        assert batcher.abandoned == 2

    asyncio.run(main())


def test_a_batch_carries_the_latest_deadline_and_its_request_count() -> None:
    async def main() -> None:
        pipeline = _HeldPipeline()
        pipeline.release.set()
        batcher = DynamicBatcher(pipeline, max_batch_size=4, max_queue_delay_us=20_000,
                                 max_inflight=1, max_queue=64)
        batcher.start()
        x = np.ones((1, 3), np.float32)
        now = time.time()
        await asyncio.gather(*(batcher.submit({"x": x}, 1, deadline=now + offset)
                               for offset in (5.0, 9.0, 7.0)))
        expired = await batcher.submit({"x": x}, 1, deadline=now - 1)
        await batcher.stop()
        assert pipeline.sent == [(3, now + 9.0, 3)]
        assert isinstance(expired, Failure) and expired.status == Status.DEADLINE

    asyncio.run(main())


def test_batchable_chain_passes_the_probe() -> None:
    model = chain_model()
    inputs = {"x": np.ones((1, 8), np.float32)}
    assert batching_problem([model], inputs) is None


def test_reshape_to_a_constant_batch_of_one_is_detected() -> None:
    shape = numpy_helper.from_array(np.array([1, 6], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="flat")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    problem = batching_problem([model], {"x": np.ones((1, 2, 3), np.float32)})
    assert problem is not None and "batch 2" in problem


def test_relaxed_model_has_a_symbolic_batch_and_no_fixed_intermediates() -> None:
    model = chain_model()
    model.graph.value_info.append(helper.make_tensor_value_info("m0", TensorProto.FLOAT, [1, 8]))
    relaxed = relax_batch_dim(model)
    assert relaxed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert len(relaxed.graph.value_info) == 0 and len(model.graph.value_info) == 1
    onnx.checker.check_model(relaxed)
