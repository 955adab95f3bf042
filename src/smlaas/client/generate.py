"""Text generation for the client SDK: the request :meth:`InferenceClient.generate` sends to
the gateway's KServe generate extension, its answer, and the server-sent events of
``generate_stream`` as :class:`GenerationPiece` values (no I/O of its own: the client sends
and pins, this module shapes and parses).

Errors: ServingError (an error answer, or an ``{"error": ...}`` event mid-stream),
TransportError and RequestTimeout (the stream broke), ConfigError (bad arguments).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from smlaas.errors import ConfigError, ServingError

__all__ = ["Generation", "GenerationPiece", "astream_pieces", "generate_request",
           "parse_generation", "stream_pieces"]

MID_STREAM_STATUS = 502
"""The status a ServingError raised for an error event carries (the gateway's answer was
already 200 when the error came)."""


@dataclass(frozen=True)
class Generation:
    """A whole generation: the new text and token ids, why it ended (``stop``: the
    end-of-text token; ``length``: max_tokens or the context), and the token counts."""

    text: str
    output_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationPiece:
    """One streamed token (``output_ids`` holds it; ``text`` what it completed, often empty
    inside a multi-byte character), or the last piece: ``finish_reason`` set, and the token
    counts."""

    text: str
    output_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def generate_request(prompt: str | list[int], *, max_tokens: int, temperature: float,
                     top_k: int, top_p: float, seed: int | None) -> dict[str, Any]:
    """The JSON body of a generate request (ConfigError for an unusable prompt)."""
    if isinstance(prompt, str):
        body: dict[str, Any] = {"text_input": prompt}
    elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                          for i in prompt):
        body = {"input_ids": list(prompt)}
    else:
        raise ConfigError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
    parameters: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature,
                                  "top_k": top_k, "top_p": top_p}
    if seed is not None:
        parameters["seed"] = seed
    return body | {"parameters": parameters}


def parse_generation(answer: Any) -> Generation:
    """The :class:`Generation` in a generate answer (ServingError if malformed)."""
    try:
        usage = answer["usage"]
        return Generation(str(answer["text_output"]), [int(i) for i in answer["output_ids"]],
                          str(answer["finish_reason"]), int(usage["prompt_tokens"]),
                          int(usage["completion_tokens"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ServingError(f"the gateway's generate answer is malformed: {err!r}",
                           status=502) from err


def stream_pieces(response: httpx.Response, *,
                  checked: Callable[[httpx.Response], httpx.Response],
                  transport_error: Callable[[httpx.HTTPError], Exception]
                  ) -> Iterator[GenerationPiece]:
    """The pieces of a ``generate_stream`` response as they arrive, once ``checked`` (the
    client's status and certificate pinning check) passed it before any token is read;
    closes the response at the end (or when the iterator is closed: leaving early ends the
    generation). The check runs at once, not at the first ``next``."""
    try:
        if response.status_code != 200:
            response.read()  # the error's body, for its message
        checked(response)
    except BaseException:
        response.close()
        raise
    return _pieces(response, transport_error)


def _pieces(response: httpx.Response, transport_error: Callable[[httpx.HTTPError], Exception]
            ) -> Iterator[GenerationPiece]:
    try:
        for event in sse_events(response.iter_lines()):
            if "error" in event:
                raise ServingError(f"the generation failed: {event['error']}",
                                   status=MID_STREAM_STATUS)
            yield _piece(event)
    except httpx.HTTPError as err:
        raise transport_error(err) from err
    finally:
        response.close()


class _Events:
    """Server-sent events from lines: ``data:`` lines joined until a blank line; comments
    and other fields skipped; ``[DONE]`` ends the stream."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self.done = False

    def feed(self, line: str) -> dict[str, Any] | None:
        """The event a blank line completes (None: none yet, or ``[DONE]``)."""
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value.removeprefix(" "))
            return None
        if not self._data:
            return None
        text, self._data = "\n".join(self._data), []
        if text == "[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(text)
        except ValueError as err:
            raise ServingError(f"the gateway sent an event that is not JSON: {err}",
                               status=MID_STREAM_STATUS) from err
        if not isinstance(event, dict):
            raise ServingError("the gateway sent an event that is not a JSON object",
                               status=MID_STREAM_STATUS)
        return event


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of server-sent events (see :class:`_Events`)."""
    events = _Events()
    for line in itertools.chain(lines, [""]):  # a last blank line ends the last event
        event = events.feed(line)
        if events.done:
            return
        if event is not None:
            yield event


async def astream_pieces(response: httpx.Response, *,
                         checked: Callable[[httpx.Response], httpx.Response],
                         transport_error: Callable[[httpx.HTTPError], Exception]
                         ) -> AsyncIterator[GenerationPiece]:
    """:func:`stream_pieces` for an asyncio client (the check runs before the first piece)."""
    try:
        if response.status_code != 200:
            await response.aread()
        checked(response)
        events = _Events()
        async for line in response.aiter_lines():
            event = events.feed(line)
            if events.done:
                return
            if event is not None:
                if "error" in event:
                    raise ServingError(f"the generation failed: {event['error']}",
                                       status=MID_STREAM_STATUS)
                yield _piece(event)
        event = events.feed("")
        if event is not None and not events.done:
            yield _piece(event)
    except httpx.HTTPError as err:
        raise transport_error(err) from err
    finally:
        await response.aclose()


def _piece(event: dict[str, Any]) -> GenerationPiece:
    try:
        usage = event.get("usage") or {}
        return GenerationPiece(str(event.get("text_output", "")),
                               [int(i) for i in event.get("output_ids", [])],
                               event.get("finish_reason"), usage.get("prompt_tokens"),
                               usage.get("completion_tokens"))
    except (TypeError, ValueError, AttributeError) as err:
        raise ServingError(f"the gateway sent a malformed event: {err!r}",
                           status=MID_STREAM_STATUS) from err
