"""The gateway's text generation routes: the KServe/Triton generate extension and an
OpenAI-compatible completions endpoint, over the data plane's
:class:`~smlaas.serving.generation.GenerationService`.

Routes: ``POST /v2/models/{model}/generate`` (one JSON answer), ``.../generate_stream``
(server-sent events, one per token, then one with ``finish_reason`` and ``usage``) and
``POST /v1/completions`` (``stream: true`` for OpenAI's chunks and ``data: [DONE]``).

A body is a JSON object of at most MAX_BODY_BYTES (else 400). A stream's first token comes
before the response starts, so that a refusal (a bad parameter, a prompt past the context, no
free sequence slot: 503) is an HTTP error; a later failure is a last event ``{"error": ...}``.
Text pieces as :mod:`~smlaas.serving.generation_requests` makes them. A client that goes (a
disconnect, a failed send) closes its token iterator, which ends its sequence in every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from smlaas.errors import (
    BadRequest,
    ClientGone,
    GenerationError,
    SmlaasError,
    status_of,
)
from smlaas.generation.sampling import SamplingParams
from smlaas.serving.data_plane import MODEL_VERSION
from smlaas.serving.generation import Finished, GenerationService
from smlaas.serving.generation_requests import (
    Ask,
    Piece,
    ask_from_parameters,
    client_address,
    collect,
    flag,
    max_tokens_of,
    pieces,
    prompt_ids,
    token_stream,
    usage,
)
from smlaas.serving.http_bodies import read_body

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY_BYTES = 1024 * 1024
"""A generate request is a prompt and a few parameters; a megabyte of text is plenty."""
INLINE_JSON_BYTES = 16 * 1024
"""Bodies up to this size are parsed on the event loop (prompts: see
:data:`~smlaas.serving.generation_requests.INLINE_PROMPT_CHARACTERS`)."""
OPENAI_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
                      "stop": None, "presence_penalty": 0, "frequency_penalty": 0}
"""OpenAI fields this endpoint does not implement, and the value each may take (or be null)."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

__all__ = ["GenerationPlane", "add_generate_routes"]


class GenerationPlane(Protocol):
    """What the routes need of the data plane."""

    name: str

    def check_model(self, model: str, version: str = "") -> None: ...

    async def generation(self) -> GenerationService: ...

    async def off_loop(self, work: Callable[[], T]) -> T: ...


def add_generate_routes(app: FastAPI, plane: GenerationPlane) -> None:
    """Registers the generate, generate_stream and /v1/completions routes on ``app``."""
    GenerateEndpoints(plane).register(app)


class GenerateEndpoints:
    """The routes; errors become status codes here only."""

    def __init__(self, plane: GenerationPlane) -> None:
        self.plane = plane

    def register(self, app: FastAPI) -> None:
        app.post("/v2/models/{model}/generate")(self.generate)
        app.post("/v2/models/{model}/generate_stream")(self.generate_stream)
        app.post("/v1/completions")(self.completions)

    async def generate(self, model: str, request: Request) -> Response:
        try:
            self.plane.check_model(model)
            service, ask = await self._kserve_ask(request)
            ids, finished = await _generate_all(request, service, ask)
        except SmlaasError as err:  # a client gone included: 499, to nobody
            return _error(err)
        return JSONResponse({**self._names(), "text_output": service.decode(ids),
                             "output_ids": ids, "finish_reason": finished.reason,
                             "usage": usage(finished)})

    async def generate_stream(self, model: str, request: Request) -> Response:
        try:
            self.plane.check_model(model)
            service, ask = await self._kserve_ask(request)
            pieces, tokens = await _first_piece(request, service, ask)
        except SmlaasError as err:  # a client gone included: 499, to nobody
            return _error(err)
        names = self._names()

        async def events() -> AsyncGenerator[bytes, None]:
            try:
                async for piece in pieces:
                    event: dict[str, Any] = {
                        **names, "text_output": piece.text,
                        "output_ids": [] if piece.token is None else [piece.token]}
                    if piece.finished is not None:
                        event |= {"finish_reason": piece.finished.reason,
                                  "usage": usage(piece.finished)}
                    yield _sse(event)
            except Exception as err:  # noqa: BLE001 - the status line is sent already
                yield _sse({"error": _mid_stream(err)})

        return _EventStream(events(), pieces, tokens)

    async def completions(self, request: Request) -> Response:
        try:
            body = await _read_json(request, self.plane)
            model = body.get("model")
            if not isinstance(model, str):
                raise GenerationError(f"'model' must be a string, got {model!r}")
            self.plane.check_model(model)
            service = await self.plane.generation()
            ask = replace(await _openai_ask(body, service, self.plane),
                          client=_client_of(request))
            stream = flag(body, "stream", default=False)
            options = body.get("stream_options") or {}
            usage_chunk = isinstance(options, Mapping) and options.get("include_usage") is True
            head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                    "created": int(time.time()), "model": model}
            if stream:
                pieces, tokens = await _first_piece(request, service, ask)
            else:
                ids, finished = await _generate_all(request, service, ask)
        except SmlaasError as err:  # a client gone included: 499, to nobody
            return _openai_error(err)
        if not stream:
            return JSONResponse({**head, "choices": [
                {"index": 0, "text": service.decode(ids), "finish_reason": finished.reason,
                 "logprobs": None}], "usage": usage(finished, total=True)})

        async def events() -> AsyncGenerator[bytes, None]:
            try:
                async for piece in pieces:
                    reason = None if piece.finished is None else piece.finished.reason
                    yield _sse({**head, "choices": [{"index": 0, "text": piece.text,
                                                     "finish_reason": reason,
                                                     "logprobs": None}]})
                    if piece.finished is not None and usage_chunk:
                        yield _sse({**head, "choices": [],
                                    "usage": usage(piece.finished, total=True)})
            except Exception as err:  # noqa: BLE001 - the status line is sent already
                yield _sse({"error": {"message": _mid_stream(err), "type": "server_error",
                                      "param": None, "code": None}})
                return
            yield b"data: [DONE]\n\n"

        return _EventStream(events(), pieces, tokens)

    async def _kserve_ask(self, request: Request) -> tuple[GenerationService, Ask]:
        body = await _read_json(request, self.plane)
        service = await self.plane.generation()
        unknown = set(body) - {"text_input", "input_ids", "parameters", "id"}
        if unknown:
            raise GenerationError(f"unknown fields {sorted(unknown)}; a generate request has "
                                  f"text_input or input_ids, and parameters")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise GenerationError(f"'parameters' must be an object, got {parameters!r}")
        if ("text_input" in body) == ("input_ids" in body):
            raise GenerationError("give exactly one of text_input (text) and input_ids "
                                  "(token ids)")
        prompt = body["text_input"] if "text_input" in body else body["input_ids"]
        if ("input_ids" in body) != isinstance(prompt, list):
            raise GenerationError("text_input is a string and input_ids a list of token ids")
        ids = await prompt_ids(prompt, service, self.plane.off_loop)
        return service, ask_from_parameters(ids, parameters, client=_client_of(request))

    def _names(self) -> dict[str, str]:
        return {"model_name": self.plane.name, "model_version": MODEL_VERSION}


