"""A stage worker: one stage's ONNX Runtime session behind a mutual-TLS server.

Requests arrive from the previous role (the gateway for stage 0) on a TLS stream; the stage
runs them one at a time on its session, in arrival order, while the requests before them are
already in the next stages (pipelining): in its run thread, or on its event loop when the
request is alone in the stage (:data:`INLINE_RUN_MAX_S`). Queues are bounded: when
``queue_size`` requests wait here, further requests wait for room (up to :data:`READ_AHEAD`
per upstream connection; past that the worker stops reading it and TCP pushes back); at most
``queue_size`` requests are in flight downstream. Every reply, success or error, goes back on
the connection the request came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from smlaas.errors import (
    ConfigError,
    GenerationError,
    ProfileError,
    ProtocolError,
    Status,
    Unavailable,
    status_of,
)
from smlaas.graph.dims import fixed_dim
from smlaas.receipts.claims import StageReceipt, StageSigner
from smlaas.receipts.evidence import KeyEvidence, key_evidence_to_json
from smlaas.runtime.stage_runner import StageRunner
from smlaas.serving.hop import Hop
from smlaas.serving.protocol import (
    Describe,
    Description,
    Failure,
    Infer,
    Outputs,
    Reply,
    Request,
    Signed,
    TensorSpec,
    from_frame,
    to_frame,
)
from smlaas.serving.sequences import GenerationStage
from smlaas.serving.stage_receipts import (
    READ_AHEAD,
    AwaitedReceipts,
    PendingReceipt,
    StageReceipts,
)
from smlaas.transport.streams import MessageStream, start_stream_server
from smlaas.transport.tensors import TensorMessage, wire_dtype
from smlaas.transport.tls import require_peer

logger = logging.getLogger(__name__)

INLINE_RUN_MAX_S = 0.1
"""A stage runs a request on its event loop when that request is the only one in the stage
(nothing queued, nothing downstream, no reply or receipt outstanding), its input is no larger
than one it has run, and every run so far took at most this long: the loop has nothing else
to do meanwhile, and the hand-over to the run thread and back cost 0.28 and 0.35 ms per
request in a deployed stage (timestamps in each process, ResNet-50 as one stage, sequential
requests). A describe (a readiness probe) that comes meanwhile waits for the run, hence the
bound; a stage that ever ran longer after its first (cold) run, or whose model has control
flow (a run's length could follow the input's values, not its size), keeps its loop free for
good."""
INLINE_UNSAFE_OPS = frozenset({"Loop", "If", "Scan"})


def tensor_specs(values: Any) -> list[TensorSpec]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [fixed_dim(d) for d in tensor_type.shape.dim]
        dtype = wire_dtype(np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)))
        specs.append(TensorSpec(value.name, dtype, dims))
    return specs


@dataclass
class StageStats:
    """What a stage reports about itself on every describe (the gateway's metrics): counters
    since this process started, and its incarnation, so a restart shows as a new one."""

    index: int
    attested_at: float
    """Unix time this process's enclave was attested by the coordinator."""
    replica: int = 0
    predicted: dict[str, int] = field(default_factory=dict)
    """The plan's predicted working set and usable EPC (bytes), when the plan is at hand."""
    incarnation: str = field(default_factory=lambda: secrets.token_hex(8))
    requests: int = 0
    """Requests run (a batch counts each of its requests)."""
    batches: int = 0
    errors: int = 0
    expired: int = 0
    run_seconds: float = 0.0
    receipt_seconds: float = 0.0
    """Seconds spent hashing and signing receipts (outside ``run_seconds``)."""

    def snapshot(self, queue_depth: int) -> dict[str, Any]:
        return {**asdict(self), "queue_depth": queue_depth}


class StageWorker:
    """One stage: :meth:`handle` answers a request (in this process, through a
    :class:`~smlaas.serving.hop.LocalHop`); :meth:`serve` answers them on a mutual-TLS
    server."""

    def __init__(self, *, index: int, runner: StageRunner, model: onnx.ModelProto,
                 server_context: ssl.SSLContext | None, upstream_role: str,
                 manifest_digest: str, next_link: Hop | None, queue_size: int = 4,
                 stats: StageStats | None = None, signer: StageSigner | None = None,
                 evidence: Callable[[], KeyEvidence] | None = None,
                 generation: GenerationStage | None = None,
                 generation_report: Mapping[str, Any] | None = None) -> None:
        self.index, self.runner = index, runner
        self.stats = stats or StageStats(index, attested_at=time.time())
        self.upstream_role, self.manifest_digest = upstream_role, manifest_digest
        self._server_context = server_context
        self._next = next_link
        self._inputs, self._outputs = tensor_specs(model.graph.input), \
            tensor_specs(model.graph.output)
        self._queue_size = queue_size
        self._in_stage = 0
        """Requests from their arrival to their reply's sending."""
        self._inline = not any(node.op_type in INLINE_UNSAFE_OPS for node in model.graph.node)
        """Whether requests may still run on the loop (see INLINE_RUN_MAX_S)."""
        self._largest_run_bytes = -1
        """The largest input run so far: one no larger runs on the loop, when alone."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"stage-{index}-run")
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner_task: asyncio.Task[None] | None = None
        self._receipts = None if signer is None else StageReceipts(
            signer, index, last=next_link is None, on_signed=self._count_signing)
        self._evidence = evidence
        """This stage's current receipt key evidence, reported on describes asking."""
        self._generation = generation
        self._generation_report = generation_report
        """Stage 0's answer to a describe asking for generation: the plan's sizes and the
        tokenizer sealed with the model."""

    async def start(self) -> None:
        """Starts running queued requests (call from the loop that will handle them)."""
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue(self._queue_size)
        self._downstream_slots = asyncio.Semaphore(self._queue_size)
        self._runner_task = asyncio.create_task(self._run_forever())

    async def stop(self) -> None:
        if self._runner_task is not None:
            self._runner_task.cancel()
        if self._next is not None:
            await self._next.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._receipts is not None:
            self._receipts.shutdown()

    async def handle(self, request_id: str, message: Request,
                     previous: Awaitable[StageReceipt] | None = None) -> Reply:
        """The reply to one request (``previous``: the previous stage's receipt for it, when
        it asks for receipts); waits for room while the queue is full."""
        if isinstance(message, Describe):
            return await self._describe(request_id, message)
        self._in_stage += 1
        try:
            return await (await self._enqueue(request_id, message, previous))
        finally:
            self._in_stage -= 1

    async def _admit(self, upstream: _Upstream, request_id: str, message: Infer,
                     previous: Awaitable[StageReceipt] | None,
                     admitting: asyncio.Semaphore) -> None:
        self._in_stage += 1
        try:
            try:
                future = await self._enqueue(request_id, message, previous)
            finally:
                admitting.release()
            await upstream.reply(request_id, future)
        finally:
            self._in_stage -= 1

    async def _enqueue(self, request_id: str, message: Infer,
                       previous: Awaitable[StageReceipt] | None = None
                       ) -> asyncio.Future[Reply]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        await self._queue.put(_Queued(request_id, message, future, previous))  # full: wait
        return future

    async def serve(self, host: str, port: int, *, stop: asyncio.Event) -> None:
        if self._server_context is None:
            raise ConfigError("a stage served over the network needs its TLS identity")
        await self.start()
        server = await start_stream_server(
            self._connection, host, port, ssl_context=self._server_context,
            check_peer=lambda tls: require_peer(tls, self.upstream_role, self.manifest_digest),
            on_refused=lambda err: logger.warning("stage %d refused a connection: %s",
                                                  self.index, err))
        logger.info("stage %d serving on %s:%d", self.index, host, port)
        try:
            await stop.wait()
        finally:
            server.close()
            await self.stop()

    async def _connection(self, stream: MessageStream) -> None:
        """One upstream connection (its peer already checked: the upstream role, admitted
        under our manifest). It reads on while the queue is full (a receipt that follows its
        batch must reach the batches waiting on it), up to READ_AHEAD requests waiting for
        room; then it stops reading (TCP pushes back)."""
        upstream = _Upstream(stream)
        awaited = AwaitedReceipts()
        admitting = asyncio.Semaphore(READ_AHEAD)
        try:
            while True:
                frame = await stream.read()
                message = from_frame(frame)
                if isinstance(message, Describe):
                    self._spawn(upstream.reply(frame.request_id,
                                               self._describe(frame.request_id, message)))
                elif isinstance(message, Infer):
                    previous = awaited.expect(frame.request_id) \
                        if message.receipt is not None and self.index > 0 else None
                    await admitting.acquire()
                    self._spawn(self._admit(upstream, frame.request_id, message, previous,
                                            admitting))
                elif isinstance(message, Signed):
                    awaited.arrived(frame.request_id, message.receipt)
                else:
                    raise ProtocolError(f"a {type(message).__name__} is not a request")
        except (EOFError, OSError, ssl.SSLError) as err:
            logger.debug("upstream connection closed: %s", err)
        except ProtocolError as err:
            logger.warning("stage %d dropped a connection from %s: %s", self.index,
                           self.upstream_role, err)
        finally:
            awaited.close()
            stream.close()

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            queued = await self._queue.get()
            message, future = queued.message, queued.future
            if future.done():  # its asker has gone
                _forget(queued.previous)
                continue
            if message.expired():
                _forget(queued.previous)
                self.stats.expired += 1
                future.set_result(Failure(Status.DEADLINE,
                                          f"deadline passed before stage {self.index}"))
                continue
            try:
                size = sum(np.asarray(v).nbytes for v in message.tensors.values())
                if self._inline and self._in_stage == 1 and size <= self._largest_run_bytes:
                    outputs, elapsed = self._timed_run(message)  # see INLINE_RUN_MAX_S
                else:
                    outputs, elapsed = await loop.run_in_executor(
                        self._executor, self._timed_run, message)
                if self._largest_run_bytes >= 0:  # the first run is cold: not a measure
                    self._inline = self._inline and elapsed <= INLINE_RUN_MAX_S
                self._largest_run_bytes = max(self._largest_run_bytes, size)
            except (GenerationError, Unavailable) as err:  # a step this stage cannot take
                _forget(queued.previous)
                self.stats.errors += 1
                _settle(future, Failure(status_of(err), f"stage {self.index}: {err}"))
                continue
            except ProfileError as err:
                # ONNX Runtime's text names the sub-model's nodes and shapes: it stays in this
                # stage's log, and the client gets a short reason with a reference to it.
                _forget(queued.previous)
                self.stats.errors += 1
                reference = secrets.token_hex(4)
                logger.warning("stage %d could not run request %s (reference %s): %s",
                               self.index, queued.request_id, reference, err)
                _settle(future, Failure(
                    Status.BAD_INPUT,
                    f"stage {self.index} could not run the model on this input (values out of "
                    f"the model's range?); reference {reference} in the stage's log"))
                continue
            self.stats.requests += message.requests
            self.stats.batches += 1
            self.stats.run_seconds += elapsed
            # signed once the batch is on its way (the last stage: at once, on this loop)
            signed = None if message.receipt is None or self._receipts is None else \
                self._receipts.pending(message, outputs, queued.previous)
            onward = message.after_stage(outputs, round(elapsed * 1e3, 3))
            if self._next is None:
                answer = Outputs(onward.tensors, onward.stage_ms)
                if signed is None:
                    _settle(future, answer)
                else:
                    self._spawn(self._with_receipt(future, answer, signed.start()))
            else:
                await self._downstream_slots.acquire()
                self._spawn(self._forward(onward, future, signed))

    def _timed_run(self, message: Infer) -> tuple[dict[str, np.ndarray], float]:
        """The stage's outputs and its own run time (s); in the run thread. The run time is
        the session's alone (not the hand-over to and from this thread)."""
        started = time.perf_counter()
        if message.step is None and self._generation is not None and \
                self._generation.cache.pairs:
            raise GenerationError("this model keeps a KV cache in its stages: ask it with "
                                  "generate, generate_stream or /v1/completions")
        if message.step is None:
            outputs = self.runner.run(message.tensors)
        elif self._generation is None:
            raise GenerationError("this model does not generate")
        else:
            outputs = self._generation.run(message.tensors, message.step)
        return outputs, time.perf_counter() - started

    async def _forward(self, message: Infer, future: asyncio.Future[Reply],
                       signed: PendingReceipt | None) -> None:
        """Sends ``message`` on (followed by this stage's receipt once signed) and answers
        the next stage's reply, with this stage's receipt in front of the later ones."""
        assert self._next is not None
        try:
            # a request id of this hop's own (the upstream's could repeat across its
            # replicas' connections; a receipt that follows is matched by this one)
            reply = await self._next.request(
                message, follow=None if signed is None else signed.start)
        finally:
            self._downstream_slots.release()
        if signed is None or not isinstance(reply, Outputs):
            _settle(future, reply)
        else:
            await self._with_receipt(future, reply, signed.start())

    async def _with_receipt(self, future: asyncio.Future[Reply], reply: Outputs,
                            signed: Awaitable[StageReceipt]) -> None:
        try:
            receipt = await signed
        except Exception as err:  # noqa: BLE001 - the batch fails, the stage goes on
            logger.warning("stage %d could not sign its receipt: %s", self.index, err)
        else:
            _settle(future, dataclasses.replace(reply, receipts=(receipt, *reply.receipts)))
        finally:  # failed, or cancelled (shutting down): never leave the asker waiting
            _settle(future, Failure(Status.UNAVAILABLE,
                                    f"stage {self.index} could not sign its receipt"))

    def _count_signing(self, seconds: float) -> None:
        self.stats.receipt_seconds += seconds

    async def _describe(self, request_id: str, message: Describe) -> Description | Failure:
        if self._next is None:
            reply: Description | Failure = Description((), tuple(self._outputs))
        else:
            reply = await self._next.describe(message, request_id=request_id)
        if isinstance(reply, Failure):
            return reply
        report = self.stats.snapshot(self._queue.qsize())
        if self._generation is not None:
            report["sequences"] = self._generation.cache.active
        if message.generation and self._generation_report is not None:
            report["generation"] = dict(self._generation_report)
        if message.evidence and self._evidence is not None:
            report["receipt_key"] = key_evidence_to_json(self._evidence())
        return reply.through(self.index, tuple(self._inputs), report)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


@dataclass(frozen=True)
class _Queued:
    request_id: str
    message: Infer
    future: asyncio.Future[Reply]
    previous: Awaitable[StageReceipt] | None = None
    """The previous stage's receipt for the batch, when it asks for receipts."""


def _forget(previous: Awaitable[StageReceipt] | None) -> None:
    """A batch that will not be signed no longer waits for the previous stage's receipt."""
    if isinstance(previous, asyncio.Future) and not previous.done():
        previous.cancel()


def _settle(future: asyncio.Future[Reply], reply: Reply) -> None:
    if not future.done():
        future.set_result(reply)


class _Upstream:
    """Replies to one upstream connection; a dead connection drops them (its requester has
    already failed them)."""

    def __init__(self, stream: MessageStream) -> None:
        self._stream = stream
        self._lock = asyncio.Lock()

    async def reply(self, request_id: str, answer: Awaitable[Reply]) -> None:
        await self.send(to_frame(request_id, await answer))

    async def send(self, frame: TensorMessage) -> None:
        if self._stream.is_closing():
            return
        async with self._lock:
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                self._stream.write(frame)
                await asyncio.wait_for(self._stream.drain(), 30.0)
