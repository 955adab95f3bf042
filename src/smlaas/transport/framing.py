"""Length-prefixed JSON messages on a byte stream: 4-byte big-endian length, then UTF-8 JSON.

Bounded: a frame larger than ``max_bytes`` is refused before it is read, so a peer cannot
make the reader allocate without limit.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from smlaas.errors import ProtocolError

MAX_FRAME_BYTES = 16 * 1024 * 1024


def encode_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode_frame(message))


def recv_message(sock: socket.socket, *, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Reads one frame (the socket's timeout bounds the wait)."""
    header = _recv_exactly(sock, 4)
    length = frame_length(header, max_bytes=max_bytes)
    return decode_frame_body(_recv_exactly(sock, length))


def frame_length(prefix: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> int:
    """The body length a 4-byte frame prefix announces; ProtocolError past ``max_bytes``."""
    length, = struct.unpack(">I", prefix)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    return int(length)


def decode_frame_body(body: bytes) -> dict[str, Any]:
    """The JSON object a frame body holds; ProtocolError for anything else."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ProtocolError(f"frame is not JSON: {err}") from err
    if not isinstance(message, dict):
        raise ProtocolError("frame must hold a JSON object")
    return message


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, remaining = [], count
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ProtocolError(f"peer closed the connection with {remaining} of {count} bytes "
                                f"unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
