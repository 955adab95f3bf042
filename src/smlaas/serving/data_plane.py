"""The gateway's data plane: what REST and gRPC serve alike, with no protocol in it.

It holds the link to the stages (with readiness probing), the batcher, the limits that follow
from the model, metrics and Triton-style statistics. Each protocol front end decodes its own
wire format into an :class:`~smlaas.transport.v2.InferRequest`, calls :meth:`DataPlane.infer`,
and maps the one exception tree (:mod:`smlaas.errors`) to its status codes at its boundary, as
KServe's model server does: each error knows its :class:`~smlaas.errors.Status`, which knows
its HTTP status and gRPC code.

A request's deadline is its ``timeout`` parameter (Triton's, in microseconds) counted from its
arrival, capped by the gateway's ``request_timeout_s``; it goes with the request to the batcher
and to every stage. A request whose client has gone (``gone``) leaves the queue before it is
batched or sent. Outputs asked for as JSON are bounded before anything runs
(:func:`~smlaas.transport.v2.check_json_outputs`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np

import smlaas
from smlaas.errors import (
    BadRequest,
    ClientGone,
    DeadlineExceeded,
    GenerationError,
    ModelNotFound,
    PipelineFailed,
    QueueFull,
    Status,
    Unavailable,
)
from smlaas.receipts.digests import SALT_BYTES, bytes_digest
from smlaas.receipts.evidence import KeyEvidence, key_evidence_from_json
from smlaas.roles import GatewaySpec
from smlaas.serving.batcher import BatchStats, DynamicBatcher
from smlaas.serving.gateway_receipts import (
    INLINE_HASH_BYTES,
    Answer,
    GatewayReceipts,
    PendingReceipt,
)
from smlaas.serving.generation import Decoder, GenerationService, open_generation
from smlaas.serving.generation_requests import GENERATION_INPUTS, GENERATION_OUTPUTS
from smlaas.serving.hop import Hop
from smlaas.serving.metrics import GatewayMetrics
from smlaas.serving.model_config import model_config, model_metadata
from smlaas.serving.protocol import (
    Describe,
    Failure,
    Infer,
    Outputs,
    ReceiptAsk,
    TensorSpec,
    deadline_in,
)
from smlaas.serving.statistics import ModelStatistics
from smlaas.transport.v2 import InferRequest, json_output_bounds
from smlaas.transport.v2_limits import MAX_JSON_RESPONSE_BYTES, RequestLimits, check_json_outputs

logger = logging.getLogger(__name__)
T = TypeVar("T")
READY_CACHE_S = 1.0
PROBE_TIMEOUT_S = 2.0
RETRY_DELAY_S = 0.3
PROBE_INTERVAL_S = 5.0
DECODE_THREADS = 2
ENCODE_THREADS = 1
"""Responses are encoded by one thread: JSON encoding holds the GIL, so a second thread would
not encode faster, only make the event loop wait longer for the GIL (with one encoder and a
1 ms switch interval the loop lagged 8 ms at most while 2-row JSON responses of 3 MB were
encoded, against 25-45 ms with two at 5 ms)."""
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics",
              "smlaas_attestation"]
"""The protocol extensions this gateway implements (Triton's names), exactly: not
``model_repository``, whose load and unload it does not have (its index alone is served)."""


class FrontEnd(StrEnum):
    """The protocol a request came in by (the ``protocol`` label of the request metrics)."""

    REST = "rest"
    GRPC = "grpc"


def _default(name: str) -> Any:
    """The gateway spec's default for ``name`` (:mod:`smlaas.roles` holds each one)."""
    return next(f.default for f in fields(GatewaySpec) if f.name == name)


@dataclass(frozen=True)
class GatewaySettings:
    """How the data plane serves: the gateway spec's options it uses (same defaults)."""

    model_name: str
    max_batch_size: int = _default("max_batch_size")
    """0: the model is served without a batch dimension (shapes exactly as planned)."""
    max_queue_delay_us: int = _default("max_queue_delay_us")
    max_inflight: int = _default("max_inflight")
    """Batches in the pipeline at once (one per stage replica keeps each busy)."""
    request_timeout_s: float = _default("request_timeout_s")
    max_queue: int = _default("max_queue")
    """Requests waiting for the pipeline before the gateway answers 503."""
    stage_count: int | None = None
    """The manifest's number of stages: ready only when a probe passed through all of them
    (a host that cut the chain short gets "not ready", not wrong answers)."""
    labels: tuple[str, ...] | None = None
    """Class labels for the classification extension (index -> label)."""
    max_sequences_per_client: int = _default("max_sequences_per_client")
    """A decoder's sequences one client address may generate at once (0: half of them)."""
    max_json_response_bytes: int = MAX_JSON_RESPONSE_BYTES
    """What the outputs asked for as JSON may take; past it the client is told to ask for
    binary outputs (400)."""


@dataclass(frozen=True)
class ModelSpecs:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Pipeline:
    """The gateway's view of the stages: one multiplexed link to stage 0."""

    def __init__(self, link: Hop, *, timeout_s: float, stage_count: int | None = None) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.stage_count = stage_count
        self.specs: ModelSpecs | None = None
        self._ready_at = 0.0
        self.on_reports: Callable[[list[dict[str, Any]]], None] = lambda reports: None
        """Called with the stages' reports of every probe that passed through them."""

    async def run(self, inputs: dict[str, np.ndarray], *, deadline: float | None = None,
                  requests: int = 1, receipt: ReceiptAsk | None = None
                  ) -> Outputs | Failure:
        """Outputs, or a Failure, by ``deadline`` (Unix seconds; default: timeout_s from
        now); a stage that is down gets one retry. ``requests`` (the client requests in the
        batch) travels with it, for the stages' counts."""
        message = Infer(inputs, deadline_in(self.timeout_s) if deadline is None else deadline,
                        requests, receipt=receipt)
        reply = await self.link.request(message)
        if isinstance(reply, Failure) and reply.status == Status.UNAVAILABLE and \
                message.remaining_s() > RETRY_DELAY_S * 2:
            await asyncio.sleep(RETRY_DELAY_S)
            reply = await self.link.request(message)
        return reply

    async def probe(self) -> str | None:
        """None when every stage answers within PROBE_TIMEOUT_S, else why not."""
        if time.monotonic() - self._ready_at < READY_CACHE_S:
            return None
        reply = await self.link.describe(Describe(deadline_in(PROBE_TIMEOUT_S)))
        if isinstance(reply, Failure):
            return reply.message
        if self.stage_count is not None and reply.stages != tuple(range(self.stage_count)):
            return (f"the pipeline answered through stages {list(reply.stages)}, the manifest "
                    f"has {self.stage_count}")
        self.on_reports([dict(report) for report in reply.stage_stats])
        if self.specs is None:
            self.specs = ModelSpecs(list(reply.inputs), list(reply.outputs))
        self._ready_at = time.monotonic()
        return None

    async def key_evidence(self) -> list[KeyEvidence]:
        """Every stage replica's receipt key evidence (a describe that asks for it)."""
        reply = await self.link.describe(Describe(deadline_in(PROBE_TIMEOUT_S * 2),
                                                  evidence=True))
        if isinstance(reply, Failure):
            raise Unavailable(f"the stages' evidence is not available: {reply.message}")
        keys: dict[bytes, KeyEvidence] = {}
        for report in reply.stage_stats:
            if "receipt_key" in report:
                try:
                    key = key_evidence_from_json(report["receipt_key"])
                except (KeyError, TypeError, ValueError) as err:
                    raise Unavailable(f"a stage sent malformed evidence: {err}") from err
                keys[key.kid] = key
        return list(keys.values())

    async def model_specs(self) -> ModelSpecs:
        if self.specs is None:
            problem = await self.probe()
            if problem is not None or self.specs is None:
                raise Unavailable(problem or "the pipeline did not describe the model")
        return self.specs


class DataPlane:
    """The model behind the gateway, as every protocol serves it."""

    def __init__(self, settings: GatewaySettings, link: Hop, *,
                 evidence: Callable[[], dict[str, Any]] | None = None,
                 attested_at: float | None = None,
                 receipts: GatewayReceipts | None = None) -> None:
        self.settings = settings
        self.receipts = receipts
        self.name = settings.model_name
        self.batching = settings.max_batch_size > 0
        self.labels = list(settings.labels) if settings.labels else None
        self.metrics = GatewayMetrics(self.name, attested_at=attested_at)
        self.statistics = ModelStatistics(self.name, MODEL_VERSION)
        self.pipeline = Pipeline(link, timeout_s=settings.request_timeout_s,
                                 stage_count=settings.stage_count)
        self.pipeline.on_reports = self.metrics.stages.update
        self.batcher = DynamicBatcher(
            self.pipeline.run, max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_inflight=settings.max_inflight, max_queue=settings.max_queue,
            on_batch=self._record_batch,
            on_abandoned=lambda count: self.metrics.abandoned.labels(self.name).inc(count))
        self._evidence = evidence
        self._link = link
        self._decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="gateway-decode")
        self._encoder = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="gateway-encode")
        self._limits: RequestLimits | None = None
        self._prober: asyncio.Task[None] | None = None
        self.metrics.abandoned.labels(self.name)  # shown from 0, not from the first one
        self.decoder = Decoder(functools.partial(
            open_generation, link, self.name, max_inflight=settings.max_inflight,
            timeout_s=settings.request_timeout_s,
            max_per_client=settings.max_sequences_per_client,
            metrics=self.metrics.generation))
        """Whether the model generates, and its generation service once known."""

    async def generation(self) -> GenerationService:
        """The decoder's generation service (:meth:`Decoder.service`)."""
        return await self.decoder.service()

    async def start(self) -> None:
        self.batcher.start()
        self._prober = asyncio.create_task(self._probe_forever())

    async def stop(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        await self.batcher.stop()
        await self._link.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    # -- health and metadata ---------------------------------------------------------------
    async def ready(self) -> str | None:
        """None when every stage answers, else why not (pipeline_up follows)."""
        problem = await self.pipeline.probe()
        self.metrics.pipeline_up.labels(self.name).set(problem is None)
        return problem

    async def _probe_forever(self) -> None:
        """Keeps pipeline_up current even when nobody asks for readiness."""
        while True:
            try:
                await asyncio.wait_for(self.ready(), PROBE_TIMEOUT_S * 2)
                if self.pipeline.specs is not None and self.decoder.known() is None:
                    await self.decoder.learn()  # gRPC's limits wait for the answer
            except TimeoutError:
                self.metrics.pipeline_up.labels(self.name).set(0)
            except Exception:  # a probe must never stop probing
                logger.exception("readiness probe failed")
            await asyncio.sleep(PROBE_INTERVAL_S)

    def check_model(self, model: str, version: str = "") -> None:
        if model != self.name:
            raise ModelNotFound(f"unknown model {model[:100]!r}; this gateway serves "
                                f"{self.name!r}")
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(f"model {self.name!r} has no version {version[:100]!r} "
                                f"(versions: {MODEL_VERSION})")

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "smlaas", "version": smlaas.__version__, "extensions": EXTENSIONS}

    async def specs(self) -> ModelSpecs:
        try:
            return await self.pipeline.model_specs()
        except Unavailable as err:
            raise Unavailable(f"model {self.name!r} is not ready: {err}") from err

    async def interface(self) -> ModelSpecs:
        """The model's inputs and outputs as V2 tensor inference takes them: a decoder's are
        generation's (text or token ids in, text and token ids out), which gRPC's inference
        calls serve, as a decoupled model in Triton (REST generates on its generate routes;
        its ``/infer`` refuses a decoder, as Triton's HTTP ``infer`` refuses a decoupled
        model)."""
        specs = await self.specs()
        if await self.decoder.generates():
            return ModelSpecs(list(GENERATION_INPUTS), list(GENERATION_OUTPUTS))
        return specs

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        self.check_model(model, version)
        specs = await self.interface()
        return model_metadata(self.name, MODEL_VERSION, specs.inputs, specs.outputs,
                              batching=self.batching and self.decoder.current is None)

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        """Triton's model configuration (:func:`~smlaas.serving.model_config.model_config`);
        a decoder's is a decoupled model's."""
        self.check_model(model, version)
        specs = await self.interface()
        decoupled = self.decoder.current is not None
        return model_config(self.name, specs.inputs, specs.outputs,
                            max_batch_size=0 if decoupled else self.settings.max_batch_size,
                            max_queue_delay_us=self.settings.max_queue_delay_us,
                            decoupled=decoupled)

    def model_statistics(self, model: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics JSON, for one model or (``model`` empty) all of them."""
        if model:
            self.check_model(model, version)
        return {"model_stats": [self.statistics.to_dict()]}

    def evidence(self) -> Callable[[], dict[str, Any]] | None:
        return self._evidence

    # -- inference -------------------------------------------------------------------------
    async def limits(self) -> RequestLimits:
        if self._limits is None:
            specs = await self.specs()
            self._limits = RequestLimits.for_model(
                specs.inputs, max_batch_size=self.settings.max_batch_size)
        return self._limits

    async def decode(self, decode: Callable[[], T]) -> T:
        """Runs a (CPU-bound, possibly large) decoding off the event loop."""
        return await self.off_loop(decode)

    async def off_loop(self, work: Callable[[], T]) -> T:
        """Runs CPU-bound work (decoding, compressing) in the gateway's worker threads, so
        that the event loop keeps answering (health, other requests)."""
        return await asyncio.get_running_loop().run_in_executor(self._decoder, work)

    async def encode(self, work: Callable[[], T]) -> T:
        """Runs a response's encoding off the event loop, in the one encoding thread."""
        return await asyncio.get_running_loop().run_in_executor(self._encoder, work)

    def timeout_s(self, request: InferRequest) -> float:
        """The request's time to answer: its ``timeout``, capped by the gateway's."""
        gateway = self.settings.request_timeout_s
        return min(gateway, request.timeout_us / 1e6) if request.timeout_us else gateway

    def _timeout_text(self, request: InferRequest) -> str:
        if request.timeout_us and request.timeout_us / 1e6 < self.settings.request_timeout_s:
            return f"the request's timeout of {request.timeout_us} us"
        return f"the gateway's request timeout of {self.settings.request_timeout_s:g} s"

    def check_room(self, *, protocol: FrontEnd = FrontEnd.GRPC) -> None:
        """Unavailable when the batch queue is full now, so that a front end need not read
        and decode a request it could not queue."""
        if self.batcher.queue_depth >= self.settings.max_queue:
            self.metrics.errors.labels(self.name, "queue_full", protocol).inc()
            raise Unavailable(f"model {self.name!r} is busy: {self.settings.max_queue} "
                              f"requests are waiting already; retry later")

    def check_json_size(self, request: InferRequest) -> None:
        """BadRequest before anything runs when the outputs ``request`` asks for as JSON
        could take more than the gateway returns as JSON (their size follows from the
        model's output shapes at the request's batch)."""
        specs = self.pipeline.specs
        if specs is not None:
            check_json_outputs(json_output_bounds(request, specs.outputs,
                                                  batching=self.batching),
                               limit=self.settings.max_json_response_bytes)

    async def infer(self, request: InferRequest, *,
                    unless: Callable[[Awaitable[Outputs | Failure]],
                                     Awaitable[Outputs | Failure]] | None = None,
                    gone: Callable[[], bool] | None = None,
                    received: float | None = None,
                    protocol: FrontEnd = FrontEnd.GRPC) -> Answer:
        """The outputs for a decoded request. ``unless`` wraps the wait (e.g. to withdraw
        it when the client goes); ``gone`` says synchronously whether the client has left
        (checked before the request is batched and before its batch is sent); ``received``
        (``time.perf_counter()`` at its arrival) is where its timeout counts from.
        ``protocol`` labels the metrics. Raises BadRequest, Unavailable, DeadlineExceeded,
        PipelineFailed, ClientGone."""
        if self.decoder.current is not None:
            raise GenerationError(
                f"model {self.name!r} generates: ask it with POST /v2/models/{self.name}/"
                f"generate or generate_stream, /v1/completions, or gRPC ModelInfer / "
                f"ModelStreamInfer with text_input or input_ids")
        self.check_json_size(request)
        if gone is not None and gone():
            raise ClientGone("the client disconnected before its request was queued")
        remaining_s = self.timeout_s(request) - (
            0.0 if received is None else time.perf_counter() - received)
        if remaining_s <= 0:
            self.metrics.errors.labels(self.name, Status.DEADLINE, protocol).inc()
            raise DeadlineExceeded(f"{self._timeout_text(request)} passed before the request "
                                   f"could be queued")
        self.metrics.queue_depth.labels(self.name).set(self.batcher.queue_depth)
        if request.receipt and self.receipts is None:
            raise BadRequest("this gateway does not sign receipts")
        salt = secrets.token_bytes(SALT_BYTES) if request.receipt else None
        waiting = asyncio.wait_for(self.batcher.submit(
            request.inputs, request.batch, deadline=time.time() + remaining_s, gone=gone,
            salt=salt), remaining_s)
        try:
            reply = await (unless(waiting) if unless is not None else waiting)
        except QueueFull as err:
            self.metrics.errors.labels(self.name, "queue_full", protocol).inc()
            raise Unavailable(f"model {self.name!r} is busy: {err}") from err
        except TimeoutError as err:
            self.metrics.errors.labels(self.name, Status.DEADLINE, protocol).inc()
            raise DeadlineExceeded(f"no result within {self._timeout_text(request)}") from err
        if isinstance(reply, Failure):
            if reply.status == Status.CLIENT_GONE:
                raise ClientGone(reply.message)
            self.metrics.errors.labels(self.name, reply.status, protocol).inc()
            if reply.status == Status.DEADLINE:
                raise DeadlineExceeded(f"no result within {self._timeout_text(request)} "
                                       f"({reply.message})")
            raise PipelineFailed(reply.message, status=reply.status)
        self.metrics.record_stages(self.name, list(reply.stage_ms))
        missing = [o for o in request.outputs or [] if o not in reply.tensors]
        if missing:
            raise PipelineFailed(f"the pipeline returned no {missing}", status=Status.INTERNAL)
        pending = None
        if salt is not None:
            expected = self.settings.stage_count
            if not reply.receipts or (expected and len(reply.receipts) != expected):
                raise Unavailable("a stage did not sign its receipt; retry later")
            pending = PendingReceipt(reply.receipts, reply.index, salt)
        return Answer(dict(reply.tensors), pending)

    def request_digest(self, body: bytes | bytearray) -> Awaitable[bytes]:
        """The digest of a request's bytes for its receipt: on the loop when small, else in
        the encoding thread while the pipeline runs (start it before :meth:`infer`)."""
        if len(body) <= INLINE_HASH_BYTES:
            done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            done.set_result(bytes_digest(body))
            return done
        return asyncio.ensure_future(self.encode(lambda: bytes_digest(body)))

    async def sign_receipt(self, request: InferRequest, answer: Answer, *,
                           request_digest: Awaitable[bytes], response_bytes: bytes) -> bytes:
        """The gateway's receipt for ``answer`` (the request asked for one): it covers the
        request bytes (``request_digest``) and the response bytes exactly, and closes the
        stages' chain: the inputs are the ones stage 0 received, the outputs the ones the
        last stage sent (this gateway split them from its batch itself)."""
        assert self.receipts is not None and answer.receipt is not None
        signer, pending = self.receipts.signer, answer.receipt
        first, last = pending.stages[0].leaves, pending.stages[-1].leaves
        digest = await request_digest

        version = self.receipts.release_version()

        def sign() -> bytes:
            return signer.sign_request(
                request_id=request.id or "", request_digest=digest,
                response_bytes=response_bytes, received=first[pending.index].received,
                sent=last[pending.index].sent, salt=pending.salt, stages=pending.stages,
                index=pending.index, release_version=version)

        return sign() if len(response_bytes) <= INLINE_HASH_BYTES else await self.encode(sign)

    async def evidence_bundle(self) -> bytes:
        """The evidence every receipt refers to (CBOR; rebuilt when EVIDENCE_TTL_S old)."""
        if self.receipts is None:
            raise ModelNotFound("this gateway does not sign receipts")
        return await self.receipts.bundle(self.pipeline.key_evidence)

    def record(self, *, code: str, ok: bool, started: float, decode_s: float = 0.0,
               encode_s: float = 0.0, unknown_model: bool = False,
               protocol: FrontEnd = FrontEnd.GRPC) -> None:
        """Counts one finished request in the metrics and statistics (``protocol``: see
        :meth:`infer`)."""
        total = time.perf_counter() - started
        self.metrics.requests.labels("unknown" if unknown_model else self.name, code,
                                     protocol).inc()
        if not unknown_model:
            self.metrics.latency.labels(self.name, protocol).observe(total)
            self.statistics.record_request(ok=ok, total_s=total, decode_s=decode_s,
                                           encode_s=encode_s)

    def _record_batch(self, stats: BatchStats) -> None:
        self.metrics.record_batch(self.name, stats)
        self.statistics.record_batch(stats)
