"""Dynamic batching in front of the pipeline.

Requests wait in one queue. A batch starts when the pipeline has room (at most
``max_inflight`` batches in it at once, so that every stage can be busy), then takes more
queued requests until it holds ``max_batch_size`` rows or ``max_queue_delay_us`` has passed.
Requests are stacked on the batch dimension and the outputs split back. With
``max_batch_size`` 0 (a model without a batch dimension) every request travels alone.

The queue is bounded: with ``max_queue`` requests waiting, :meth:`DynamicBatcher.submit`
raises QueueFull at once (the gateway answers 503). Only requests whose callers are still
there hold a place: a request leaves the queue as soon as its ``submit`` is cancelled, and one
whose ``gone`` check says its client has left, or whose deadline has passed, is dropped before
it is batched and again just before its batch is sent (issue 18: a burst of requests whose
clients hung up at once filled the queue, and later requests got 503). Each batch is sent
with the latest deadline among its requests and the number of requests in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from smlaas.errors import QueueFull, Status
from smlaas.receipts.digests import SALT_BYTES
from smlaas.serving.protocol import Failure, Outputs, ReceiptAsk

CLIENT_GONE = "withdrawn before it ran: its client has gone"




class RunBatch(Protocol):
    """Sends stacked inputs through the pipeline: ``deadline`` (Unix seconds, None for the
    pipeline's default), the number of client ``requests`` in the batch and, when any of
    them asked for one, what the stages need to sign receipts (``receipt``) go with them."""

    def __call__(self, inputs: dict[str, np.ndarray], *, deadline: float | None,
                 requests: int, receipt: ReceiptAsk | None = None
                 ) -> Awaitable[Outputs | Failure]: ...


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[Outputs | Failure]
    deadline: float | None = None
    """Unix seconds; None: the pipeline's default."""
    gone: Callable[[], bool] | None = None
    """True once the client has left (checked synchronously, before batching and sending)."""
    salt: bytes | None = None
    """Set when the request asked for a receipt: its salt in the stages' Merkle leaves."""
    enqueued: float = field(default_factory=time.perf_counter)

    def gone_or_expired(self) -> str | None:
        """None while someone waits for this request and it can still be answered in time;
        else "gone" (its caller or client left) or "expired" (answered: deadline passed)."""
        if self.future.done():
            return "gone"
        if self.gone is not None and self.gone():
            self.future.set_result(Failure(Status.CLIENT_GONE, CLIENT_GONE))
            return "gone"
        if self.deadline is not None and time.time() >= self.deadline:
            self.future.set_result(Failure(Status.DEADLINE,
                                           "the deadline passed while it was queued"))
            return "expired"
        return None

    def signature(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        return tuple((n, v.dtype.name, v.shape[1:]) for n, v in sorted(self.inputs.items()))


@dataclass
class BatchStats:
    """What the batcher reports to metrics after each batch ran."""

    rows: int
    requests: int
    queue_wait_s: list[float]
    run_s: float = 0.0
    """Time the pipeline took for the batch."""


class DynamicBatcher:
    def __init__(self, run: RunBatch, *, max_batch_size: int, max_queue_delay_us: int,
                 max_inflight: int, max_queue: int,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_abandoned: Callable[[int], None] | None = None) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._delay_s = max_queue_delay_us / 1e6
        self._inflight = asyncio.Semaphore(max_inflight)
        self._waiting: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self.abandoned = 0
        """Requests dropped unrun because their caller or client had gone."""
        self._on_batch = on_batch
        self._on_abandoned = on_abandoned
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def queue_depth(self) -> int:
        """Requests waiting whose callers are still there."""
        self._drop_dead()
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, inputs: dict[str, np.ndarray], rows: int, *,
                     deadline: float | None = None,
                     gone: Callable[[], bool] | None = None,
                     salt: bytes | None = None) -> Outputs | Failure:
        """The reply for ``inputs``; QueueFull at once when the queue is full. Cancelling
        the call withdraws the request from the queue if it has not been batched yet."""
        future: asyncio.Future[Outputs | Failure] = \
            asyncio.get_running_loop().create_future()
        if len(self._waiting) >= self.max_queue:
            self._drop_dead()
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{self.max_queue} requests are waiting already; retry later")
        pending = _Pending(inputs, rows, future, deadline, gone, salt)
        self._waiting.append(pending)
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def _withdraw(self, pending: _Pending) -> None:
        with contextlib.suppress(ValueError):  # already batched: dropped before it is sent
            self._waiting.remove(pending)
            self._count_abandoned(1)

    def _drop_dead(self) -> None:
        """Removes the requests nobody waits for any more from the queue."""
        live = [p for p in self._waiting if self._wanted(p)]
        if len(live) < len(self._waiting):
            self._waiting = deque(live)

    def _wanted(self, pending: _Pending) -> bool:
        """Whether ``pending`` should still run; one whose client has gone is counted."""
        state = pending.gone_or_expired()
        if state == "gone":
            self._count_abandoned(1)
        return state is None

    def _count_abandoned(self, count: int) -> None:
        if count:
            self.abandoned += count
            if self._on_abandoned is not None:
                self._on_abandoned(count)

    def _pop_live(self) -> _Pending | None:
        """The first queued request still wanted (dead ones before it are dropped)."""
        while self._waiting:
            pending = self._waiting.popleft()
            if self._wanted(pending):
                return pending
        return None

    async def _loop(self) -> None:
        while True:
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._inflight.acquire()
            first = self._pop_live()  # requests may leave while it waits for room
            if first is None:
                self._inflight.release()
                continue
            batch = [first]
            if self.max_batch_size > 0:
                await self._fill(batch)
            task = asyncio.create_task(self._dispatch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _fill(self, batch: list[_Pending]) -> None:
        """Adds queued requests of the same shapes, in order, up to max_batch_size rows or
        until max_queue_delay_us has passed."""
        rows = batch[0].rows
        signature = batch[0].signature()
        end = time.perf_counter() + self._delay_s
        while rows < self.max_batch_size:
            if not self._waiting:
                remaining = end - time.perf_counter()
                if remaining <= 0:
                    return
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    return
                continue
            head = self._waiting[0]
            if not self._wanted(head):
                self._waiting.popleft()
                continue
            if rows + head.rows > self.max_batch_size or head.signature() != signature:
                return  # it starts the next batch
            batch.append(self._waiting.popleft())
            rows += head.rows

    async def _dispatch(self, batch: list[_Pending]) -> None:
        try:
            batch = [p for p in batch if self._wanted(p)]  # the last moment to leave
            if not batch:
                return
            started = time.perf_counter()
            waits = [started - p.enqueued for p in batch]
            deadlines = [p.deadline for p in batch]
            deadline = None if None in deadlines else max(d for d in deadlines if d is not None)
            if len(batch) == 1:
                reply = await self._run(batch[0].inputs, deadline=deadline, requests=1,
                                        receipt=_receipt_ask(batch))
                self._report(batch, waits, started)
                _resolve(batch[0], reply)
                return
            names = list(batch[0].inputs)
            stacked = {n: np.concatenate([p.inputs[n] for p in batch]) for n in names}
            reply = await self._run(stacked, deadline=deadline, requests=len(batch),
                                    receipt=_receipt_ask(batch))
            self._report(batch, waits, started)
            if isinstance(reply, Failure) and reply.status == Status.BAD_INPUT:
                # One request's input failed the batch: run each on its own, so that only
                # that request fails and the others in its batch get their answers.
                for pending in batch:
                    if self._wanted(pending):
                        _resolve(pending, await self._run(
                            pending.inputs, deadline=pending.deadline, requests=1,
                            receipt=_receipt_ask([pending])))
                return
            if isinstance(reply, Failure):
                for pending in batch:
                    _resolve(pending, reply)
                return
            offset = 0
            for index, pending in enumerate(batch):
                part = {n: v[offset:offset + pending.rows] for n, v in reply.tensors.items()}
                offset += pending.rows
                _resolve(pending, Outputs(part, reply.stage_ms, reply.receipts, index))
        except Exception as err:  # never leave a client waiting
            for pending in batch:
                _resolve(pending, Failure(Status.INTERNAL, f"batching failed: {err}"))
        finally:
            self._inflight.release()

    def _report(self, batch: list[_Pending], waits: list[float], started: float) -> None:
        if self._on_batch is not None:
            self._on_batch(BatchStats(sum(p.rows for p in batch), len(batch), waits,
                                      time.perf_counter() - started))


def _receipt_ask(batch: list[_Pending]) -> ReceiptAsk | None:
    """What the stages need to sign for ``batch``, when any request in it asked (the others
    get a salt of their own all the same: a leaf per request)."""
    if all(p.salt is None for p in batch):
        return None
    return ReceiptAsk(tuple(p.rows for p in batch),
                      tuple(p.salt or secrets.token_bytes(SALT_BYTES) for p in batch))


def _resolve(pending: _Pending, reply: Outputs | Failure) -> None:
    if not pending.future.done():
        pending.future.set_result(reply)
