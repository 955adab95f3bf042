"""The gateway's REST front end: the Open Inference Protocol (KServe V2) over HTTPS with the
deployment CA's certificate for role ``gateway``, Triton's binary tensor, model repository,
model configuration and statistics extensions, Prometheus metrics, and the gateway's
attestation evidence at ``/v2/smlaas/attestation``. Everything it serves comes from the
:class:`~smlaas.serving.data_plane.DataPlane` it shares with the gRPC front end.

Routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/repository/index``,
``/v2/models/{name}``, ``.../ready``, ``.../config``, ``.../stats``, ``.../infer`` (each also
under ``/versions/1``; other versions are 404), ``/v2/models/stats``, ``/metrics``,
``/v2/smlaas/attestation``.

Bounded by construction: the body limit follows from the model's inputs at its largest batch
(:class:`~smlaas.transport.v2.RequestLimits`) and is refused from Content-Length before a byte
is read; requests are decoded and responses encoded off the event loop; outputs asked for as
JSON are bounded (400 saying to ask for binary outputs, before anything runs); the batch queue
is bounded (503 when full); a request whose client has gone leaves the queue before it is
batched or sent (the connection's ``gone`` from :mod:`~smlaas.serving.http_limits`, and
ASGI's ``http.disconnect``); a request's ``timeout`` parameter sets its deadline; every error,
the framework's 404/405/422 included, is ``{"error": "..."}``; a client that disconnects is a
debug line. ``/metrics`` has Triton's ``nv_inference_*`` counters after smlaas's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

import smlaas
from smlaas.errors import (
    BadRequest,
    ClientGone,
    ModelNotFound,
    SmlaasError,
    Unavailable,
    status_of,
)
from smlaas.serving.data_plane import (
    MODEL_VERSION,
    DataPlane,
    FrontEnd,
    GatewaySettings,
    ModelSpecs,
)
from smlaas.serving.generate_api import add_generate_routes
from smlaas.serving.hop import Hop
from smlaas.serving.http_bodies import BodyBudget, read_body
from smlaas.serving.http_limits import CONNECTION_EXTENSION
from smlaas.serving.metrics import triton_metrics_text
from smlaas.transport.compression import decode_content, encode_content
from smlaas.transport.v2 import (
    HEADER_LENGTH,
    InferRequest,
    encode_infer_response,
    parse_infer_request,
)
from smlaas.transport.v2_limits import RequestLimits
from smlaas.transport.v2_receipts import with_receipt

logger = logging.getLogger(__name__)
T = TypeVar("T")
COMPRESS_ABOVE_BYTES = 1024
INLINE_TENSOR_BYTES = 16 * 1024
"""A request whose JSON part, or a response whose tensors, take at most this many bytes is
decoded or encoded on the event loop (well under a millisecond of work, less than the hop to
a worker thread and back); anything larger, or compressed, goes to the gateway's threads.
Binary tensors are views of the body and cost nothing to decode whatever their size."""
"""Smaller responses go uncompressed whatever the client accepts (not worth the CPU)."""

__all__ = ["GatewaySettings", "create_app"]


def create_app(settings: GatewaySettings, link: Hop, *,
               evidence: Callable[[], dict[str, Any]] | None = None,
               plane: DataPlane | None = None) -> FastAPI:
    """The REST app over ``plane`` (default: a new data plane on ``link``). ``evidence``
    returns the gateway's current attestation evidence (called off the event loop)."""
    plane = plane or DataPlane(settings, link, evidence=evidence)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        serve_with_worker_threads()
        await plane.start()
        yield
        await plane.stop()

    app = FastAPI(title="smlaas gateway", version=smlaas.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.plane = plane
    RestEndpoints(plane).register(app)
    add_generate_routes(app, plane)
    return app


SWITCH_INTERVAL_S = 0.001
"""How long a thread may hold the GIL while another waits (Python's default is 5 ms)."""


def serve_with_worker_threads() -> None:
    """Tunes this process for an event loop beside CPU-bound worker threads (decoding,
    encoding). The loop thread takes the GIL back once per iteration, and at Python's default
    5 ms switch interval it lagged up to 45 ms while 3 MB JSON responses were encoded (8 ms at
    1 ms, with one encoding thread). The objects alive at startup (modules, the app) are
    frozen out of the garbage collector, so that a full collection (10-15 ms here) does not
    walk them while serving."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.freeze()


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class RestEndpoints:
    """The V2 REST routes over a data plane; its exceptions become status codes here only."""

    def __init__(self, plane: DataPlane, *, bodies: BodyBudget | None = None) -> None:
        self.plane = plane
        self.bodies = bodies or BodyBudget()
        """Bounds the request bodies read at once (see :mod:`~smlaas.serving.http_bodies`)."""

    def register(self, app: FastAPI) -> None:
        @app.exception_handler(HTTPException)
        async def framework_error(_: Request, err: HTTPException) -> JSONResponse:
            return error(err.status_code, str(err.detail))

        @app.exception_handler(RequestValidationError)
        async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
            return error(400, f"invalid request: {err.errors()}")

        @app.exception_handler(SmlaasError)
        async def plane_error(_: Request, err: SmlaasError) -> JSONResponse:
            return error(status_of(err).http, str(err))

        app.get("/v2/health/live")(self.live)
        app.get("/v2/health/ready")(self.ready)
        app.get("/v2")(self.server_metadata)
        app.post("/v2/repository/index")(self.repository_index)
        app.get("/v2/models/stats")(self.all_statistics)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            app.get(prefix)(self.model_metadata)
            app.get(f"{prefix}/ready")(self.model_ready)
            app.get(f"{prefix}/config")(self.model_config)
            app.get(f"{prefix}/stats")(self.model_statistics)
            app.post(f"{prefix}/infer")(self.infer)
        app.get("/metrics")(self.prometheus)
        app.get("/v2/smlaas/attestation")(self.attestation)
        app.get("/v2/smlaas/evidence")(self.receipt_evidence)


    async def live(self) -> JSONResponse:
        return JSONResponse({"live": True})

    async def ready(self) -> JSONResponse:
        problem = await self.plane.ready()
        if problem is not None:
            return JSONResponse({"ready": False, "error": problem}, status_code=503)
        return JSONResponse({"ready": True})

    async def server_metadata(self) -> JSONResponse:
        return JSONResponse(self.plane.server_metadata())

    async def repository_index(self) -> JSONResponse:
        problem = await self.plane.ready()
        return JSONResponse([{"name": self.plane.name, "version": MODEL_VERSION,
                              "state": "READY" if problem is None else "UNAVAILABLE"}])

    async def model_metadata(self, model: str, version: str = "") -> JSONResponse:
        return JSONResponse(await self.plane.model_metadata(model, version))

    async def model_ready(self, model: str, version: str = "") -> JSONResponse:
        self.plane.check_model(model, version)
        return await self.ready()

    async def model_config(self, model: str, version: str = "") -> JSONResponse:
        return JSONResponse(await self.plane.model_config(model, version))

    async def model_statistics(self, model: str, version: str = "") -> JSONResponse:
        return JSONResponse(self.plane.model_statistics(model, version))

    async def all_statistics(self) -> JSONResponse:
        return JSONResponse(self.plane.model_statistics())

    async def infer(self, model: str, request: Request, version: str = "") -> Response:
        plane, started = self.plane, time.perf_counter()
        try:
            plane.check_model(model, version)
        except ModelNotFound as err:
            plane.record(code="404", ok=False, started=started, unknown_model=True,
                         protocol=FrontEnd.REST)
            return error(404, str(err))
        parsed: InferRequest | None = None
        outputs: dict[str, np.ndarray] = {}
        try:
            limits = await plane.limits()
            specs = await plane.specs()
            plane.check_room(protocol=FrontEnd.REST)  # before a body that could not queue
            parsed, decode_s, body = await self._read_request(request, limits, specs)
            request_digest = plane.request_digest(body) if parsed.receipt else None
            answer = await plane.infer(
                parsed, unless=lambda wait: _unless_client_goes(request, wait),
                gone=_connection_gone(request), received=started, protocol=FrontEnd.REST)
            outputs = answer.tensors
            encoded_at = time.perf_counter()
            encode = functools.partial(
                encode_infer_response, plane.name, parsed, outputs, labels=plane.labels,
                max_json_bytes=plane.settings.max_json_response_bytes)
            small = sum(v.nbytes for v in outputs.values()) <= INLINE_TENSOR_BYTES
            content, headers = encode() if small else await plane.encode(encode)
            plain = content
            if answer.receipt is not None and request_digest is not None:
                content, headers = with_receipt(content, headers, await plane.sign_receipt(
                    parsed, answer, request_digest=request_digest, response_bytes=content))
            accepted = request.headers.get("accept-encoding")
            if accepted and len(content) > COMPRESS_ABOVE_BYTES:
                compress = functools.partial(encode_content, content, accepted,
                                             judged_by=plain)
                # a small body is judged (and compressed) on the loop: less than a hand-over
                content, coding = compress() if len(content) <= INLINE_TENSOR_BYTES else \
                    await plane.off_loop(compress)
                if coding:
                    headers["Content-Encoding"] = coding
        except ClientGone:
            logger.debug("a client closed its connection before its answer")
            plane.metrics.errors.labels(plane.name, "client_gone", FrontEnd.REST).inc()
            return Response(status_code=499)
        except SmlaasError as err:
            if isinstance(err, BadRequest):
                plane.metrics.errors.labels(plane.name, "bad_input", FrontEnd.REST).inc()
            status = status_of(err).http
            plane.record(code=str(status), ok=False, started=started, protocol=FrontEnd.REST)
            return error(status, str(err))
        else:
            plane.record(code="200", ok=True, started=started, decode_s=decode_s,
                         encode_s=time.perf_counter() - encoded_at, protocol=FrontEnd.REST)
            return Response(content, headers=headers)
        finally:
            # A refused request's frames sit in a traceback cycle until the garbage collector
            # runs; its tensors need not: 200 refused ResNet requests held 75 MiB so.
            if parsed is not None:
                parsed.inputs.clear()
            outputs.clear()

    async def _read_request(self, request: Request, limits: RequestLimits, specs: ModelSpecs
                            ) -> tuple[InferRequest, float, bytearray]:
        """The decoded request, the seconds its decoding took and the body as received
        (binary tensors are views of it; a receipt covers it), read within the body
        budget."""
        plane, encoding = self.plane, request.headers.get("content-encoding")
        declared = request.headers.get("content-length", "")
        # What the body takes once read and decoded: its declared size, or when that is not
        # known (no Content-Length, or compressed) what the model can take, at most one
        # source's share (so compressed bodies are decoded one at a time per source).
        size = int(declared) if declared.isdigit() and not encoding else min(
            limits.max_body_bytes, self.bodies.per_source_bytes)
        source = request.client.host if request.client else "unknown"
        try:
            async with self.bodies.reserve(source, size,
                                           timeout_s=plane.settings.request_timeout_s):
                body = await read_body(request, limits.max_body_bytes,
                                       what="this model's inputs")
                decoded_at = time.perf_counter()
                header_length = request.headers.get(HEADER_LENGTH)

                def decode() -> InferRequest:
                    return parse_infer_request(
                        decode_content(bytes(body), encoding, limit=limits.max_body_bytes)
                        if encoding else body, header_length, specs.inputs, specs.outputs,
                        max_batch_size=plane.settings.max_batch_size, limits=limits)

                json_bytes = int(header_length) if header_length and header_length.isdigit() \
                    else len(body)
                small = not encoding and json_bytes <= INLINE_TENSOR_BYTES
                parsed = decode() if small else await plane.decode(decode)
                return parsed, time.perf_counter() - decoded_at, body
        except TimeoutError:
            raise Unavailable(f"the gateway is reading as many request bodies as it holds at "
                              f"once ({self.bodies.total_bytes} bytes); retry later") from None

    async def prometheus(self) -> Response:
        """smlaas's metrics, then Triton's counters with Triton's names and labels."""
        plane = self.plane
        plane.metrics.queue_depth.labels(plane.name).set(plane.batcher.queue_depth)
        return Response(generate_latest(plane.metrics.registry)
                        + triton_metrics_text(plane.statistics),
                        media_type=CONTENT_TYPE_LATEST)

    async def receipt_evidence(self) -> Response:
        """The evidence receipts refer to (CBOR, :mod:`smlaas.receipts.evidence`)."""
        return Response(await self.plane.evidence_bundle(), media_type="application/cbor",
                        headers={"Cache-Control": "max-age=10"})

    async def attestation(self) -> JSONResponse:
        evidence = self.plane.evidence()
        if evidence is None:
            return error(404, "this gateway has no attestation evidence")
        return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, evidence))


def _connection_gone(request: Request) -> Callable[[], bool] | None:
    """The server's synchronous "has this connection been lost" (None under a server that
    does not offer it, e.g. an in-process ASGI transport)."""
    extension = (request.scope.get("extensions") or {}).get(CONNECTION_EXTENSION) or {}
    gone = extension.get("gone")
    return gone if callable(gone) else None


async def _unless_client_goes(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled (a queued
    request is withdrawn before it runs) and ClientGone is raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task not in done:
        task.cancel()
        raise ClientGone("the client disconnected before its answer")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
