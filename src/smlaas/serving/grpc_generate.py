"""Generation over gRPC: a decoder deployment answers ``ModelInfer`` and ``ModelStreamInfer`` as
Triton's decoupled LLM models do (the inputs of its vLLM backend), so that
``tritonclient.grpc``'s ``start_stream``/``async_stream_infer`` stream tokens.

A request's inputs (:data:`~smlaas.serving.generation_requests.GENERATION_INPUTS`): the prompt as
``text_input`` (BYTES, one element) or ``input_ids`` (INT64 or INT32 token ids); optionally
``stream`` (BOOL: one response per token, only on ``ModelStreamInfer``),
``sampling_parameters`` (BYTES: a JSON object) and ``exclude_input_in_output`` (BOOL, default
true: false puts the prompt's text before the generated text). The generate extension's
parameters (``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``) come from
``sampling_parameters`` and from the request's ``parameters`` (which win); a number may be
written as a string, as vLLM's clients send them.

Each response has ``text_output`` (BYTES, one element: the text the new tokens add) and
``output_ids`` (INT64: the new tokens); the last one also has the parameters
``finish_reason``, ``prompt_tokens`` and ``completion_tokens``, and ``triton_final_response``
when the client asked for final flags (tritonclient's ``enable_empty_final_response``). On a
stream, a failure is a stream error with the request's id; on ``ModelInfer``, the call's status.

Bounded before any value is converted: at most two dimensions, every count checked against
the shape and the prompt's token ids against the context, a text prompt of at most
MAX_PROMPT_BYTES and ``sampling_parameters`` of at most MAX_SAMPLING_BYTES; values quoted in
errors are cut short.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from smlaas.errors import BadRequest, GenerationError
from smlaas.serving.generation import Finished, GenerationService
from smlaas.serving.generation_requests import (
    GENERATE_PARAMETERS,
    GENERATION_INPUTS,
    Ask,
    Piece,
    ask_from_parameters,
    client_address,
    collect,
    pieces,
    prompt_ids,
    token_stream,
    usage,
)
from smlaas.serving.grpc_codec import FINAL_REQUESTED, FINAL_RESPONSE, request_parameters
from smlaas.transport.tensors import serialize_bytes
from smlaas.transport.v2 import datatype

__all__ = ["GrpcGeneration", "generation_request", "peer_address", "responses"]

_DATATYPES = {spec.name: (datatype(spec.dtype),) + (("INT32",) if spec.dtype == "int64" else ())
              for spec in GENERATION_INPUTS}
"""Each input's datatypes: as the metadata says, and token ids as INT32 too."""
_RAW_DTYPES = {"INT64": "<i8", "INT32": "<i4", "BOOL": "?"}
_TYPED_FIELDS = {"BYTES": "bytes_contents", "INT64": "int64_contents", "INT32": "int_contents",
                 "BOOL": "bool_contents"}
MAX_PROMPT_BYTES = 1024 * 1024
"""A text prompt's bytes at most (REST's whole generate body may take as much)."""
MAX_SAMPLING_BYTES = 16 * 1024
"""``sampling_parameters``' JSON at most: six numbers need far less."""
MAX_TOKEN_TEXT_BYTES = 128
"""What one token's text may take in a response, for gRPC's send limit."""
MAX_DIMS = 2
"""``input_ids`` as [n] or [1, n]; every other input one element."""
_INTEGER_PARAMETERS = frozenset({"max_tokens", "top_k", "seed"})
_REAL_PARAMETERS = frozenset({"temperature", "top_p"})


@dataclass(frozen=True)
class GrpcGeneration:
    """A generation request that came as a ``ModelInferRequest``."""

    ask: Ask
    stream: bool
    prompt_text: str
    """Put before the generated text (``exclude_input_in_output`` false), else empty."""
    request_id: str
    final_flags: bool
    """The client asked every response to say whether it is the last one."""


