"""Limits on the HTTP layer that uvicorn does not have.

Deadlines: a request's headers must arrive within HEADER_TIMEOUT_S of its first byte (or of
the connection), and its body within BODY_TIMEOUT_S of its headers; otherwise the connection
is closed. With uvicorn's own ``timeout_keep_alive`` (idle connections), no client can hold a
connection open without sending a request at a useful rate (slowloris), nor make the gateway
wait forever on a Content-Length larger than the body it sends.

Connections (see :class:`ConnectionLedger`): uvicorn answers 503 once its *connections* reach
``limit_concurrency``, so 300 connections that send headers slowly and are renewed before their
deadline held the gateway's cap, and every legitimate request got 503 (issue 18). Here
``limit_concurrency`` bounds the requests in progress only (headers complete, response not yet
sent); open connections are bounded apart, per source address and in all, and a new
connection past either bound takes the place of a waiting one (no request in progress) of
its own source, or of the source holding the most; one that never completed a request goes
first, so renewed connections displace their own kind before anyone's idle keep-alive. A
request whose body trickles holds its place until the body deadline: one source can hold at
most MAX_CONNECTIONS_PER_SOURCE of them, a quarter of the requests in progress.

Each request's ASGI scope carries ``scope["extensions"]["smlaas.connection"]["gone"]``, a
function that says synchronously whether its connection has been lost (the data plane drops
such a request before it is batched or sent to a stage).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 256
"""Requests in progress at once (uvicorn's ``limit_concurrency``, applied to requests only);
one more is answered 503."""
MAX_OPEN_CONNECTIONS = 1024
"""Open connections at once, whatever they do (each holds a socket and TLS buffers)."""
MAX_CONNECTIONS_PER_SOURCE = 64
"""Open connections from one source address: a quarter of MAX_CONNECTIONS, so that one source
can never hold more than a quarter of the requests in progress either."""
CONNECTION_EXTENSION = "smlaas.connection"
"""The key of this server's ASGI scope extension (see the module doc)."""


class Tracked(Protocol):
    """A connection as the ledger sees it."""

    @property
    def source(self) -> str: ...

    @property
    def waiting(self) -> bool:
        """No request in progress: idle, or still sending a request's headers."""

    @property
    def served(self) -> int:
        """Responses completed on it."""

    def evict(self) -> None:
        """Closes it to make room for another."""


class ConnectionLedger:
    """The open connections of one server by source address, oldest first, bounded in all
    (``max_open``) and per source (``max_per_source``). Pure bookkeeping: it closes a
    connection only through its ``evict``."""

    def __init__(self, *, max_open: int = MAX_OPEN_CONNECTIONS,
                 max_per_source: int = MAX_CONNECTIONS_PER_SOURCE) -> None:
        if max_open < 1 or max_per_source < 1:
            raise ValueError(f"connection limits must be at least 1, got max_open={max_open}, "
                             f"max_per_source={max_per_source}")
        self.max_open = max_open
        self.max_per_source = max_per_source
        self._by_source: dict[str, dict[Tracked, None]] = {}
        self.open = 0
        self.evicted = 0
        """Connections closed to make room for a newer one."""
        self.refused = 0
        """New connections closed at once: no room, and none waiting to make room."""

    def held_by(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def admit(self, connection: Tracked) -> bool:
        """Counts ``connection`` in, first evicting a waiting one when a bound is reached;
        False (not counted) when there is no room and nothing to evict."""
        room = (self.held_by(connection.source) < self.max_per_source
                or self._evict_from(connection.source))
        room = room and (self.open < self.max_open or self._evict_from_largest())
        if not room:
            self.refused += 1
            return False
        self._by_source.setdefault(connection.source, {})[connection] = None
        self.open += 1
        return True

    def release(self, connection: Tracked) -> None:
        """Counts ``connection`` out (closed, or evicted); a no-op when it is not counted."""
        held = self._by_source.get(connection.source)
        if held is None or connection not in held:
            return
        del held[connection]
        self.open -= 1
        if not held:
            del self._by_source[connection.source]

    def _evict_from(self, source: str) -> bool:
        """Evicts ``source``'s oldest waiting connection that never completed a request, else
        its oldest idle one; False when all of its connections are busy."""
        held = self._by_source.get(source, {})
        waiting = [c for c in held if c.waiting]
        victim = next((c for c in waiting if not c.served), waiting[0] if waiting else None)
        if victim is None:
            return False
        self.release(victim)
        self.evicted += 1
        victim.evict()
        return True

    def _evict_from_largest(self) -> bool:
        by_size = sorted(self._by_source, key=lambda s: len(self._by_source[s]), reverse=True)
        return any(self._evict_from(source) for source in by_size)


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines, a request cap that only
    requests count against, and per-source connection bounds (see the module doc)."""

    header_timeout_s: ClassVar[float] = HEADER_TIMEOUT_S
    body_timeout_s: ClassVar[float] = BODY_TIMEOUT_S
    ledger: ClassVar[ConnectionLedger | None] = None
    """Shared by one server's connections (:func:`deadline_protocol` makes one per server);
    None: connections are not bounded apart from requests."""
    _deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn refuses a request when its connections *or* its requests in progress reach
        # limit_concurrency; only requests count here, so its check is switched on (0) or off
        # (None) per request in on_headers_complete.
        self.max_requests: int | None = self.limit_concurrency
        self.limit_concurrency = None
        self.served = 0
        self._lost = False

    @property
    def source(self) -> str:
        return self.client[0] if self.client else "unknown"

    @property
    def waiting(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.pipeline

    def gone(self) -> bool:
        """Whether the connection has been lost (the client has gone)."""
        return self._lost

    def evict(self) -> None:
        """Aborts the connection: a TLS goodbye would keep it, and its buffers (about half a
        megabyte after a large request), until the client answered or 30 s passed."""
        self._disarm()
        logger.debug("closed a %s connection from %s to make room for another",
                     "idle" if self.served else "new", self.client)
        self.transport.abort()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.ledger is not None and not self.ledger.admit(self):
            logger.debug("refused a connection from %s: no room (%d open)", self.client,
                         self.ledger.open)
            transport.abort()
            return
        self._arm(self.header_timeout_s, "headers")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s, "body")
        self.scope.setdefault("extensions", {})[CONNECTION_EXTENSION] = {"gone": self.gone}
        busy = self.max_requests is not None and len(self.tasks) >= self.max_requests
        self.limit_concurrency = 0 if busy else None
        try:
            super().on_headers_complete()
        finally:
            self.limit_concurrency = None

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.served += 1
        if self.cycle is not None:  # body bytes that came before an early answer (a 503
            self.cycle.body = bytearray()  # before the body was read): uvicorn keeps them
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._disarm()
        if self.ledger is not None:
            self.ledger.release(self)
        super().connection_lost(exc)

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, what: str, seconds: float) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.debug("closed a connection from %s: no complete %s within %g s",
                         self.client, what, seconds)
            self.transport.close()


def deadline_protocol(*, header_timeout_s: float, body_timeout_s: float,
                      max_open_connections: int = MAX_OPEN_CONNECTIONS,
                      max_connections_per_source: int = MAX_CONNECTIONS_PER_SOURCE
                      ) -> type[DeadlineHttpProtocol]:
    """The protocol class for uvicorn's ``http=``, with these deadlines and connection bounds
    (one ledger per class: call it once per server)."""
    ledger = ConnectionLedger(max_open=max_open_connections,
                              max_per_source=max_connections_per_source)
    return type("DeadlineHttpProtocol", (DeadlineHttpProtocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
                 "ledger": ledger})
