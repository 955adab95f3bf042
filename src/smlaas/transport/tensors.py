"""Tensor messages on a byte stream, for the pipeline between gateway and stages.

A message is ``u32 header length | header (JSON) | payload``. The header names the request,
carries small metadata and describes each tensor (name, dtype, shape, byte count); the payload
is the tensors' raw C-order bytes back to back. Encoding returns buffers to ``sendall`` one by
one (no copy of the tensors); decoding is incremental (:class:`TensorDecoder`) and never touches
a socket, so it is tested with in-memory byte strings. Every size is bounded before anything is
allocated.
"""

from __future__ import annotations

import collections
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from smlaas.errors import ProtocolError

MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 2 << 30
MAX_TENSORS = 1024
BYTES = "bytes"
"""The dtype name of a string tensor on the wire: elements of bytes, as numpy object arrays
in memory and in Triton's length-prefixed layout in a message."""
FIXED_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64", "int8", "int16",
                          "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"})
ALLOWED_DTYPES = FIXED_DTYPES | {BYTES}


def wire_dtype(dtype: np.dtype[Any]) -> str:
    """The name a numpy dtype travels under (object arrays are string tensors)."""
    return BYTES if dtype == np.dtype(object) else dtype.name


def serialize_bytes(values: np.ndarray) -> bytes:
    """A string tensor in Triton's binary layout: each element as a 4-byte little-endian
    length and its bytes, in row-major order (str elements as UTF-8)."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in
                    (_as_bytes(v) for v in values.reshape(-1)))


def deserialize_bytes(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The elements of a string tensor in Triton's binary layout; ValueError if it is cut
    short."""
    view = memoryview(data)
    items, offset = [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise ValueError("a BYTES element's length prefix is cut short")
        length = int.from_bytes(view[offset:offset + 4], "little")
        if offset + 4 + length > len(view):
            raise ValueError("a BYTES element is longer than the data left")
        items.append(bytes(view[offset + 4:offset + 4 + length]))
        offset += 4 + length
    return items


def bytes_array(items: list[bytes], shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """An object array of ``items`` in ``shape``; ValueError if the counts differ."""
    count = math.prod(shape)
    if len(items) != count:
        raise ValueError(f"{len(items)} BYTES elements for shape {list(shape)} (needs {count})")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"a BYTES element must be bytes or str, not {type(value).__name__}")


@dataclass
class TensorMessage:
    request_id: str
    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def encode_message(request_id: str, tensors: Mapping[str, np.ndarray],
                   meta: Mapping[str, Any] | None = None) -> list[bytes | memoryview]:
    """Buffers whose concatenation is the message; tensor data is not copied when the arrays
    are already C-contiguous."""
    descriptions, payload = [], []
    for name, array in tensors.items():
        contiguous = np.asarray(array, order="C")  # keeps 0-d (ascontiguousarray does not)
        dtype = wire_dtype(contiguous.dtype)
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {dtype}, which cannot be sent")
        data: bytes | memoryview
        if dtype == BYTES:
            try:
                data = serialize_bytes(contiguous)
            except ValueError as err:
                raise ProtocolError(f"tensor {name!r}: {err}") from err
        else:
            data = contiguous.reshape(-1).view(np.uint8).data
        descriptions.append({"name": name, "dtype": dtype, "shape": list(contiguous.shape),
                             "nbytes": len(data)})
        payload.append(data)
    header = json.dumps({"id": request_id, "meta": dict(meta or {}), "tensors": descriptions},
                        separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {len(header)} bytes is too large")
    return [struct.pack(">I", len(header)), header, *payload]


def message_bytes(request_id: str, tensors: Mapping[str, np.ndarray],
                  meta: Mapping[str, Any] | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode_message(request_id, tensors, meta))


_PREFIX, _HEADER, _PAYLOAD = range(3)
_SMALL_BUFFER = 64 * 1024


class TensorDecoder:
    """The tensor wire format's one decoder: a state machine (length prefix, header, payload)
    that asks for exactly the bytes it needs next. A buffered protocol fills
    :meth:`get_buffer` in place and calls :meth:`buffer_updated` (a payload lands in the
    array it will be read from, with no copy); :meth:`feed` does the same from bytes in hand.
    Completed messages come out of :meth:`messages`. A header is checked (sizes, dtypes,
    limits) before its payload is allocated."""

    def __init__(self) -> None:
        self._small = bytearray(_SMALL_BUFFER)
        self._target: Any = self._small
        self._state, self._need, self._have = _PREFIX, 4, 0
        self._header: dict[str, Any] = {}
        self._ready: collections.deque[TensorMessage] = collections.deque()
        self._error: ProtocolError | None = None

    @property
    def mid_message(self) -> bool:
        """Whether part of a message has arrived (a connection closed now was cut short)."""
        return self._state != _PREFIX or self._have > 0

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unfinished message received so far."""
        return self._have if self.mid_message else 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes go: exactly as many as the current part still needs."""
        return memoryview(self._target)[self._have:self._need]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of :meth:`get_buffer`; ProtocolError if what
        arrived is not a valid message."""
        self._have += nbytes
        while self._have >= self._need:
            self._advance()
            if self._need:  # a zero-length part (no payload) completes at once
                break

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Decodes ``data``; a ProtocolError is kept and raised by :meth:`messages`."""
        view = memoryview(data)
        try:
            while view and self._error is None:
                target = self.get_buffer()
                count = min(len(target), len(view))
                target[:count] = view[:count]
                view = view[count:]
                self.buffer_updated(count)
        except ProtocolError as err:
            self._error = err

    def messages(self) -> Iterator[TensorMessage]:
        """The completed messages, in order; then the error that stopped decoding, if any."""
        while self._ready:
            yield self._ready.popleft()
        if self._error is not None:
            raise self._error

    def _advance(self) -> None:
        if self._state == _PREFIX:
            length, = struct.unpack_from(">I", self._small, 0)
            if length > MAX_HEADER_BYTES:
                raise ProtocolError(f"message header of {length} bytes exceeds the limit")
            if length > len(self._small):
                self._small = bytearray(length)
            self._state, self._need, self._have, self._target = _HEADER, length, 0, self._small
        elif self._state == _HEADER:
            self._header = parse_header(bytes(self._small[:self._need]))
            total = sum(int(t["nbytes"]) for t in self._header["tensors"])
            self._target = np.empty(total, dtype=np.uint8)  # no zero-fill: all overwritten
            self._state, self._need, self._have = _PAYLOAD, total, 0
        else:
            message = decode_payload(self._header, self._target)
            self._state, self._need, self._have, self._target = _PREFIX, 4, 0, self._small
            self._ready.append(message)


def decode_payload(header: dict[str, Any], payload: bytes | bytearray) -> TensorMessage:
    """The message a parsed header and its payload describe (arrays view ``payload``)."""
    tensors, offset = {}, 0
    for item in header["tensors"]:
        if item["dtype"] == BYTES:
            try:
                tensors[item["name"]] = bytes_array(deserialize_bytes(
                    memoryview(payload)[offset:offset + item["nbytes"]]), item["shape"])
            except ValueError as err:
                raise ProtocolError(f"tensor {item['name']!r}: {err}") from err
        else:
            tensors[item["name"]] = np.frombuffer(payload, dtype=item["dtype"],
                                                  count=math.prod(item["shape"]),
                                                  offset=offset).reshape(item["shape"])
        offset += item["nbytes"]
    return TensorMessage(str(header["id"]), tensors, dict(header["meta"]))


def parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
        tensors = header["tensors"]
        if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
            raise ValueError("bad tensor list")
        total = 0
        for item in tensors:
            dtype = str(item["dtype"])
            shape = [int(d) for d in item["shape"]]
            if dtype not in ALLOWED_DTYPES or any(d < 0 for d in shape):
                raise ValueError(f"bad tensor description {item}")
            count, nbytes = math.prod(shape), int(item["nbytes"])
            if dtype == BYTES:
                if nbytes < 4 * count:
                    raise ValueError(f"tensor {item['name']!r}: {nbytes} bytes cannot hold "
                                     f"{count} BYTES elements")
            elif nbytes != count * np.dtype(dtype).itemsize:
                raise ValueError(f"tensor {item['name']!r}: {nbytes} bytes for shape "
                                 f"{shape} of {dtype} (expected "
                                 f"{count * np.dtype(dtype).itemsize})")
            total += nbytes
        if total > MAX_PAYLOAD_BYTES:
            raise ValueError(f"payload of {total} bytes exceeds the limit")
        if not isinstance(header.get("meta", {}), dict):
            raise ValueError("meta must be an object")
        header.setdefault("meta", {})
        return dict(header)
    except (ValueError, KeyError, TypeError) as err:
        raise ProtocolError(f"malformed tensor message header: {err}") from err


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the stages describe it and the V2 codec checks requests against it."""

    name: str
    dtype: str
    """numpy dtype name."""
    shape: list[int | None]
    """None for a symbolic dimension."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]),
                   [None if d is None else int(d) for d in data["shape"]])
