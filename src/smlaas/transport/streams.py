"""Tensor messages on TLS connections, with as few copies as the TLS layer allows.

A :class:`MessageStream` is one connection carrying messages both ways. Its receiving side is
an :class:`asyncio.BufferedProtocol`: asyncio's (and uvloop's) TLS decrypts straight into the
buffer the protocol hands it, which for a payload is the message's own preallocated buffer,
so a tensor arrives with one copy (the decryption) and its arrays are views of that buffer.
The sending side writes large payloads in :data:`WRITE_CHUNK_BYTES` pieces, so the TLS layer
encrypts and sends each piece at once and the receiver decrypts while the rest is encrypted
(one ``writelines`` would encrypt the whole payload before its first byte leaves).

Everything is bounded: a header larger than ``MAX_HEADER_BYTES`` or one that describes more
than ``MAX_PAYLOAD_BYTES`` is refused before anything is allocated; at most
:data:`INBOX_MESSAGES` decoded messages wait for the reader, after which the stream stops
reading the socket (TCP pushes back); writes wait in ``drain`` while the transport's buffer is
full. The server side checks its peer (the mTLS role) when the connection is made, before a
byte of it is decoded.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import numpy as np

from smlaas.errors import AttestationError, ProtocolError
from smlaas.transport.tensors import TensorDecoder, TensorMessage, encode_message

WRITE_CHUNK_BYTES = 256 * 1024
"""Measured best on loopback between two processes (64 KiB to 4 MiB tried): see BENCHMARKS."""
COALESCE_BYTES = 16 * 1024
"""A message whose tensors take at most this much is written in one piece: a generation step
or a token costs one TLS record and one send, not one per tensor."""
INBOX_MESSAGES = 2
HANDSHAKE_TIMEOUT_S = 10.0

PeerCheck = Callable[[Any], None]
"""Raises AttestationError when the connection's peer may not talk to us."""


class MessageStream:
    """Read and write tensor messages on one connection (from one event loop)."""

    def __init__(self, protocol: _MessageProtocol) -> None:
        self._protocol = protocol

    async def read(self) -> TensorMessage:
        """The next message; EOFError if the peer closed cleanly between messages,
        ProtocolError if it closed inside one or sent garbage."""
        return await self._protocol.next_message()

    def write(self, message: TensorMessage) -> None:
        """Queues the whole message (messages never interleave); then await :meth:`drain`."""
        self.write_message(message.request_id, message.tensors, message.meta)

    def write_message(self, request_id: str, tensors: Mapping[str, np.ndarray],
                      meta: Mapping[str, Any] | None = None) -> None:
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        prefix, header, *payload = encode_message(request_id, tensors, meta)
        views = [memoryview(buffer).cast("B") for buffer in payload]
        if sum(len(view) for view in views) <= COALESCE_BYTES:  # one TLS record, one send
            transport.write(b"".join([bytes(prefix), bytes(header), *views]))
            return
        transport.write(bytes(prefix) + bytes(header))
        for buffer in payload:
            view = memoryview(buffer).cast("B")
            for offset in range(0, len(view), WRITE_CHUNK_BYTES):
                transport.write(view[offset:offset + WRITE_CHUNK_BYTES])

    async def drain(self) -> None:
        await self._protocol.drained()

    def is_closing(self) -> bool:
        transport = self._protocol.transport
        return transport is None or transport.is_closing()

    def close(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()

    async def wait_closed(self) -> None:
        await self._protocol.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._protocol.transport
        return default if transport is None else transport.get_extra_info(name, default)


class _MessageProtocol(asyncio.BufferedProtocol):
    """Decodes messages as bytes arrive, with the one :class:`TensorDecoder` (the transport
    writes straight into the decoder's buffers)."""

    def __init__(self, check_peer: PeerCheck | None = None,
                 on_connected: Callable[[_MessageProtocol], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._check_peer = check_peer
        self._on_connected = on_connected
        self._decoder = TensorDecoder()
        self._inbox: collections.deque[TensorMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended: BaseException | None = None
        self._reading_paused = False
        self._writable = loop.create_future()
        self._writable.set_result(None)
        self.closed = loop.create_future()
        self.refused: AttestationError | None = None

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but have its methods
        self.transport = transport  # type: ignore[assignment]
        if self._check_peer is not None:
            try:
                self._check_peer(transport.get_extra_info("ssl_object"))
            except AttestationError as err:
                self.refused = err
                self._end(EOFError(f"refused: {err}"))
                transport.close()
        if self._on_connected is not None:
            self._on_connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._decoder.mid_message:
            self._end(ProtocolError("peer closed the connection inside a message"))
        else:
            self._end(EOFError("peer closed the connection") if exc is None else exc)
        if not self._writable.done():
            self._writable.set_exception(ConnectionResetError("connection lost"))
            self._writable.exception()  # nobody may be draining: do not log it
        if not self.closed.done():
            self.closed.set_result(None)

    def eof_received(self) -> bool:
        return False  # close the transport

    # -- receiving -------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._decoder.buffer_updated(nbytes)
        except ProtocolError as err:
            self._end(err)
            if self.transport is not None:
                self.transport.abort()
            return
        for message in self._decoder.messages():
            self._deliver(message)

    def _deliver(self, message: TensorMessage) -> None:
        self._inbox.append(message)
        self._wake()
        if len(self._inbox) >= INBOX_MESSAGES and self.transport is not None \
                and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # TCP pushes back until the reader catches up

    def _end(self, reason: BaseException) -> None:
        if self._ended is None:
            self._ended = reason
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_message(self) -> TensorMessage:
        while not self._inbox:
            if self._ended is not None:
                raise self._ended
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        message = self._inbox.popleft()
        if self._reading_paused and len(self._inbox) < INBOX_MESSAGES and \
                self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()
        return message

    # -- sending ---------------------------------------------------------------------------
    def pause_writing(self) -> None:
        if self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if not self._writable.done():
            self._writable.set_result(None)

    async def drained(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        await asyncio.shield(self._writable)


async def open_stream(host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                      server_hostname: str | None = None) -> MessageStream:
    """A stream to ``host:port`` (TLS when ``ssl_context`` is given)."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(
        _MessageProtocol, host, port, ssl=ssl_context,
        server_hostname=server_hostname if ssl_context is not None else None)
    return MessageStream(protocol)


async def start_stream_server(handler: Callable[[MessageStream], Coroutine[Any, Any, None]],
                              host: str,
                              port: int, *, ssl_context: ssl.SSLContext | None,
                              check_peer: PeerCheck | None = None,
                              on_refused: Callable[[AttestationError], None] | None = None,
                              ) -> asyncio.Server:
    """A server calling ``handler`` with each connection's stream; a peer ``check_peer``
    refuses is closed before anything it sent is decoded (``on_refused`` hears why)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def start(protocol: _MessageProtocol) -> None:  # after the TLS handshake
        if protocol.refused is not None:
            if on_refused is not None:
                on_refused(protocol.refused)
            return
        task = loop.create_task(handler(MessageStream(protocol)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return await loop.create_server(
        lambda: _MessageProtocol(check_peer, start), host, port, ssl=ssl_context,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if ssl_context is not None else None)
