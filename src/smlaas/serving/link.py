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
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import numpy as np

from smlaas.errors import AttestationError, ProtocolError
from smlaas.serving.protocol import Status, error_reply, remaining_s
from smlaas.transport.streams import MessageStream, open_stream
from smlaas.transport.tensors import TensorMessage
from smlaas.transport.tls import require_peer

logger = logging.getLogger(__name__)
T = TypeVar("T")
CONNECT_TIMEOUT_S = 3.0
REPLICA_BACKOFF_S = 1.0
DEFAULT_TIMEOUT_S = 60.0


class Link:
    """Client side of a connection to ``role`` at ``host:port`` (used from one event loop)."""

    def __init__(self, role: str, host: str, port: int, context: ssl.SSLContext, *,
                 manifest_digest: str) -> None:
        self.role, self.host, self.port = role, host, port
        self.manifest_digest = manifest_digest
        self._context = context
        self._stream: MessageStream | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[TensorMessage]] = {}
        self._connecting = asyncio.Lock()
        self._ids = itertools.count()

    @property
    def connected(self) -> bool:
        return self._stream is not None and not self._stream.is_closing()

    async def request(self, tensors: Mapping[str, np.ndarray], meta: dict[str, Any], *,
                      request_id: str | None = None) -> TensorMessage:
        """Sends one request and waits for its reply until ``meta['deadline']``; failures come
        back as error replies, never as a hang."""
        request_id = request_id or f"{self.role}-{next(self._ids)}"
        timeout = remaining_s(meta, DEFAULT_TIMEOUT_S)
        try:
            stream = await asyncio.wait_for(self._connect(), min(timeout, CONNECT_TIMEOUT_S))
        except (OSError, ssl.SSLError, TimeoutError, AttestationError) as err:
            return self._failed(request_id, f"{self.role} is unavailable: cannot connect to "
                                            f"{self.host}:{self.port} ({_describe(err)})")
        if request_id in self._pending:
            return error_reply(request_id, Status.BAD_INPUT,
                               f"request id {request_id!r} is already in flight")
        future: asyncio.Future[TensorMessage] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            stream.write_message(request_id, tensors, meta)
            await asyncio.wait_for(stream.drain(), timeout)
            return await asyncio.wait_for(asyncio.shield(future), remaining_s(meta, timeout))
        except TimeoutError:
            return error_reply(request_id, Status.DEADLINE,
                               f"no reply from {self.role} before the deadline")
        except (OSError, ssl.SSLError, ProtocolError) as err:
            stream.close()
            self._fail_all(f"connection to {self.role} lost ({_describe(err)})")
            return self._failed(request_id, f"{self.role} is unavailable: {_describe(err)}")
        finally:
            self._pending.pop(request_id, None)

    async def request_all(self, tensors: Mapping[str, np.ndarray], meta: dict[str, Any], *,
                          request_id: str | None = None) -> TensorMessage:
        """One link: the same as :meth:`request` (see :meth:`ReplicaSet.request_all`)."""
        return await self.request(tensors, meta, request_id=request_id)

    async def _connect(self) -> MessageStream:
        async with self._connecting:
            if self._stream is not None and not self._stream.is_closing():
                return self._stream
            stream = await open_stream(self.host, self.port, ssl_context=self._context,
                                       server_hostname=self.role)
            try:  # the server must be the role we dial, admitted under our manifest
                require_peer(stream.get_extra_info("ssl_object"), self.role,
                             self.manifest_digest)
            except AttestationError:
                stream.close()
                raise
            self._stream = stream
            self._reader_task = asyncio.create_task(self._read_replies(stream))
            logger.info("connected to %s at %s:%d", self.role, self.host, self.port)
            return stream

    async def _read_replies(self, stream: MessageStream) -> None:
        reason = "closed by peer"
        try:
            while True:
                message = await stream.read()
                future = self._pending.get(message.request_id)
                if future is not None and not future.done():
                    future.set_result(message)
        except (EOFError, OSError, ssl.SSLError, ProtocolError) as err:
            reason = _describe(err)
        finally:
            if self._stream is stream:
                self._stream = None
            stream.close()
            self._fail_all(f"connection to {self.role} lost ({reason})")

    def _fail_all(self, reason: str) -> None:
        if self._pending:
            logger.warning("%s: failing %d request(s) in flight", reason, len(self._pending))
        for request_id, future in list(self._pending.items()):
            if not future.done():
                future.set_result(self._failed(request_id,
                                               f"{self.role} is unavailable: {reason}"))

    def _failed(self, request_id: str, message: str) -> TensorMessage:
        """The reply to a request this link could not deliver or get answered."""
        reply = error_reply(request_id, Status.UNAVAILABLE, message)
        reply.meta["failed_link"] = self.role
        return reply

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(self._stream.wait_closed(), 2.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task


class ReplicaSet:
    """Links to every replica of one role, used like one :class:`Link`.

    Each request goes to the replica with the fewest outstanding requests (ties in turn). When
    the answer is ``unavailable`` (the replica's link failed: it could not be reached, or the
    connection was lost with the request unanswered; or the replica's own next stage was
    down), the request is sent again to another replica while its deadline allows, since
    inference is idempotent: losing one replica loses no request. A replica whose link failed
    is avoided for :data:`REPLICA_BACKOFF_S` (its launcher restarts it; it then rejoins).
    """

    def __init__(self, links: list[Link]) -> None:
        if not links or len({link.role for link in links}) != 1:
            raise ValueError("a replica set needs links to one role")
        self.links = links
        self.role = links[0].role
        self._outstanding = [0] * len(links)
        self._avoid_until = [0.0] * len(links)
        self._turn = itertools.count()

    async def request(self, tensors: Mapping[str, np.ndarray], meta: dict[str, Any], *,
                      request_id: str | None = None) -> TensorMessage:
        tried: set[int] = set()
        while True:
            index = self._choose(tried)
            self._outstanding[index] += 1
            try:
                reply = await self.links[index].request(tensors, meta, request_id=request_id)
            finally:
                self._outstanding[index] -= 1
            if reply.meta.get("status") != Status.UNAVAILABLE:
                return reply
            if reply.meta.get("failed_link") == self.role:
                self._avoid_until[index] = time.monotonic() + REPLICA_BACKOFF_S
            tried.add(index)
            if len(tried) == len(self.links) or remaining_s(meta, DEFAULT_TIMEOUT_S) <= 0:
                return reply
            logger.info("%s replica %d unavailable; sending %s to another", self.role, index,
                        request_id or "the request")

    async def request_all(self, tensors: Mapping[str, np.ndarray], meta: dict[str, Any], *,
                          request_id: str | None = None) -> TensorMessage:
        """Sends to every replica at once (describe probes: each replica reports itself); the
        first answer without an error, with every answering replica's ``stage_stats``, or
        the first error when none answered."""
        base = request_id or f"{self.role}-all"
        replies = await asyncio.gather(*(
            link.request(tensors, dict(meta), request_id=f"{base}.{index}")
            for index, link in enumerate(self.links)))
        for reply in replies:  # answered under the caller's id, as one request would be
            reply.request_id = request_id or reply.request_id
        answered = [r for r in replies if "error" not in r.meta]
        if not answered:
            return replies[0]
        merged = answered[0]
        merged.meta["stage_stats"] = [report for r in answered
                                      for report in r.meta.get("stage_stats") or []]
        return merged

    def _choose(self, tried: set[int]) -> int:
        now, turn = time.monotonic(), next(self._turn)
        candidates = [i for i in range(len(self.links)) if i not in tried]
        return min(candidates, key=lambda i: (self._avoid_until[i] > now,
                                              self._outstanding[i],
                                              (i - turn) % len(self.links)))

    async def close(self) -> None:
        for link in self.links:
            await link.close()


Hop = Link | ReplicaSet
"""What a role sends its requests to: one link, or the replicas of the next role."""


def replica_set(role: str, addresses: tuple[tuple[str, int], ...], context: ssl.SSLContext,
                *, manifest_digest: str) -> ReplicaSet:
    return ReplicaSet([Link(role, host, port, context, manifest_digest=manifest_digest)
                       for host, port in addresses])


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` on uvloop when it is installed (faster TLS streams), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
