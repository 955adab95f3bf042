"""The gateway's gRPC front end: the KServe V2 / Triton ``inference.GRPCInferenceService``
(the messages ``tritonclient[grpc]`` ships) over TLS with the gateway's attested key, on the
same :class:`~smlaas.serving.data_plane.DataPlane` as REST (one batcher, one set of limits,
metrics and statistics), so ``tritonclient.grpc`` works unchanged, streaming included.

Bounded as REST is (:mod:`~smlaas.serving.grpc_limits`): gRPC itself refuses a message larger
than the model's inputs can fill and calls beyond a bound; at most ``max_inferences``
requests are decoded or waiting at once, the others refused with ``RESOURCE_EXHAUSTED``. An
inference arrives as bytes: it is parsed, checked against the model from its metadata, then
converted (:mod:`~smlaas.serving.grpc_codec`) off the event loop, and its response is encoded
and serialized off the loop too (a small one on the loop, where a hop to a thread costs
more), so health answers meanwhile. Once a burst of large messages is over, the memory they
took is given back to the system (:func:`give_back_free_memory`).

``ModelStreamInfer`` runs each request of a stream through the same path, up to half the
inference bound at once per stream (the stream is not read further meanwhile), and answers
each as it completes: a ``ModelStreamInferResponse`` with ``infer_response``, or with
``error_message`` (``"[request id: ID] CODE: reason"``, as Triton names the request) and the
request's id in ``infer_response``.

A decoder generates on both calls (:mod:`~smlaas.serving.grpc_generate`): its messages are
bounded by generation's limits (a prompt and a few parameters in; at most the context's
tokens out, :func:`~smlaas.serving.grpc_limits.generation_limits`), which gRPC takes once
the pipeline has said that the model generates; every count in a message is checked before
its values are converted, and a stream answers a request with a response per token.

Errors map at this boundary: bad input ``INVALID_ARGUMENT``, unknown model ``NOT_FOUND``
(``ModelReady`` answers false), too large or too many ``RESOURCE_EXHAUSTED``, a stage down or
a full queue ``UNAVAILABLE``, a missed deadline ``DEADLINE_EXCEEDED``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2, service_pb2

from smlaas.errors import (
    GenerationError,
    ModelNotFound,
    PipelineFailed,
    SmlaasError,
    Status,
    TooLarge,
    TooManyCalls,
    status_of,
)
from smlaas.serving.data_plane import MODEL_VERSION, DataPlane, FrontEnd
from smlaas.serving.grpc_codec import (
    FINAL_REQUESTED,
    GrpcRequestDecoder,
    as_stream_response,
    encode_infer_response,
    parse_request,
    receipt_entry,
    request_parameters,
    stream_error,
)
from smlaas.serving.grpc_generate import (
    MAX_PROMPT_BYTES,
    MAX_TOKEN_TEXT_BYTES,
    GrpcGeneration,
    generation_request,
    peer_address,
    responses,
)
from smlaas.serving.grpc_limits import (
    BOOTSTRAP_LIMITS,
    GrpcLimits,
    InferenceSlots,
    generation_limits,
)
from smlaas.serving.grpc_server import GrpcServer

__all__ = ["GrpcEndpoints", "create_grpc_server"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE = "inference.GRPCInferenceService"
TRIM_AFTER_BYTES = 64 << 20
"""Bytes of messages after which the gateway, once idle, gives free memory back."""
INLINE_BYTES = 256 * 1024
"""Messages and responses up to this size are parsed or encoded on the event loop: below it
a hop to a thread costs more than the work (under a millisecond)."""


@dataclass
class _Outcome:
    """One inference's serialized response, or the error that ended it."""

    response: bytes = b""
    error: SmlaasError | None = None
    request_id: str = ""
    model_name: str = ""
    model_version: str = ""
    final: bool = False
    """The client asked responses to carry ``triton_final_response``."""
    generation: GrpcGeneration | None = None
    """The request asks a decoder to generate: its responses are still to come."""


UNARY_REQUESTS = {"ServerLive": service_pb2.ServerLiveRequest,
                  "ServerReady": service_pb2.ServerReadyRequest,
                  "ModelReady": service_pb2.ModelReadyRequest,
                  "ServerMetadata": service_pb2.ServerMetadataRequest,
                  "ModelMetadata": service_pb2.ModelMetadataRequest,
                  "ModelConfig": service_pb2.ModelConfigRequest,
                  "ModelStatistics": service_pb2.ModelStatisticsRequest,
                  "RepositoryIndex": service_pb2.RepositoryIndexRequest}
