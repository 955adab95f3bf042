"""A generation request and its answer, whichever protocol carries them (the REST generate
routes of :mod:`~smlaas.serving.generate_api`, gRPC's of
:mod:`~smlaas.serving.grpc_generate`): the parameters checked once, the tokens as text pieces.

A text piece is what the tokens so far add to the text: all tokens are decoded and the new
suffix sent, held back while it ends in an incomplete UTF-8 sequence (U+FFFD), so that a
character split across tokens arrives whole.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from smlaas.errors import GenerationError, PipelineFailed, Status
from smlaas.generation.sampling import SamplingParams
from smlaas.serving.generation import Finished, GenerationService
from smlaas.transport.tensors import BYTES, TensorSpec

T = TypeVar("T")

DEFAULT_MAX_TOKENS = 16
GENERATE_PARAMETERS = frozenset({"max_tokens", "temperature", "top_k", "top_p", "seed", "stop"})
"""The generate extension's parameters: ``stop`` (default true) ends at end-of-text."""
GENERATION_INPUTS = (TensorSpec("text_input", BYTES, [1]), TensorSpec("input_ids", "int64", [None]),
                     TensorSpec("stream", "bool", [1]),
                     TensorSpec("sampling_parameters", BYTES, [1]),
                     TensorSpec("exclude_input_in_output", "bool", [1]))
"""A decoder's inputs as V2 tensors (gRPC's inference calls): the prompt as text or token
ids (one of the two), and what Triton's LLM backends take beside it. All are optional."""
GENERATION_OUTPUTS = (TensorSpec("text_output", BYTES, [1]), TensorSpec("output_ids", "int64",
                                                                        [None]))
INLINE_PROMPT_CHARACTERS = 16 * 1024
"""Prompts up to this size are tokenized on the event loop, longer ones in a thread."""

__all__ = ["Ask", "Piece", "ask_from_parameters", "client_address", "collect", "pieces",
           "prompt_ids", "token_stream", "usage"]


@dataclass(frozen=True)
class Ask:
    """A generation request, whichever API it came from."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_at_eos: bool
    client: str = ""
    """The client's address: it may hold only its share of the sequence slots."""


@dataclass(frozen=True)
class Piece:
    """A token and the text it completed, or (``finished`` set) the end and the last text."""

    text: str
    token: int | None = None
    finished: Finished | None = None


def ask_from_parameters(prompt: list[int], parameters: Mapping[str, Any], *,
                        client: str) -> Ask:
    """The request the generate extension's ``parameters`` describe (GenerationError names
    an unknown parameter or a bad value)."""
    unknown = set(parameters) - GENERATE_PARAMETERS
    if unknown:
        raise GenerationError(f"unknown parameters {sorted(unknown)}; supported: "
                              f"{sorted(GENERATE_PARAMETERS)}")
    return Ask(prompt, max_tokens_of(parameters), SamplingParams.from_parameters(parameters),
               flag(parameters, "stop", default=True), client)


def client_address(host: str) -> str:
    """A client's address as its share of the sequences is counted: normalised, an IPv4
    address mapped into IPv6 (a dual-stack listener's view) as IPv4, a zone dropped; a host
    that is no address is kept as it is."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def token_stream(service: GenerationService, ask: Ask) -> AsyncGenerator[int | Finished, None]:
    """The request's tokens, then how it finished. Close it to end the sequence early."""
    return service.generator.generate(  # type: ignore[return-value]
        ask.prompt, max_tokens=ask.max_tokens, sampling=ask.sampling,
        stop_at_eos=ask.stop_at_eos, client=ask.client)


async def collect(tokens: AsyncIterator[int | Finished]) -> tuple[list[int], Finished]:
    """Every token, and how the sequence finished."""
    ids: list[int] = []
    finished = None
    async for item in tokens:  # to its end: the generator then knows its sequence ended
        if isinstance(item, Finished):
            finished = item
        else:
            ids.append(item)
    if finished is None:
        raise PipelineFailed("the generation ended without saying why", status=Status.INTERNAL)
    return ids, finished


async def pieces(service: GenerationService, first: int | Finished,
                 tokens: AsyncGenerator[int | Finished, None]) -> AsyncGenerator[Piece, None]:
    """A piece per token (``first`` already received from ``tokens``), then the end."""
    ids: list[int] = []
    sent = ""

    def advance(text: str) -> str:
        nonlocal sent
        piece = text[len(os.path.commonprefix([text, sent])):]
        sent = text
        return piece

    item = first
    while True:
        if isinstance(item, Finished):
            async for _ in tokens:  # ends at once: the generator then knows it finished
                pass
            yield Piece(advance(service.decode(ids)), finished=item)
            return
        ids.append(item)
        text = service.decode(ids)
        yield Piece("" if text.endswith("\ufffd") else advance(text), token=item)
        item = await anext(tokens)


async def prompt_ids(prompt: Any, service: GenerationService,
                     off_loop: Callable[[Callable[[], list[int]]], Awaitable[list[int]]]
                     ) -> list[int]:
    """A prompt given as text (tokenized, a long one by ``off_loop``) or as token ids."""
    if isinstance(prompt, str):
        def encode() -> list[int]:
            return service.encode(prompt)
        return encode() if len(prompt) <= INLINE_PROMPT_CHARACTERS else await off_loop(encode)
    vocabulary = service.vocabulary_size or 2**63
    if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                        and 0 <= i < vocabulary for i in prompt):
        return list(prompt)
    raise GenerationError("the prompt must be text or a list of token ids (integers >= 0"
                          + (f" and below the vocabulary's {vocabulary})"
                             if service.vocabulary_size else ")"))


def max_tokens_of(fields: Mapping[str, Any]) -> int:
    value = fields.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GenerationError(f"max_tokens must be an integer >= 1, got {value!r}")
    return value


def flag(fields: Mapping[str, Any], name: str, *, default: bool) -> bool:
    value = fields.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GenerationError(f"{name} must be true or false, got {value!r}")
    return value


def usage(finished: Finished, *, total: bool = False) -> dict[str, int]:
    counts = {"prompt_tokens": finished.prompt_tokens,
              "completion_tokens": finished.completion_tokens}
    if total:
        counts["total_tokens"] = finished.prompt_tokens + finished.completion_tokens
    return counts
