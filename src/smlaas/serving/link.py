"""A persistent mutual-TLS connection to the next role, carrying many requests at once.

The server must present a deployment certificate for the role dialled, issued under the same
manifest (checked from the CA's fields before any request is written). Requests are written as
they come (pipelining); replies are matched by request id. If the connection fails, every
request waiting on it gets an ``unavailable`` reply at once, and the next request dials again
(the peer may have been restarted). Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import numpy as np

from smlaas.errors import AttestationError
from smlaas.serving.protocol import Status, error_reply, remaining_s
from smlaas.transport.framing import ProtocolError
from smlaas.transport.streams import STREAM_LIMIT, read_message, write_message
from smlaas.transport.tensors import TensorMessage
from smlaas.transport.tls import require_peer

logger = logging.getLogger(__name__)
T = TypeVar("T")
CONNECT_TIMEOUT_S = 3.0
DEFAULT_TIMEOUT_S = 60.0


class Link:
    """Client side of a connection to ``role`` at ``host:port`` (used from one event loop)."""

    def __init__(self, role: str, host: str, port: int, context: ssl.SSLContext, *,
                 manifest_digest: str) -> None:
        self.role, self.host, self.port = role, host, port
        self.manifest_digest = manifest_digest
        self._context = context
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[TensorMessage]] = {}
        self._connecting = asyncio.Lock()
        self._ids = itertools.count()

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def request(self, tensors: Mapping[str, np.ndarray], meta: dict[str, Any], *,
                      request_id: str | None = None) -> TensorMessage:
        """Sends one request and waits for its reply until ``meta['deadline']``; failures come
        back as error replies, never as a hang."""
        request_id = request_id or f"{self.role}-{next(self._ids)}"
        timeout = remaining_s(meta, DEFAULT_TIMEOUT_S)
        try:
            writer = await asyncio.wait_for(self._connect(), min(timeout, CONNECT_TIMEOUT_S))
        except (OSError, ssl.SSLError, TimeoutError, AttestationError) as err:
            return error_reply(request_id, Status.UNAVAILABLE,
                               f"{self.role} is unavailable: cannot connect to "
                               f"{self.host}:{self.port} ({_describe(err)})")
        if request_id in self._pending:
            return error_reply(request_id, Status.BAD_INPUT,
                               f"request id {request_id!r} is already in flight")
        future: asyncio.Future[TensorMessage] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            write_message(writer, request_id, tensors, meta)
            await asyncio.wait_for(writer.drain(), timeout)
            return await asyncio.wait_for(asyncio.shield(future), remaining_s(meta, timeout))
        except TimeoutError:
            return error_reply(request_id, Status.DEADLINE,
                               f"no reply from {self.role} before the deadline")
        except (OSError, ssl.SSLError, ProtocolError) as err:
            writer.close()
            self._fail_all(f"connection to {self.role} lost ({_describe(err)})")
            return error_reply(request_id, Status.UNAVAILABLE,
                               f"{self.role} is unavailable: {_describe(err)}")
        finally:
            self._pending.pop(request_id, None)

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._context, server_hostname=self.role,
                limit=STREAM_LIMIT)
            try:  # the server must be the role we dial, admitted under our manifest
                require_peer(writer.get_extra_info("ssl_object"), self.role,
                             self.manifest_digest)
            except AttestationError:
                writer.close()
                raise
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_replies(reader, writer))
            logger.info("connected to %s at %s:%d", self.role, self.host, self.port)
            return writer

    async def _read_replies(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        reason = "closed by peer"
        try:
            while True:
                message = await read_message(reader)
                future = self._pending.get(message.request_id)
                if future is not None and not future.done():
                    future.set_result(message)
        except (EOFError, OSError, ssl.SSLError, ProtocolError) as err:
            reason = _describe(err)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            self._fail_all(f"connection to {self.role} lost ({reason})")

    def _fail_all(self, reason: str) -> None:
        if self._pending:
            logger.warning("%s: failing %d request(s) in flight", reason, len(self._pending))
        for request_id, future in list(self._pending.items()):
            if not future.done():
                future.set_result(error_reply(request_id, Status.UNAVAILABLE,
                                              f"{self.role} is unavailable: {reason}"))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await asyncio.wait_for(self._writer.wait_closed(), 2.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` on uvloop when it is installed (faster TLS streams), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
