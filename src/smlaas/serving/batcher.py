"""Dynamic batching in front of the pipeline.

Requests wait in one queue. A batch starts when the pipeline has room (at most
``max_inflight`` batches in it at once, so that every stage can be busy), then takes more
queued requests until it holds ``max_batch_size`` rows or ``max_queue_delay_us`` has passed.
Requests are stacked on the batch dimension and the outputs split back. With
``max_batch_size`` 0 (a model without a batch dimension) every request travels alone.

The queue is bounded: with ``max_queue`` requests waiting, :meth:`DynamicBatcher.submit`
raises QueueFull at once (the gateway answers 503). A request whose caller has gone (its
``submit`` was cancelled) is dropped from the queue without running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from smlaas.errors import SmlaasError
from smlaas.serving.protocol import Status, error_reply
from smlaas.transport.tensors import TensorMessage

DEFAULT_MAX_QUEUE = 128


class QueueFull(SmlaasError):
    """As many requests wait as the batcher holds."""

RunBatch = Callable[[dict[str, np.ndarray]], Awaitable[TensorMessage]]


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[TensorMessage]
    enqueued: float = field(default_factory=time.perf_counter)

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
                 max_inflight: int, max_queue: int = DEFAULT_MAX_QUEUE,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self._delay_s = max_queue_delay_us / 1e6
        self._inflight = asyncio.Semaphore(max_inflight)
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(max_queue)
        self.abandoned = 0
        """Requests dropped because their caller had gone before they ran."""
        self._carry: _Pending | None = None
        self._on_batch = on_batch
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, inputs: dict[str, np.ndarray], rows: int) -> TensorMessage:
        """The reply for ``inputs``; QueueFull at once when the queue is full. Cancelling
        the call withdraws the request if it has not started."""
        future: asyncio.Future[TensorMessage] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(inputs, rows, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self._queue.maxsize} requests are waiting already; retry "
                            f"later") from None
        return await future

    def _next_live(self, item: _Pending) -> bool:
        if item.future.done():  # cancelled: its caller has gone
            self.abandoned += 1
            return False
        return True

    async def _loop(self) -> None:
        while True:
            first = self._carry or await self._queue.get()
            self._carry = None
            if not self._next_live(first):
                continue
            await self._inflight.acquire()
            if not self._next_live(first):  # gone while it waited for room
                self._inflight.release()
                continue
            batch = [first]
            if self.max_batch_size > 0:
                await self._fill(batch)
            task = asyncio.create_task(self._dispatch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _fill(self, batch: list[_Pending]) -> None:
        rows = batch[0].rows
        signature = batch[0].signature()
        end = time.perf_counter() + self._delay_s
        while rows < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = end - time.perf_counter()
                if remaining <= 0:
                    return
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    return
            if not self._next_live(item):
                continue
            if rows + item.rows > self.max_batch_size or item.signature() != signature:
                self._carry = item
                return
            batch.append(item)
            rows += item.rows

    async def _dispatch(self, batch: list[_Pending]) -> None:
        try:
            batch = [p for p in batch if self._next_live(p)]
            if not batch:
                return
            started = time.perf_counter()
            waits = [started - p.enqueued for p in batch]
            if len(batch) == 1:
                reply = await self._run(batch[0].inputs)
                self._report(batch, waits, started)
                _resolve(batch[0], reply)
                return
            names = list(batch[0].inputs)
            stacked = {n: np.concatenate([p.inputs[n] for p in batch]) for n in names}
            reply = await self._run(stacked)
            self._report(batch, waits, started)
            if reply.meta.get("status") == Status.BAD_INPUT:
                # One request's input failed the batch: run each on its own, so that only
                # that request fails and the others in its batch get their answers.
                for pending in batch:
                    if self._next_live(pending):
                        _resolve(pending, await self._run(pending.inputs))
                return
            if "error" in reply.meta:
                for pending in batch:
                    _resolve(pending, reply)
                return
            offset = 0
            for pending in batch:
                part = {n: v[offset:offset + pending.rows] for n, v in reply.tensors.items()}
                offset += pending.rows
                _resolve(pending, TensorMessage(reply.request_id, part, reply.meta))
        except Exception as err:  # never leave a client waiting
            for pending in batch:
                _resolve(pending, error_reply("", Status.INTERNAL, f"batching failed: {err}"))
        finally:
            self._inflight.release()


    def _report(self, batch: list[_Pending], waits: list[float], started: float) -> None:
        if self._on_batch is not None:
            self._on_batch(BatchStats(sum(p.rows for p in batch), len(batch), waits,
                                      time.perf_counter() - started))


def _resolve(pending: _Pending, reply: TensorMessage) -> None:
    if not pending.future.done():
        pending.future.set_result(reply)
