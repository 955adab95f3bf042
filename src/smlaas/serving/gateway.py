"""The gateway: HTTPS with the deployment CA's certificate for role ``gateway``, the Open
Inference Protocol (KServe V2) REST API with Triton's binary tensor extension, dynamic
batching, Prometheus metrics, and the gateway's attestation evidence at
``/v2/smlaas/attestation`` (plain clients never need it).

Routes: ``/v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``/v2/models/{name}/config``, ``/v2/models/{name}/infer`` (also
under ``/versions/1``; other versions are 404), ``/metrics``, ``/v2/smlaas/attestation``.

Bounded by construction: the body limit follows from the model's inputs at its largest batch
(:class:`~smlaas.serving.v2.RequestLimits`) and is refused from Content-Length before a byte
is read; requests are decoded off the event loop; the batch queue is bounded (503 when full);
a request whose client has gone is withdrawn before it runs; every error, the framework's
404/405/422 included, is ``{"error": "..."}``; a client that disconnects is a debug line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import smlaas
from smlaas.errors import SmlaasError
from smlaas.serving.batcher import DEFAULT_MAX_QUEUE, DynamicBatcher, QueueFull
from smlaas.serving.link import Link
from smlaas.serving.metrics import GatewayMetrics
from smlaas.serving.protocol import (
    DESCRIBE,
    HTTP_STATUS,
    Status,
    TensorSpec,
    deadline_in,
    error_reply,
)
from smlaas.serving.v2 import (
    HEADER_LENGTH,
    BadRequest,
    RequestLimits,
    datatype,
    encode_infer_response,
    parse_infer_request,
    public_shape,
)
from smlaas.transport.tensors import TensorMessage

READY_CACHE_S = 1.0
PROBE_TIMEOUT_S = 2.0
RETRY_DELAY_S = 0.3


@dataclass(frozen=True)
class GatewaySettings:
    model_name: str
    max_batch_size: int = 0
    """0: the model is served without a batch dimension (shapes exactly as planned)."""
    max_queue_delay_us: int = 0
    max_inflight: int = 4
    """Batches in the pipeline at once (at least the number of stages keeps each busy)."""
    request_timeout_s: float = 30.0
    max_queue: int = DEFAULT_MAX_QUEUE
    """Requests waiting for the pipeline before the gateway answers 503."""
    stage_count: int | None = None
    """The manifest's number of stages: ready only when a probe passed through all of them
    (a host that cut the chain short gets "not ready", not wrong answers)."""


@dataclass(frozen=True)
class ModelSpecs:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Unavailable(SmlaasError):
    """The pipeline cannot answer now (HTTP 503)."""


class ClientGone(SmlaasError):
    """The client closed its connection before its answer was ready (nobody to answer)."""


logger = logging.getLogger(__name__)
PARSE_THREADS = 2
MODEL_VERSION = "1"


class Pipeline:
    """The gateway's view of the stages: one multiplexed link to stage 0."""

    def __init__(self, link: Link, *, timeout_s: float, stage_count: int | None = None) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.stage_count = stage_count
        self.specs: ModelSpecs | None = None
        self._ready_at = 0.0

    async def run(self, inputs: dict[str, np.ndarray]) -> TensorMessage:
        """Outputs, or an error reply; a stage that is down gets one retry."""
        deadline = deadline_in(self.timeout_s)
        reply = await self.link.request(inputs, {"deadline": deadline})
        if reply.meta.get("status") == Status.UNAVAILABLE and \
                deadline - time.time() > RETRY_DELAY_S * 2:
            await asyncio.sleep(RETRY_DELAY_S)
            reply = await self.link.request(inputs, {"deadline": deadline})
        return reply

    async def probe(self) -> str | None:
        """None when every stage answers within PROBE_TIMEOUT_S, else why not."""
        if time.monotonic() - self._ready_at < READY_CACHE_S:
            return None
        reply = await self.link.request({}, {"op": DESCRIBE,
                                             "deadline": deadline_in(PROBE_TIMEOUT_S)})
        if "error" in reply.meta:
            return str(reply.meta["error"])
        stages = reply.meta.get("stages")
        if self.stage_count is not None and stages != list(range(self.stage_count)):
            return (f"the pipeline answered through stages {stages}, the manifest has "
                    f"{self.stage_count}")
        if self.specs is None:
            self.specs = ModelSpecs(
                [TensorSpec.from_dict(s) for s in reply.meta["inputs"]],
                [TensorSpec.from_dict(s) for s in reply.meta["outputs"]])
        self._ready_at = time.monotonic()
        return None

    async def model_specs(self) -> ModelSpecs:
        if self.specs is None:
            problem = await self.probe()
            if problem is not None or self.specs is None:
                raise Unavailable(problem or "the pipeline did not describe the model")
        return self.specs


