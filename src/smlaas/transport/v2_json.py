"""JSON tensor data of the Open Inference Protocol (pure): a request's JSON read fast and
leniently, a tensor's elements written as JSON a slice at a time, and JSON numbers read as a
tensor's type. orjson does the work; Python's ``json`` reads what orjson refuses and writes
what orjson would write as null (NaN, infinities) or cannot write (BYTES)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson

from smlaas.errors import BadRequest

JSON_CHUNK_VALUES = 4096
"""Values encoded as JSON per call. An encoder holds the GIL for a whole call, and the event
loop's thread takes the GIL back after every TLS read it makes (each releases it), so a large
response encoded in a worker thread delays each of those reads by up to one slice: orjson
encodes a slice of this size in about 0.25 ms here (``json.dumps`` of ``tolist()`` took 4.7 ms,
and 4 MiB of JSON outputs delayed the loop by up to 140 ms)."""


def json_values(value: np.ndarray) -> list[Any]:
    """A tensor's elements, flattened, as JSON holds them: BYTES as strings, BF16 as
    numbers."""
    flat = value.reshape(-1)
    if value.dtype == object:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if value.dtype.name == "bfloat16":
        return flat.astype(np.float32).tolist()
    return flat.tolist()


def read_json(text: bytes | bytearray) -> Any:
    """The request's JSON, read by orjson (several times faster than ``json``, which matters
    for tensors sent as JSON). What orjson refuses is read by Python's ``json`` as before
    (NaN and infinities, ``1e400``, UTF-16/32 or a UTF-8 BOM, lone surrogates): a malformed
    body is so parsed twice, at most what a valid body of its size costs once more. orjson
    reads an integer literal past 64 bits as a float (see :func:`json_array`)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"request body is not valid JSON: {err}") from err


def json_data_text(value: np.ndarray) -> str:
    """A tensor's elements, flattened, as a JSON array, encoded JSON_CHUNK_VALUES at a time.
    Numbers are written by orjson: floats as the shortest text that reads back as the same
    value (float32's for float16 and BF16, float64's for float64). BYTES, and floats holding NaN or
    infinities (which orjson would write as null), are written as :func:`json_values` gives
    them."""
    flat = np.ascontiguousarray(value.reshape(-1))
    if flat.dtype.name == "bfloat16":
        flat = flat.astype(np.float32)
    if flat.dtype == object or (flat.dtype.kind == "f" and not np.isfinite(flat).all()):
        parts = [json_text(json_values(flat[start:start + JSON_CHUNK_VALUES]))[1:-1]
                 for start in range(0, flat.size, JSON_CHUNK_VALUES)]
        return "[" + ",".join(parts) + "]"
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    chunks = [orjson.dumps(flat[start:start + JSON_CHUNK_VALUES],
                           option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
              for start in range(0, flat.size, JSON_CHUNK_VALUES)]
    return "[" + b",".join(chunks).decode("ascii") + "]"


def json_text(value: Any) -> str:
    """``value`` as compact JSON (Python's ``json``: for small documents, not tensor data)."""
    return json.dumps(value, separators=(",", ":"))


INTEGRAL_FLOAT_LIMIT = 2.0**53
"""The largest magnitude at which every integer is a float: an integer input given as a float
(``3.0``) is read only below it."""


def json_array(data: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """JSON numbers as ``dtype`` (BF16 through float32, exact for BF16 values). An integer
    type's data given as floats must hold whole numbers below 2**53: orjson reads an integer
    literal past 64 bits as a float, which would otherwise round into range."""
    if dtype.name == "bfloat16":
        return np.asarray(data, dtype=np.float32).astype(dtype)
    if dtype.kind in "iu":
        values = np.asarray(data)
        if values.dtype.kind == "f" and not (
                np.isfinite(values).all() and (values == np.trunc(values)).all()
                and (np.abs(values) < INTEGRAL_FLOAT_LIMIT).all()):
            raise ValueError(f"{dtype.name} data must be integers within the type's range")
    return np.asarray(data, dtype=dtype)