async def generation_request(
        message: Any, service: GenerationService, *, client: str,
        off_loop: Callable[[Callable[[], list[int]]], Awaitable[list[int]]]) -> GrpcGeneration:
    """The generation ``message`` asks for; GenerationError (INVALID_ARGUMENT) says what is
    wrong with it. ``off_loop`` runs a long prompt's tokenization in a thread."""
    inputs = _inputs(message, max_ids=service.generator.limits.max_context)
    unknown = set(inputs) - set(_DATATYPES)
    if unknown:
        raise GenerationError(f"{len(unknown)} unknown input(s) ({sorted(unknown)[:3]}...): "
                              f"this model generates; its inputs are {sorted(_DATATYPES)}")
    if ("text_input" in inputs) == ("input_ids" in inputs):
        raise GenerationError("give exactly one of text_input (BYTES) and input_ids (INT64)")
    if "text_input" in inputs:
        text = _text(inputs["text_input"], "text_input", max_bytes=MAX_PROMPT_BYTES)
        prompt: Any = text
    else:
        prompt = [int(i) for i in inputs["input_ids"].reshape(-1)]
        text = ""
    ids = await prompt_ids(prompt, service, off_loop)
    parameters = request_parameters(message)
    final_flags = parameters.pop(FINAL_REQUESTED, None) is True
    sampling: dict[str, Any] = {}
    if "sampling_parameters" in inputs:
        sampling = _json_object(_text(inputs["sampling_parameters"], "sampling_parameters",
                                      max_bytes=MAX_SAMPLING_BYTES))
    given = {**sampling, **parameters}
    if len(given) > len(GENERATE_PARAMETERS) or any(len(name) > 64 for name in given):
        raise GenerationError(f"{len(given)} parameters given; the supported ones are "
                              f"{sorted(GENERATE_PARAMETERS)}")
    merged = {name: _number(name, value) for name, value in given.items()}
    exclude = _bool(inputs.get("exclude_input_in_output"), default=True)
    if not exclude and not text:
        text = service.decode(ids)
    return GrpcGeneration(
        ask_from_parameters(ids, merged, client=client),
        _bool(inputs.get("stream"), default=False), "" if exclude else text,
        message.id, final_flags)


async def responses(request: GrpcGeneration, service: GenerationService, *, model: str,
                    version: str) -> AsyncIterator[bytes]:
    """The serialized ``ModelInferResponse``s: one per token when the request streams, else
    one with the whole text. Closing this iterator early ends the sequence in every stage."""
    tokens = token_stream(service, request.ask)
    try:
        if not request.stream:
            ids, finished = await collect(tokens)
            yield _response(request, model, version,
                            Piece(request.prompt_text + service.decode(ids)), ids, finished)
            return
        first = await anext(tokens)
        prefix = request.prompt_text
        async for piece in pieces(service, first, tokens):
            ids = [] if piece.token is None else [piece.token]
            yield _response(request, model, version, Piece(prefix + piece.text), ids,
                            piece.finished)
            prefix = ""
    finally:
        await tokens.aclose()


def _response(request: GrpcGeneration, model: str, version: str, piece: Piece,
              ids: list[int], finished: Finished | None) -> bytes:
    response = service_pb2.ModelInferResponse(model_name=model, model_version=version,
                                              id=request.request_id)
    text = np.array([piece.text.encode()], dtype=object)
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    response.outputs.add(name="output_ids", datatype="INT64", shape=[len(ids)])
    response.raw_output_contents.extend([serialize_bytes(text),
                                         np.array(ids, dtype="<i8").tobytes()])
    if finished is not None:
        response.parameters["finish_reason"].string_param = finished.reason
        for name, count in usage(finished).items():
            response.parameters[name].int64_param = count
    if request.final_flags:
        response.parameters[FINAL_RESPONSE].bool_param = finished is not None
    return bytes(response.SerializeToString())


