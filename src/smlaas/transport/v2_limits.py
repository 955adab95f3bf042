"""What a V2 request and response may take, from the model alone (pure): the body limit of its
inputs at the largest batch, JSON checked for values, containers and depth before it is
parsed, and the most a response's outputs can take as JSON, checked before anything runs."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from smlaas.errors import BadRequest
from smlaas.transport.tensors import BYTES, TensorSpec

# What a request may hold beyond its tensors (JSON header, names, parameters), and what one
# number may take in JSON ("-1.2345678901234567e-308," is 25 bytes).
HEADER_ALLOWANCE_BYTES = 64 * 1024
JSON_BYTES_PER_VALUE = 32
STRUCTURE_ALLOWANCE = 4096
"""JSON values and containers besides the tensors' elements (inputs, shapes, parameters)."""
MAX_JSON_DEPTH = 64
DYNAMIC_DIM_CAP = 8192
"""What a symbolic dimension other than the batch one may reach, for the body limit."""
BYTES_ELEMENT_ALLOWANCE = 4096
"""What one BYTES element may take on average, for the body limit (a string tensor's size is
not fixed by its shape)."""
_BRACKETS = re.compile(rb"[\[\]{}]")

MAX_JSON_RESPONSE_BYTES = 8 * 1024 * 1024
"""What the JSON of a response's outputs may reach (at worst, :func:`json_bytes_bound`). A
760-byte request asking for JSON outputs of a model with large outputs once got 81.5 MiB back
in 6.2 s (issue 18); past this bound the client is told to ask for binary outputs."""
JSON_VALUE_BYTES = {"bool": len("false,"), "int8": len("-128,"), "uint8": len("255,"),
                    "int16": len("-32768,"), "uint16": len("65535,"),
                    "int32": len("-2147483648,"), "uint32": len("4294967295,"),
                    "int64": len("-9223372036854775808,"), "uint64": len("18446744073709551615,")}
"""The longest a value of each integer type takes in JSON; floats take at most
FLOAT_JSON_BYTES."""
FLOAT_JSON_BYTES = len("-1.2345678901234567e-308,")
BYTES_JSON_EXPANSION = 6
"""A BYTES element's byte in JSON, at worst: a control byte or one that is not UTF-8 becomes
a six-character escape (\\u00XX or \\ufffd)."""


@dataclass(frozen=True)
class RequestLimits:
    """Bounds that follow from the model: its inputs at the largest batch it serves. A body
    past them is refused before it is read, and a JSON header that could expand past them is
    refused before it is parsed (:func:`check_json_bounds`)."""

    max_elements: int
    max_body_bytes: int

    @classmethod
    def for_model(cls, inputs: list[TensorSpec], *, max_batch_size: int) -> RequestLimits:
        rows = max(1, max_batch_size)
        elements = itemsize = 0
        for spec in inputs:
            dims = [rows if axis == 0 and max_batch_size > 0 else
                    DYNAMIC_DIM_CAP if d is None else d for axis, d in enumerate(spec.shape)]
            elements += math.prod(dims)
            itemsize = max(itemsize, BYTES_ELEMENT_ALLOWANCE if spec.dtype == BYTES
                           else np.dtype(spec.dtype).itemsize)
        per_value = max(itemsize, JSON_BYTES_PER_VALUE)
        return cls(elements, HEADER_ALLOWANCE_BYTES + elements * per_value)


def check_json_bounds(text: bytes | bytearray, limits: RequestLimits) -> None:
    """BadRequest unless ``text`` is within what the model can take: values and containers
    (counted from the bytes, before any parsing) and nesting depth."""
    allowed = limits.max_elements + STRUCTURE_ALLOWANCE
    if text.count(b",") > allowed:
        raise BadRequest(f"the JSON holds more values than the model's inputs can ({allowed})")
    containers = text.count(b"[") + text.count(b"{")
    if containers > allowed:
        raise BadRequest(f"the JSON holds {containers} arrays or objects, more than the "
                         f"model's inputs can ({allowed})")
    if containers <= MAX_JSON_DEPTH:
        return  # too few to nest deeper (a tensor's flat data has one or two)
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"the JSON nests deeper than {MAX_JSON_DEPTH} levels")


def json_bytes_bound(value: np.ndarray) -> int:
    """The most bytes ``value``'s elements can take as JSON data (a flat array)."""
    if value.dtype == object:
        return len("[]") + sum(BYTES_JSON_EXPANSION * len(as_text_bytes(v)) + len('"",')
                               for v in value.reshape(-1))
    return len("[]") + value.size * JSON_VALUE_BYTES.get(value.dtype.name, FLOAT_JSON_BYTES)


def spec_json_bytes_bound(spec: TensorSpec, *, rows: int, batching: bool) -> int | None:
    """The most bytes an output as the model describes it can take as JSON data at ``rows``
    rows; None when that is not known before it runs (a symbolic dimension, BYTES)."""
    dims = [rows if batching and axis == 0 else d for axis, d in enumerate(spec.shape)]
    if spec.dtype == BYTES or any(d is None for d in dims):
        return None
    return len("[]") + math.prod(int(d) for d in dims if d is not None) * JSON_VALUE_BYTES.get(
        spec.dtype, FLOAT_JSON_BYTES)


def check_json_outputs(bounds: Mapping[str, int | None], *,
                       limit: int = MAX_JSON_RESPONSE_BYTES) -> None:
    """BadRequest when the outputs to send as JSON (name -> the most their data can take;
    None: unknown yet) could take more than ``limit`` bytes together."""
    known = {name: bound for name, bound in bounds.items() if bound is not None}
    total = sum(known.values())
    if total > limit:
        names = ", ".join(sorted(known))
        raise BadRequest(f"the outputs asked for as JSON ({names}) can take up to {total} bytes "
                         f"of JSON, more than the {limit} this gateway returns as JSON; ask for "
                         f"binary outputs (request parameter binary_data_output: true, or "
                         f"binary_data: true on the output: Triton's binary tensor extension)")


def as_text_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
