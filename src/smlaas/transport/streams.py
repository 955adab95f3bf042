"""Tensor messages on asyncio streams (TLS included: asyncio's TLS runs in the event loop, so
one connection can read and write at the same time safely)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from smlaas.transport.framing import ProtocolError
from smlaas.transport.tensors import (
    MAX_HEADER_BYTES,
    TensorMessage,
    decode_payload,
    encode_message,
    parse_header,
)

# asyncio pauses a connection whose read buffer holds more than twice this: with the default
# (64 KiB) a 3 MiB activation tensor arrives in dozens of pause/resume round trips.
STREAM_LIMIT = 16 * 1024 * 1024


async def read_message(reader: asyncio.StreamReader) -> TensorMessage:
    """The next message; ProtocolError if the peer closes mid-message or sends garbage,
    EOFError if it closes cleanly between messages."""
    try:
        prefix = await reader.readexactly(4)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            raise EOFError("peer closed the connection") from None
        raise ProtocolError("peer closed the connection inside a message header") from err
    length, = struct.unpack(">I", prefix)
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"message header of {length} bytes exceeds the limit")
    try:
        header = parse_header(await reader.readexactly(length))
        payload = await reader.readexactly(sum(t["nbytes"] for t in header["tensors"]))
    except asyncio.IncompleteReadError as err:
        raise ProtocolError("peer closed the connection inside a message") from err
    return decode_payload(header, payload)


def write_message(writer: asyncio.StreamWriter, request_id: str,
                  tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
                  ) -> None:
    """Queues the whole message at once (messages never interleave); await ``drain``."""
    writer.writelines(encode_message(request_id, tensors, meta))


def write_reply(writer: asyncio.StreamWriter, message: TensorMessage) -> None:
    write_message(writer, message.request_id, message.tensors, message.meta)
