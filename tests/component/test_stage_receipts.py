"""Stage receipts off the request's path (``smlaas.serving.stage_receipts``): a stage sends
its batch on before it signs, its receipt follows, and the chain the gateway gets is whole
and in order; a receipt that never comes fails its batch by the deadline, never hangs it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from smlaas.errors import ProtocolError, Status
from smlaas.receipts.claims import StageReceipt, StageSigner, chain_link
from smlaas.receipts.cose import ReceiptKey, unverified
from smlaas.runtime.stage_runner import StageRunner, relax_batch_dim
from smlaas.serving.hop import LocalHop
from smlaas.serving.protocol import Failure, Infer, Outputs, ReceiptAsk, deadline_in
from smlaas.serving.stage_receipts import MAX_AWAITED, AwaitedReceipts, for_batch
from smlaas.serving.worker import StageWorker
from tests.component.test_in_process_pipeline import TOKENS, VOCAB, embedding_model, three_stages

SIGN_DELAY_S = 0.3


class SlowSigner(StageSigner):
    """Signs like a stage, SIGN_DELAY_S late, and says when it finished."""

    finished: list[float]

    def sign_batch(self, received: Mapping[str, np.ndarray] | Sequence[bytes],
                   sent: Mapping[str, np.ndarray], **kwargs: Any) -> StageReceipt:
        time.sleep(SIGN_DELAY_S)
        receipt = super().sign_batch(received, sent, **kwargs)
        self.finished.append(time.monotonic())
        return receipt


class Arrivals:
    """A hop that notes when each request reached the next stage."""

    def __init__(self, hop: LocalHop) -> None:
        self.hop, self.role = hop, hop.role
        self.times: list[float] = []
        self.seen: list[Infer] = []

    async def request(self, message: Infer, **kwargs: Any) -> Outputs | Failure:
        self.times.append(time.monotonic())
        self.seen.append(message)
        return await self.hop.request(message, **kwargs)

    async def describe(self, message: Any, **kwargs: Any) -> Any:
        return await self.hop.describe(message, **kwargs)

    async def close(self) -> None:
        await self.hop.close()


async def chain(signer_of: type[StageSigner] = StageSigner
                ) -> tuple[list[StageWorker], list[StageSigner], list[Arrivals]]:
    stages = three_stages(embedding_model())
    workers: list[StageWorker] = []
    signers: list[StageSigner] = []
    taps: list[Arrivals] = []
    next_hop: Any = None
    for index in reversed(range(len(stages))):
        signer = signer_of(ReceiptKey(), f"stage-{index}", 0, "ab" * 32, 1, "cd" * 32)
        if isinstance(signer, SlowSigner):
            object.__setattr__(signer, "finished", [])
        worker = StageWorker(
            index=index, model=stages[index], server_context=None,
            runner=StageRunner(relax_batch_dim(stages[index]), threads=1, serving=True,
                               label=f"stage {index}"),
            upstream_role="gateway", manifest_digest="-", next_link=next_hop, signer=signer)
        await worker.start()
        workers.insert(0, worker)
        signers.insert(0, signer)
        next_hop = Arrivals(LocalHop(f"stage-{index}", worker))
        taps.insert(0, next_hop)
    return workers, signers, taps


def batch(rows: Sequence[int], *, timeout_s: float = 10.0) -> Infer:
    ids = np.random.default_rng(0).integers(0, VOCAB, (sum(rows), TOKENS)).astype(np.int64)
    return Infer({"ids": ids}, deadline_in(timeout_s), len(rows),
                 receipt=ReceiptAsk(tuple(rows), tuple(bytes([i]) * 16
                                                       for i in range(len(rows)))))


def test_each_stage_sends_its_batch_on_before_it_signs_and_the_chain_is_whole() -> None:
    async def run() -> tuple[Outputs | Failure, list[StageSigner], list[Arrivals]]:
        workers, signers, taps = await chain(SlowSigner)
        try:
            return await taps[0].request(batch([1, 2]), request_id="b1"), signers, taps
        finally:
            for worker in workers:
                await worker.stop()

    reply, signers, taps = asyncio.run(run())
    assert isinstance(reply, Outputs), reply
    # stage k's batch reached stage k+1 well before stage k had signed
    for k in range(2):
        finished = signers[k].finished[0]  # type: ignore[attr-defined]
        assert taps[k + 1].times[0] < finished - SIGN_DELAY_S / 2
    assert len(reply.receipts) == 3
    for k, receipt in enumerate(reply.receipts):
        claims = unverified(receipt.cose)[1]
        assert claims["role"] == f"stage-{k}" and claims["leaves"] == 2
        if k == 0:
            assert "prev" not in claims
        else:
            before = reply.receipts[k - 1]
            assert claims["prev"] == chain_link(before.cose)
            assert [leaf.received for leaf in receipt.leaves] == \
                [leaf.sent for leaf in before.leaves]


def test_concurrent_batches_each_get_a_whole_chain() -> None:
    async def run() -> list[Outputs | Failure]:
        workers, _, taps = await chain()
        try:
            return list(await asyncio.gather(*(taps[0].request(batch([1]), request_id=f"b{i}")
                                               for i in range(6))))
        finally:
            for worker in workers:
                await worker.stop()

    for reply in asyncio.run(run()):
        assert isinstance(reply, Outputs), reply
        assert [unverified(r.cose)[1]["role"] for r in reply.receipts] == \
            ["stage-0", "stage-1", "stage-2"]
        for before, after in zip(reply.receipts, reply.receipts[1:]):
            assert unverified(after.cose)[1]["prev"] == chain_link(before.cose)


def test_a_receipt_that_never_comes_fails_its_batch_by_the_deadline() -> None:
    async def run() -> tuple[Any, float, Any]:
        workers, _, _ = await chain()
        try:
            never: asyncio.Future[StageReceipt] = asyncio.get_running_loop().create_future()
            first = batch([1], timeout_s=0.5)
            hidden = workers[0].runner.run(first.tensors)  # what stage 0 sends stage 1
            started = time.monotonic()
            failed = await workers[1].handle(
                "b1", Infer(hidden, first.deadline, receipt=first.receipt), never)
            took = time.monotonic() - started
            after = await workers[1].handle(  # the stage goes on serving
                "b2", Infer(hidden, deadline_in(5)))
            return failed, took, after
        finally:
            for worker in workers:
                await worker.stop()

    failed, took, after = asyncio.run(run())
    # stage 1 cannot sign, and stage 2 waits for stage 1's receipt: the batch fails at its
    # deadline (whichever stage says so first)
    assert isinstance(failed, Failure), failed
    assert failed.status in (Status.UNAVAILABLE, Status.DEADLINE), failed
    assert took < 2.0
    assert not isinstance(after, Failure)


def test_an_upstream_cannot_promise_receipts_without_bound() -> None:
    async def run() -> None:
        awaited = AwaitedReceipts()
        futures = [awaited.expect(f"r{i}") for i in range(MAX_AWAITED)]
        with pytest.raises(ProtocolError):
            awaited.expect("one too many")
        awaited.arrived("unknown", StageReceipt(b"", (), ()))  # ignored
        awaited.arrived("r0", StageReceipt(b"x", (), ()))
        await asyncio.sleep(0)
        assert futures[0].result().cose == b"x"
        awaited.expect("r-next")  # r0's place is free again
        with pytest.raises(ProtocolError):
            awaited.expect("r1")  # the same id twice
        awaited.close()
        assert all(f.cancelled() for f in futures[1:])

    asyncio.run(run())


def test_a_previous_receipt_for_another_batch_is_refused() -> None:
    signer = StageSigner(ReceiptKey(), "stage-0", 0, "ab" * 32, 1, "cd" * 32)
    sent = {"y": np.arange(6, dtype=np.float32).reshape(3, 2)}
    ours, theirs = (bytes([1]) * 16, bytes([2]) * 16), (bytes([3]) * 16, bytes([4]) * 16)
    receipt = signer.sign_batch(sent, sent, rows=[1, 2], salts=ours, prev=None)
    assert for_batch(receipt, ours)
    assert not for_batch(receipt, theirs)  # same shape, other requests
    assert not for_batch(receipt, ours[:1])