"""The service's calls other than inference, with their request messages."""
RECEIPTS_SERVICE = "smlaas.Receipts"

class GrpcEndpoints:
    """The V2 gRPC calls over a data plane; its exceptions become gRPC codes here only."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.limits = BOOTSTRAP_LIMITS
        self.slots = InferenceSlots(BOOTSTRAP_LIMITS.max_inferences)
        self._decoder: GrpcRequestDecoder | None = None
        self._received_bytes = 0
        self._trimming: set[asyncio.Future[None]] = set()

    def model_limits(self) -> GrpcLimits | None:
        """The model's limits once the pipeline has described it (and said whether it
        generates), else None."""
        specs, generates = self.plane.pipeline.specs, self.plane.decoder.known()
        if specs is None or generates is None:
            return None
        service = self.plane.decoder.current
        if generates and service is not None:
            limits = service.generator.limits
            return generation_limits(max_context=limits.max_context,
                                     max_sequences=limits.max_sequences,
                                     max_prompt_bytes=MAX_PROMPT_BYTES,
                                     max_token_text_bytes=MAX_TOKEN_TEXT_BYTES)
        return GrpcLimits.for_model(specs.inputs, specs.outputs,
                                    max_batch_size=self.plane.settings.max_batch_size,
                                    labels=self.plane.labels)

    def use(self, limits: GrpcLimits) -> None:
        self.limits = limits
        self.slots.bound = limits.max_inferences

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method table: inferences travel as bytes (parsed and serialized off
        the event loop here), the other calls as messages."""
        unary = UNARY_REQUESTS
        methods = {name: grpc.unary_unary_rpc_method_handler(
            _parsed(getattr(self, name), message), response_serializer=_serialize)
            for name, message in unary.items()}
        methods["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.ModelInfer)
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer)
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def receipts_handler(self) -> grpc.GenericRpcHandler:
        """``/smlaas.Receipts/Evidence``: the evidence receipts refer to, as REST's
        ``GET /v2/smlaas/evidence`` (request: empty; response: the CBOR bundle's bytes)."""
        return grpc.method_handlers_generic_handler(RECEIPTS_SERVICE, {
            "Evidence": grpc.unary_unary_rpc_method_handler(self.Evidence)})

    async def Evidence(self, request: bytes, context: Any) -> bytes:  # noqa: N802
        if request:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "Evidence takes an empty request")
        return await _guard(context, self.plane.evidence_bundle())

    # -- health and metadata ---------------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC names
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=await self.plane.ready() is None)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            self.plane.check_model(request.name, request.version)
        except ModelNotFound:  # as REST: not ready, rather than an error
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=await self.plane.ready() is None)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        metadata = await _guard(context, self.plane.model_metadata(request.name,
                                                                   request.version))
        return json_format.ParseDict(metadata, service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        config = await _guard(context, self.plane.model_config(request.name, request.version))
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(
            config, model_config_pb2.ModelConfig()))


    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        stats = await _guard(context, _now(self.plane.model_statistics, request.name,
                                           request.version))
        return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        state = "READY" if await self.plane.ready() is None else "UNAVAILABLE"
        return service_pb2.RepositoryIndexResponse(models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(
                name=self.plane.name, version=MODEL_VERSION, state=state)])

    # -- inference -------------------------------------------------------------------------
    async def ModelInfer(self, data: bytes, context: Any) -> bytes:  # noqa: N802
        outcome = await self._infer(data, stream=False, client=_client_of(context))
        if outcome.generation is not None:
            try:
                if outcome.generation.stream:
                    raise GenerationError("stream: true needs ModelStreamInfer (a response "
                                          "per token); ModelInfer answers once")
                outcome.response = b"".join(
                    [r async for r in self._generated(outcome.generation)])
            except SmlaasError as err:
                outcome.error = err
        if outcome.error is not None:
            await context.abort(_grpc_code(outcome.error), _details(outcome.error))
        return outcome.response

    async def ModelStreamInfer(self, requests: AsyncIterator[bytes],  # noqa: N802
                               context: Any) -> AsyncIterator[bytes]:
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        window = asyncio.Semaphore(max(1, self.limits.max_inferences // 2))
        running: set[asyncio.Task[None]] = set()
        client = _client_of(context)

        async def answer(data: bytes) -> None:
            try:
                outcome = await self._infer(data, stream=True, client=client)
                if outcome.generation is None or outcome.error is not None:
                    answers.put_nowait(self._stream_answer(outcome))
                    return
                try:
                    async for response in self._generated(outcome.generation):
                        answers.put_nowait(as_stream_response(response))
                except SmlaasError as err:
                    outcome.error = err
                    answers.put_nowait(self._stream_answer(outcome))
            finally:
                window.release()

        async def read() -> None:
            try:
                async for data in requests:
                    await window.acquire()  # stop reading while the window is full
                    task = asyncio.create_task(answer(data))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            except grpc.RpcError as err:  # gRPC ended the call (it answers the client)
                logger.debug("a gRPC stream ended while being read: %s", err)
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    def _stream_answer(self, outcome: _Outcome) -> bytes:
        if outcome.error is None:
            return outcome.response
        named = f"[request id: {outcome.request_id}] " if outcome.request_id else ""
        return stream_error(f"{named[:200]}{status_of(outcome.error).grpc}: "
                            f"{_details(outcome.error)}",
                            request_id=outcome.request_id,
                            model_name=outcome.model_name or self.plane.name,
                            model_version=outcome.model_version or MODEL_VERSION,
                            final=outcome.final)

    async def _generated(self, request: GrpcGeneration) -> AsyncIterator[bytes]:
        """The responses of a generation request (SmlaasError: it failed; anything else
        unexpected is logged and becomes an INTERNAL one, so the request is still
        answered)."""
        service = await self.plane.generation()
        try:
            async for response in responses(request, service, model=self.plane.name,
                                            version=MODEL_VERSION):
                yield response
        except SmlaasError:
            raise
        except Exception as err:
            logger.error("a gRPC generation failed", exc_info=err)
            raise PipelineFailed("the generation failed inside the gateway",
                                 status=Status.INTERNAL) from err

    async def _infer(self, data: bytes, *, stream: bool, client: str = "") -> _Outcome:
        """One ModelInferRequest through the data plane, counted in the metrics; a request
        to a decoder comes back parsed (``generation``), to be answered by the caller."""
        plane, started, outcome = self.plane, time.perf_counter(), _Outcome()
        try:
            self.slots.claim()
        except TooManyCalls as err:
            return self._failed(outcome, err, started)
        self._received_bytes += len(data)
        try:
            decode_s, encode_s = await self._run(data, outcome, received=started,
                                                 stream=stream, client=client)
        except SmlaasError as err:
            return self._failed(outcome, err, started)
        finally:
            self.slots.release()
            self._trim_when_idle()
        if outcome.generation is not None:  # its tokens are counted as generation's
            return outcome
        plane.record(code="200", ok=True, started=started, decode_s=decode_s,
                     encode_s=encode_s, protocol=FrontEnd.GRPC)
        return outcome

    async def _run(self, data: bytes, outcome: _Outcome, *, received: float, stream: bool,
                   client: str) -> tuple[float, float]:
        """Fills ``outcome.response``; returns the seconds spent decoding and encoding.
        ``received`` (``time.perf_counter()``) is when the message arrived."""
        plane = self.plane
        if len(data) > self.limits.max_receive_bytes:
            raise TooLarge(f"the message has {len(data)} bytes, more than this model's "
                           f"requests can ({self.limits.max_receive_bytes})")
        message = await self._off_loop(len(data), parse_request, data)
        outcome.request_id = message.id
        outcome.model_name, outcome.model_version = message.model_name, message.model_version
        outcome.final = stream and request_parameters(message).get(FINAL_REQUESTED) is True
        plane.check_model(message.model_name, message.model_version)
        if await plane.decoder.generates():
            outcome.generation = await generation_request(
                message, await plane.generation(), client=client, off_loop=plane.off_loop)
            return 0.0, 0.0
        decoder = await self._request_decoder()
        decoded_at = time.perf_counter()
        request = await plane.off_loop(functools.partial(decoder.decode, message))
        decode_s = time.perf_counter() - decoded_at
        del message  # its contents are tensors now
        request_digest = plane.request_digest(data) if request.receipt else None
        answer = await plane.infer(request, received=received, protocol=FrontEnd.GRPC)
        outputs = answer.tensors
        encoded_at = time.perf_counter()
        response = await self._off_loop(
            sum(value.nbytes for value in outputs.values()), lambda: encode_infer_response(
                plane.name, MODEL_VERSION, request, outputs, labels=plane.labels,
                max_bytes=self.limits.max_send_bytes, final=outcome.final))
        if answer.receipt is not None and request_digest is not None:
            response += receipt_entry(await plane.sign_receipt(
                request, answer, request_digest=request_digest, response_bytes=response))
        outcome.response = as_stream_response(response) if stream else response
        return decode_s, time.perf_counter() - encoded_at

    async def _request_decoder(self) -> GrpcRequestDecoder:
        if self._decoder is None:
            specs = await self.plane.specs()
            self._decoder = GrpcRequestDecoder(
                specs.inputs, specs.outputs, max_batch_size=self.plane.settings.max_batch_size,
                limits=await self.plane.limits())
        return self._decoder

    async def _off_loop(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)``: on the loop when ``size`` is small, else in the decoding threads."""
        if size <= INLINE_BYTES:
            return work(*args)
        return await self.plane.off_loop(lambda: work(*args))

    def _trim_when_idle(self) -> None:
        """Once no inference runs, after at least TRIM_AFTER_BYTES of messages, gives the
        heap's free pages back to the system (:func:`give_back_free_memory`)."""
        if self.slots.busy or self._received_bytes < TRIM_AFTER_BYTES:
            return
        self._received_bytes = 0
        task = asyncio.ensure_future(self.plane.off_loop(give_back_free_memory))
        self._trimming.add(task)
        task.add_done_callback(self._trimming.discard)

    def _failed(self, outcome: _Outcome, err: SmlaasError, started: float) -> _Outcome:
        plane = self.plane
        status = status_of(err)
        if status in (Status.BAD_INPUT, Status.TOO_LARGE, Status.TOO_MANY_CALLS):
            plane.metrics.errors.labels(plane.name, status, FrontEnd.GRPC).inc()
        plane.record(code=str(status.http), ok=False, started=started,
                     unknown_model=isinstance(err, ModelNotFound), protocol=FrontEnd.GRPC)
        outcome.error = err
        return outcome


def give_back_free_memory() -> None:
    """Returns the free pages of the C heap to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Large messages are freed into glibc's arenas, not unmapped, once its dynamic
    mmap threshold has risen to their size (mallopt(3), M_MMAP_THRESHOLD): without this a
    burst of them stays in the gateway's memory for good."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    name = ctypes.util.find_library("c") if sys.platform == "linux" else None
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def create_grpc_server(plane: DataPlane, *, host: str, port: int, certificate_chain_pem: bytes,
                       key_pem: bytes) -> GrpcServer:
    """A TLS gRPC server for ``plane`` on ``host:port`` (start it with ``await start()``),
    whose limits follow from the model (:mod:`~smlaas.serving.grpc_server`)."""
    endpoints = GrpcEndpoints(plane)
    credentials = grpc.ssl_server_credentials([(key_pem, certificate_chain_pem)])
    return GrpcServer((endpoints.handler(), endpoints.receipts_handler()),
                      address=f"{host}:{port}", credentials=credentials,
                      model_limits=endpoints.model_limits, on_limits=endpoints.use)


def _client_of(context: Any) -> str:
    """The peer's address as REST names a client (its share of a decoder's sequences is
    counted by it): :func:`peer_address`."""
    return peer_address(str(context.peer() or ""))


MAX_DETAILS_CHARACTERS = 1000
"""An error's text in a gRPC status at most: it travels in a trailer, which gRPC refuses
past 16 KiB (the client would see RESOURCE_EXHAUSTED instead of the error), and a message
should not repeat a client's input at length."""


def _details(err: SmlaasError) -> str:
    text = str(err)
    if len(text) <= MAX_DETAILS_CHARACTERS:
        return text
    return f"{text[:MAX_DETAILS_CHARACTERS]}... ({len(text)} characters)"


def _grpc_code(err: SmlaasError) -> grpc.StatusCode:
    return grpc.StatusCode[status_of(err).grpc]


def _parsed(method: Callable[[Any, Any], Awaitable[Any]], message_type: Any
            ) -> Callable[[bytes, Any], Awaitable[Any]]:
    """``method`` taking its request as bytes: a message that does not parse is
    INVALID_ARGUMENT (gRPC's own deserializer would answer INTERNAL)."""
    async def call(data: bytes, context: Any) -> Any:
        try:
            request = message_type.FromString(data)
        except (DecodeError, ValueError, RecursionError) as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the message is not a {message_type.__name__}: {err}")
            raise AssertionError("unreachable: abort raises") from err
        return await method(request, context)
    return call


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


async def _now(call: Callable[..., T], *args: Any) -> T:
    return call(*args)


async def _guard(context: Any, work: Awaitable[T]) -> T:
    """``work``'s result, or the call aborted with the code of the data plane's error."""
    try:
        return await work
    except SmlaasError as err:
        await context.abort(_grpc_code(err), _details(err))
        raise AssertionError("unreachable: abort raises") from err
