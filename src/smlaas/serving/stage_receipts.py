"""A stage's receipts, signed off the request's path (:mod:`smlaas.receipts`).

A stage asked for receipts sends its outputs on first and signs once they are on their way,
while the next stage runs:
hashing what it received and sent and signing took 0.2 to 0.4 ms per batch in a deployment
(cold caches after a run), on every request's path when it came first. Its receipt follows
the batch on the same connection (:class:`~smlaas.serving.protocol.Signed`, under the
batch's request id); the next stage needs it only when it signs its own receipt (its ``prev``
claim and the digests of what it received), after its own run. On the way back each stage
puts its receipt in front of the reply's receipts, so the gateway gets every stage's in order.

Signing starts when the hop has handed the batch to the network (on two cores, hashing a
784 KB activation while the hop was still writing it slowed that hop from 0.8 to 1.2 ms): in a
thread of its own when there is much to hash (:data:`INLINE_SIGN_BYTES`), else on the stage's
event loop, as the last stage always does (its receipt is on the path anyway: the gateway
waits for it). (Not at a lower CPU priority: the thread holds the GIL between hashes, and a
low-priority holder descheduled under load stalls the stage's other threads.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from smlaas.errors import ProtocolError, Unavailable
from smlaas.receipts.claims import StageReceipt, StageSigner, chain_link
from smlaas.receipts.digests import leaf_hash
from smlaas.serving.protocol import Infer

MAX_AWAITED = 1024
"""Receipts one upstream connection may have promised and not yet sent."""
INLINE_SIGN_BYTES = 256 * 1024
"""A receipt hashing at most this much (BLAKE3: about 35 us here, plus about 0.07 ms to sign)
is signed on the stage's event loop: a hand-over to the signing thread and back costs more."""
READ_AHEAD = 64
"""Requests one upstream connection may have waiting for room in a stage's queue before the
stage stops reading it: reading on lets a receipt that follows its batch reach the batches
that wait on it (its upstream's own bound on requests in flight keeps this small)."""


def for_batch(receipt: StageReceipt, salts: Sequence[bytes]) -> bool:
    """Whether ``receipt`` (the previous stage's) is for the batch whose requests have
    ``salts``: one leaf per request, each leaf's hash that of its digests with that
    request's salt (random, per request). Its signed root over these hashes is the
    verifier's to check; the COSE is not parsed here, on every batch's path."""
    return len(receipt.leaves) == len(receipt.hashes) == len(salts) and all(
        leaf_hash(salt, leaf.received, leaf.sent) == hashed
        for salt, leaf, hashed in zip(salts, receipt.leaves, receipt.hashes))


class AwaitedReceipts:
    """The receipts an upstream stage has promised on one connection: one for each batch it
    sent asking for receipts, sent after the batch (a stream keeps their order)."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[StageReceipt]] = {}

    def expect(self, request_id: str) -> asyncio.Future[StageReceipt]:
        """The future the receipt for batch ``request_id`` will settle. ProtocolError when
        the connection has promised too many."""
        if len(self._waiting) >= MAX_AWAITED or request_id in self._waiting:
            raise ProtocolError(f"{len(self._waiting)} receipts promised and not sent, or "
                                f"request id {request_id!r} twice")
        future: asyncio.Future[StageReceipt] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        future.add_done_callback(lambda _: self._waiting.pop(request_id, None))
        return future

    def arrived(self, request_id: str, receipt: StageReceipt) -> None:
        future = self._waiting.get(request_id)
        if future is not None and not future.done():
            future.set_result(receipt)

    def close(self) -> None:
        for future in list(self._waiting.values()):
            future.cancel()


class PendingReceipt:
    """A stage's receipt for one batch, signed from when :meth:`start` is first called (the
    hop calls it once the batch is written); the task raises Unavailable when the previous
    stage's receipt does not come by the batch's deadline."""

    def __init__(self, sign: Callable[[], Coroutine[Any, Any, StageReceipt]]) -> None:
        self._sign = sign
        self._task: asyncio.Task[StageReceipt] | None = None

    def start(self) -> asyncio.Task[StageReceipt]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._sign())
            # a batch whose reply failed never awaits it: its failure is not an error here
            self._task.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self._task


class StageReceipts:
    """Signs stage ``index``'s batch receipts once each batch is on its way: in a thread of
    their own when there is much to hash, else (and always for the last stage) on the
    stage's event loop."""

    def __init__(self, signer: StageSigner, index: int, *, last: bool = False,
                 on_signed: Callable[[float], None] = lambda seconds: None) -> None:
        self._signer, self.index, self.last = signer, index, last
        self._on_signed = on_signed
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage-{index}-receipts")

    def pending(self, message: Infer, outputs: Mapping[str, np.ndarray],
                previous: Awaitable[StageReceipt] | None) -> PendingReceipt:
        """This stage's receipt for ``message``'s batch, which gave ``outputs``, to sign
        once the previous stage's (``previous``; None for stage 0) has come."""
        return PendingReceipt(lambda: self._sign(message, outputs, previous))

    async def _sign(self, message: Infer, outputs: Mapping[str, np.ndarray],
                    previous: Awaitable[StageReceipt] | None) -> StageReceipt:
        prev = None
        if self.index > 0:
            if previous is None:
                raise Unavailable(f"stage {self.index - 1} promised no receipt for this batch")
            waiting = asyncio.ensure_future(previous)
            try:  # usually here already: it came while this stage ran
                prev = waiting.result() if waiting.done() else \
                    await asyncio.wait_for(asyncio.shield(waiting), message.remaining_s())
            except TimeoutError as err:
                waiting.cancel()  # it is no longer awaited
                raise Unavailable(f"stage {self.index - 1}'s receipt did not come by the "
                                  f"deadline") from err
            except asyncio.CancelledError:
                if not waiting.cancelled():
                    raise  # this task was cancelled
                raise Unavailable(f"the connection from stage {self.index - 1} closed "
                                  f"before its receipt came") from None
        hashed = sum(np.asarray(v).nbytes for v in outputs.values()) + (
            0 if prev is not None else sum(np.asarray(v).nbytes for v in message.tensors.values()))
        receipt, seconds = self.sign_now(message, outputs, prev) \
            if self.last or hashed <= INLINE_SIGN_BYTES else \
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.sign_now, message, outputs, prev)
        self._on_signed(seconds)
        return receipt

    def sign_now(self, message: Infer, outputs: Mapping[str, np.ndarray],
                 prev: StageReceipt | None) -> tuple[StageReceipt, float]:
        """This stage's receipt and the seconds it took (any thread); Unavailable when
        ``prev`` (the previous stage's) is not for this batch."""
        assert message.receipt is not None
        started = time.perf_counter()
        if prev is None and self.index > 0:
            raise Unavailable(f"stage {self.index - 1} sent no receipt for this batch")
        if prev is not None and not for_batch(prev, message.receipt.salts):
            raise Unavailable(f"stage {self.index - 1}'s receipt is not for this batch")
        receipt = self._signer.sign_batch(
            message.tensors if prev is None else [leaf.sent for leaf in prev.leaves],
            outputs, rows=message.receipt.rows, salts=message.receipt.salts,
            prev=None if prev is None else chain_link(prev.cose))
        return receipt, time.perf_counter() - started

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