def create_app(settings: GatewaySettings, link: Link, *,
               evidence: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """``evidence`` returns the gateway's current attestation evidence (it may block: it is
    called off the event loop)."""
    name = settings.model_name
    metrics = GatewayMetrics()
    pipeline = Pipeline(link, timeout_s=settings.request_timeout_s,
                        stage_count=settings.stage_count)
    batcher = DynamicBatcher(pipeline.run, max_batch_size=settings.max_batch_size,
                             max_queue_delay_us=settings.max_queue_delay_us,
                             max_inflight=settings.max_inflight, max_queue=settings.max_queue,
                             on_batch=lambda stats: metrics.record_batch(name, stats))
    batching = settings.max_batch_size > 0
    parser = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="gateway-parse")
    limits: dict[str, RequestLimits] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()
        await link.close()
        parser.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="smlaas gateway", version=smlaas.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pipeline, app.state.metrics, app.state.batcher = pipeline, metrics, batcher
    metrics.abandoned.labels(name).set_function(lambda: batcher.abandoned)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def framework_error(_: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return error(400, f"invalid request: {err.errors()}")

    def unknown_model(model: str, version: str = MODEL_VERSION) -> JSONResponse | None:
        """The 404 for a model or version this gateway does not serve, else None."""
        if model != name:
            return error(404, f"unknown model {model!r}; this gateway serves {name!r}")
        if version != MODEL_VERSION:
            return error(404, f"model {name!r} has no version {version!r} (versions: "
                         f"{MODEL_VERSION})")
        return None

    def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": datatype(spec.dtype),
                "shape": public_shape(spec, batching)}

    async def ready_response() -> JSONResponse:
        problem = await pipeline.probe()
        metrics.pipeline_up.labels(name).set(problem is None)
        if problem is not None:
            return JSONResponse({"ready": False, "error": problem}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return await ready_response()

    @app.get("/v2")
    async def server_metadata() -> JSONResponse:
        return JSONResponse({"name": "smlaas", "version": smlaas.__version__,
                             "extensions": ["binary_tensor_data", "smlaas_attestation"]})

    @app.post("/v2/repository/index")
    async def repository_index() -> JSONResponse:
        problem = await pipeline.probe()
        return JSONResponse([{"name": name, "version": "1",
                              "state": "READY" if problem is None else "UNAVAILABLE"}])

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = MODEL_VERSION) -> JSONResponse:
        if (refusal := unknown_model(model, version)) is not None:
            return refusal
        try:
            specs = await pipeline.model_specs()
        except Unavailable as err:
            return error(503, f"model {name!r} is not ready: {err}")
        return JSONResponse({"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
                             "inputs": [tensor_metadata(s) for s in specs.inputs],
                             "outputs": [tensor_metadata(s) for s in specs.outputs]})

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = MODEL_VERSION) -> JSONResponse:
        return unknown_model(model, version) or await ready_response()

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str = MODEL_VERSION) -> JSONResponse:
        if (refusal := unknown_model(model, version)) is not None:
            return refusal
        config: dict[str, Any] = {"name": name, "platform": "onnxruntime_onnx",
                                  "max_batch_size": settings.max_batch_size}
        if batching:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": settings.max_queue_delay_us}
        return JSONResponse(config)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str = MODEL_VERSION) -> Response:
        started = time.perf_counter()
        try:
            response = await handle_infer(model, version, request)
        except ClientGone:
            logger.debug("a client closed its connection before its answer")
            metrics.errors.labels(name, "client_gone").inc()
            return Response(status_code=499)
        code = str(response.status_code)
        metrics.requests.labels(name if response.status_code != 404 else "unknown",
                                code).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - started)
        return response

    def limits_for(specs: ModelSpecs) -> RequestLimits:
        if "model" not in limits:
            limits["model"] = RequestLimits.for_model(specs.inputs,
                                                      max_batch_size=settings.max_batch_size)
        return limits["model"]

    async def handle_infer(model: str, version: str, request: Request) -> Response:
        if (refusal := unknown_model(model, version)) is not None:
            return refusal
        loop = asyncio.get_running_loop()
        try:
            specs = await pipeline.model_specs()
            bounds = limits_for(specs)
            body = await read_body(request, bounds.max_body_bytes)
            parsed = await loop.run_in_executor(parser, lambda: parse_infer_request(
                body, request.headers.get(HEADER_LENGTH), specs.inputs, specs.outputs,
                max_batch_size=settings.max_batch_size, limits=bounds))
        except BadRequest as err:
            metrics.errors.labels(name, Status.BAD_INPUT).inc()
            return error(400, str(err))
        except Unavailable as err:
            metrics.errors.labels(name, Status.UNAVAILABLE).inc()
            return error(503, f"model {name!r} is not ready: {err}")
        metrics.queue_depth.labels(name).set(batcher.queue_depth)
        try:
            reply = await _unless_client_goes(request, asyncio.wait_for(
                batcher.submit(parsed.inputs, parsed.batch), settings.request_timeout_s))
        except QueueFull as err:
            metrics.errors.labels(name, "queue_full").inc()
            return error(503, f"model {name!r} is busy: {err}")
        except TimeoutError:
            reply = error_reply("", Status.DEADLINE, f"no result within "
                                                     f"{settings.request_timeout_s:.0f} s")
        if "error" in reply.meta:
            status = str(reply.meta.get("status", Status.INTERNAL))
            metrics.errors.labels(name, status).inc()
            return error(HTTP_STATUS.get(status, 500), str(reply.meta["error"]))
        metrics.record_stages(name, list(reply.meta.get("stage_ms", [])))
        missing = [o for o in parsed.outputs or [] if o not in reply.tensors]
        if missing:
            return error(500, f"the pipeline returned no {missing}")
        content, headers = encode_infer_response(name, parsed, reply.tensors)
        return Response(content, headers=headers)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.labels(name).set(batcher.queue_depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v2/smlaas/attestation")
    async def attestation() -> JSONResponse:
        if evidence is None:
            return error(404, "this gateway has no attestation evidence")
        return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, evidence))

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused from Content-Length (or as soon as it passes ``limit``) when larger
    than the model can take; ClientGone if the client disconnects meanwhile."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes exceeds the {limit} bytes this "
                         f"model's inputs can take")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise BadRequest(f"request body exceeds the {limit} bytes this model's "
                                 f"inputs can take")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("the client disconnected while sending its body") from None
    return b"".join(chunks)


async def _unless_client_goes(request: Request, work: Any) -> Any:
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
