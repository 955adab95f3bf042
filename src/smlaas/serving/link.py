"""A persistent mutual-TLS connection to the next role, carrying many requests at once.

The server must present a deployment certificate for the role dialled, issued under the same
manifest (checked from the CA's fields before any request is written). Requests are written as
they come (pipelining); replies are matched by request id. If the connection fails, every
request waiting on it gets an ``unavailable`` :class:`~smlaas.serving.protocol.Failure` at
once, and the next request dials again (the peer may have been restarted). Every wait has a
deadline. :class:`Link` and :class:`ReplicaSet` are the network's
:class:`~smlaas.serving.hop.Hop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from smlaas.errors import AttestationError, ProtocolError, Status
from smlaas.receipts.claims import StageReceipt
from smlaas.serving.hop import Follow
from smlaas.serving.protocol import (
    Describe,
    Description,
    Failure,
    Infer,
    Outputs,
    Reply,
    Request,
    Signed,
    from_frame,
    to_frame,
)
from smlaas.transport.streams import MessageStream, open_stream
from smlaas.transport.tensors import TensorMessage
from smlaas.transport.tls import require_peer

logger = logging.getLogger(__name__)
T = TypeVar("T")
CONNECT_TIMEOUT_S = 3.0
REPLICA_BACKOFF_S = 1.0


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

    async def request(self, message: Infer, *, request_id: str | None = None,
                      follow: Follow | None = None) -> Outputs | Failure:
        """Sends one request (and, once it is written, what ``follow`` gives when ready,
        after it on the same connection) and waits for its reply until its deadline;
        failures come back as a Failure, never as a hang."""
        reply = await self._exchange(message, request_id, follow)
        return reply if isinstance(reply, (Outputs, Failure)) else \
            self._unexpected(reply, "an inference")

    async def describe(self, message: Describe, *, request_id: str | None = None
                       ) -> Description | Failure:
        reply = await self._exchange(message, request_id)
        return reply if isinstance(reply, (Description, Failure)) else \
            self._unexpected(reply, "a describe")

    async def _exchange(self, message: Request, request_id: str | None,
                        follow: Follow | None = None) -> Reply:
        request_id = request_id or f"{self.role}-{next(self._ids)}"
        timeout = message.remaining_s()
        try:
            stream = await asyncio.wait_for(self._connect(), min(timeout, CONNECT_TIMEOUT_S))
        except (OSError, ssl.SSLError, TimeoutError, AttestationError) as err:
            return self._failed(f"{self.role} is unavailable: cannot connect to "
                                f"{self.host}:{self.port} ({_describe(err)})")
        if request_id in self._pending:
            return Failure(Status.BAD_INPUT, f"request id {request_id!r} is already in flight")
        future: asyncio.Future[TensorMessage] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            stream.write(to_frame(request_id, message))
            await asyncio.wait_for(stream.drain(), timeout)
            if follow is not None:
                _send_after(stream, request_id, follow())
            frame = await asyncio.wait_for(asyncio.shield(future), message.remaining_s())
        except TimeoutError:
            return Failure(Status.DEADLINE, f"no reply from {self.role} before the deadline")
        except (OSError, ssl.SSLError, ProtocolError) as err:
            stream.close()
            self._fail_all(f"connection to {self.role} lost ({_describe(err)})")
            return self._failed(f"{self.role} is unavailable: {_describe(err)}")
        finally:
            self._pending.pop(request_id, None)
        try:
            reply = from_frame(frame)
            if isinstance(reply, (Infer, Describe, Signed)):
                raise ProtocolError(f"a {type(reply).__name__} is not a reply")
        except ProtocolError as err:
            logger.warning("%s sent a malformed reply: %s", self.role, err)
            return Failure(Status.INTERNAL, f"{self.role} sent a malformed reply")
        return reply

    def _unexpected(self, reply: Reply, what: str) -> Failure:
        logger.warning("%s answered %s with a %s", self.role, what, type(reply).__name__)
        return Failure(Status.INTERNAL, f"{self.role} answered {what} with the wrong reply")

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
                frame = await stream.read()
                future = self._pending.get(frame.request_id)
                if future is not None and not future.done():
                    future.set_result(frame)
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
                future.set_result(to_frame(request_id, self._failed(
                    f"{self.role} is unavailable: {reason}")))

    def _failed(self, message: str) -> Failure:
        """The reply to a request this link could not deliver or get answered."""
        return Failure(Status.UNAVAILABLE, message, failed_link=self.role)

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

    async def request(self, message: Infer, *, request_id: str | None = None,
                      follow: Follow | None = None) -> Outputs | Failure:
        tried: set[int] = set()
        while True:
            index = self._choose(tried)
            self._outstanding[index] += 1
            try:
                reply = await self.links[index].request(message, request_id=request_id,
                                                        follow=follow)
            finally:
                self._outstanding[index] -= 1
            if not isinstance(reply, Failure) or reply.status != Status.UNAVAILABLE:
                return reply
            if reply.failed_link == self.role:
                self._avoid_until[index] = time.monotonic() + REPLICA_BACKOFF_S
            tried.add(index)
            if len(tried) == len(self.links) or message.expired():
                return reply
            logger.info("%s replica %d unavailable; sending %s to another", self.role, index,
                        request_id or "the request")

    async def describe(self, message: Describe, *, request_id: str | None = None
                       ) -> Description | Failure:
        """Sends to every replica at once (each replica reports itself); the first
        description with every answering replica's reports, or the first failure when none
        answered."""
        base = request_id or f"{self.role}-all"
        replies = await asyncio.gather(*(
            link.describe(message, request_id=f"{base}.{index}")
            for index, link in enumerate(self.links)))
        answered = [r for r in replies if isinstance(r, Description)]
        if not answered:
            return replies[0]
        return dataclasses.replace(answered[0], stage_stats=tuple(
            report for r in answered for report in r.stage_stats))

    def _choose(self, tried: set[int]) -> int:
        now, turn = time.monotonic(), next(self._turn)
        candidates = [i for i in range(len(self.links)) if i not in tried]
        return min(candidates, key=lambda i: (self._avoid_until[i] > now,
                                              self._outstanding[i],
                                              (i - turn) % len(self.links)))

    async def close(self) -> None:
        for link in self.links:
            await link.close()


def replica_set(role: str, addresses: tuple[tuple[str, int], ...], context: ssl.SSLContext,
                *, manifest_digest: str) -> ReplicaSet:
    return ReplicaSet([Link(role, host, port, context, manifest_digest=manifest_digest)
                       for host, port in addresses])


def _send_after(stream: MessageStream, request_id: str,
                follow: Awaitable[StageReceipt]) -> None:
    """Writes the sender's receipt on ``stream`` once signed (if signing fails, the sender
    answers the failure itself; the next stage's wait for it ends at the batch's deadline)."""
    def write(signed: asyncio.Future[StageReceipt]) -> None:
        if signed.cancelled() or signed.exception() is not None or stream.is_closing():
            return
        with contextlib.suppress(OSError, ssl.SSLError, ConnectionError):
            stream.write(to_frame(request_id, Signed(signed.result())))

    asyncio.ensure_future(follow).add_done_callback(write)


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` on uvloop when it is installed (faster TLS streams), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