def _inputs(message: Any, *, max_ids: int) -> dict[str, np.ndarray]:
    """The message's inputs as arrays, each checked against its datatype and its shape (token
    ids: fewer than ``max_ids``, the context, before any is converted)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(f"the request has {len(message.inputs)} inputs and "
                         f"{len(raw)} raw_input_contents; give one for each or none")
    found: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        name = tensor.name
        if len(name) > 64:
            raise GenerationError(f"an input is named with {len(name)} characters; this "
                                  f"model's inputs are {sorted(_DATATYPES)}")
        if name in found:
            raise GenerationError(f"input {name!r} is given twice")
        allowed = _DATATYPES.get(name)
        if allowed is None:
            found[name] = np.empty(0)  # named in the error the caller raises
            continue
        if tensor.datatype not in allowed:
            raise GenerationError(f"input {name!r} must be {' or '.join(allowed)}, got "
                                  f"{_short(tensor.datatype)}")
        shape = list(tensor.shape)
        if len(shape) > MAX_DIMS:
            raise GenerationError(f"input {name!r} has {len(shape)} dimensions; at most "
                                  f"{MAX_DIMS}")
        if any(d < 0 for d in shape):
            raise GenerationError(f"input {name!r} has a negative dimension: {shape}")
        count = math.prod(shape)
        if name != "input_ids" and count != 1:
            raise GenerationError(f"input {name!r} holds one element, got shape {shape}")
        if name == "input_ids" and count >= max_ids:
            raise GenerationError(f"the prompt has {count} tokens; this deployment keeps "
                                  f"{max_ids} per sequence, generated ones included")
        found[name] = _values(tensor, raw[index] if raw else None, count)
    return found


def _values(tensor: Any, raw: bytes | None, count: int) -> np.ndarray:
    """The tensor's ``count`` values, their number checked before any is converted."""
    name, kind = tensor.name, tensor.datatype
    if kind == "BYTES":  # one element (count is 1): a raw one is one length prefix and it
        if raw is not None:
            if len(raw) < 4 or int.from_bytes(raw[:4], "little") != len(raw) - 4:
                raise GenerationError(f"input {name!r}: its raw contents are not one BYTES "
                                      f"element (a 4-byte length, then that many bytes)")
            return np.array([raw[4:]], dtype=object)
        items = tensor.contents.bytes_contents
        if len(items) != count:
            raise GenerationError(f"input {name!r} has shape {list(tensor.shape)} but "
                                  f"{len(items)} values")
        return np.array([items[0]], dtype=object)
    if raw is not None:
        dtype = np.dtype(_RAW_DTYPES[kind])
        if len(raw) != count * dtype.itemsize:
            raise GenerationError(f"input {name!r}: {len(raw)} raw bytes are not {count} "
                                  f"{kind} values")
        return np.frombuffer(raw, dtype=dtype)
    typed = getattr(tensor.contents, _TYPED_FIELDS[kind])
    if len(typed) != count:
        raise GenerationError(f"input {name!r} has shape {list(tensor.shape)} but "
                              f"{len(typed)} values")
    return np.array(typed)


def _text(values: np.ndarray, name: str, *, max_bytes: int) -> str:
    data = bytes(values.reshape(-1)[0])
    if len(data) > max_bytes:
        raise GenerationError(f"input {name!r} has {len(data)} bytes; at most {max_bytes}")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise GenerationError(f"input {name!r} is not UTF-8 text: {err}") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise GenerationError(f"sampling_parameters is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise GenerationError("sampling_parameters must be a JSON object of "
                              f"{sorted(GENERATE_PARAMETERS)}")
    return value


def _number(name: str, value: Any) -> Any:
    """``value``, a number written as a string made a number (vLLM's clients send them so);
    GenerationError for a value no parameter takes (quoted short)."""
    if isinstance(value, (list, dict)) or isinstance(value, str) and len(value) > 64:
        raise GenerationError(f"{name[:64]!r} must be a number or true/false, got "
                              f"{_short(value)}")
    if not isinstance(value, str):
        return value
    try:
        if name in _INTEGER_PARAMETERS:
            return int(value)
        if name in _REAL_PARAMETERS:
            return float(value)
    except ValueError:
        raise GenerationError(f"{name} must be a number, got {_short(value)}") from None
    if name == "stop" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:40]}... ({len(text)} characters)"


def _bool(values: np.ndarray | None, *, default: bool) -> bool:
    return default if values is None else bool(values.reshape(-1)[0])


def peer_address(peer: str) -> str:
    """A gRPC peer string's address without its port or zone, normalised, an IPv4 address
    mapped into IPv6 as IPv4: ``ipv4:127.0.0.1:5000`` and ``ipv6:%5B::ffff:127.0.0.1%5D:5000``
    are both ``127.0.0.1``; ``ipv6:%5B::1%5D:5000`` is ``::1``. Other kinds (``unix:``) are
    kept whole."""
    kind, _, rest = peer.partition(":")
    rest = urllib.parse.unquote(rest)
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest[1:rest.find("]")] if rest.startswith("[") and "]" in rest else rest
    else:
        return peer
    return client_address(host) if host else peer