class _EventStream(StreamingResponse):
    """Server-sent events that end the sequence however the stream ends: finished, the client
    disconnected (whichever ASGI version: Starlette listens for it only before 2.4), a send
    that failed, or the response never started."""

    def __init__(self, events: AsyncGenerator[bytes, None], *closing: AsyncGenerator[Any, None]
                 ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._closing = (events, *closing)
        """Closed in order at the end (a generator iterating another does not close it)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, gone):
                task.cancel()
            await asyncio.gather(streaming, gone, return_exceptions=True)
            for generator in self._closing:
                await generator.aclose()
        failed = None if streaming.cancelled() else streaming.exception()
        if isinstance(failed, OSError) or gone.done() and not gone.cancelled():
            logger.debug("a client went during its stream")
        elif failed is not None:
            raise failed


async def _generate_all(request: Request, service: GenerationService, ask: Ask
                        ) -> tuple[list[int], Finished]:
    tokens = token_stream(service, ask)
    return await _unless_client_goes(request, collect(tokens), tokens)


async def _first_piece(request: Request, service: GenerationService, ask: Ask
                       ) -> tuple[AsyncGenerator[Piece, None],
                                  AsyncGenerator[int | Finished, None]]:
    """The stream's pieces, its first token already received (errors before it raise),
    and the tokens they come from (to close however the stream ends)."""
    tokens = token_stream(service, ask)
    first = await _unless_client_goes(request, anext(tokens), tokens)
    return pieces(service, first, tokens), tokens


async def _unless_client_goes(request: Request, work: Awaitable[T],
                              tokens: AsyncGenerator[Any, None]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled, ``tokens``
    closed (its sequence ends) and ClientGone raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await tokens.aclose()
    if task.cancelled():
        raise ClientGone("the client disconnected before its answer")
    return task.result()


def _client_of(request: Request) -> str:
    return client_address(request.client.host) if request.client is not None else ""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_json(request: Request, plane: GenerationPlane) -> dict[str, Any]:
    """The body as a JSON object, at most MAX_BODY_BYTES (BadRequest otherwise)."""
    if request.headers.get("content-encoding", "identity") != "identity":
        raise BadRequest("generate requests are not accepted compressed")
    body = await read_body(request, MAX_BODY_BYTES, what="a generate request")
    parse = functools.partial(json.loads, bytes(body))
    try:
        value = parse() if len(body) <= INLINE_JSON_BYTES else await plane.off_loop(parse)
    except (ValueError, RecursionError) as err:
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(value).__name__}")
    return value


async def _openai_ask(body: Mapping[str, Any], service: GenerationService,
                      plane: GenerationPlane) -> Ask:
    for name, allowed in OPENAI_UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != allowed:
            raise GenerationError(f"{name}={value!r} is not supported here (only "
                                  f"{allowed!r} or null)")
    if body.get("logit_bias"):
        raise GenerationError("logit_bias is not supported here")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is None or isinstance(prompt, list) and prompt and \
            isinstance(prompt[0], (str, list)):
        raise GenerationError("'prompt' must be one string or one list of token ids")
    parameters = {name: body.get(name) for name in ("temperature", "top_k", "top_p", "seed")}
    if parameters["temperature"] is None:
        parameters["temperature"] = 1.0  # OpenAI's default, not greedy
    sampling = SamplingParams.from_parameters(parameters)
    return Ask(await prompt_ids(prompt, service, plane.off_loop), max_tokens_of(body), sampling,
                stop_at_eos=True)


def _sse(event: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


def _mid_stream(err: Exception) -> str:
    if isinstance(err, SmlaasError):
        return str(err)
    logger.error("a generation stream failed", exc_info=err)
    return "the generation failed inside the gateway"


def _error(err: SmlaasError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=status_of(err).http)


def _openai_error(err: SmlaasError) -> JSONResponse:
    """OpenAI's error object, which its clients read."""
    status = status_of(err)
    kind = "invalid_request_error" if status.http < 500 else "server_error"
    return JSONResponse({"error": {"message": str(err), "type": kind, "param": None,
                                   "code": status.value}}, status_code=status.http)
