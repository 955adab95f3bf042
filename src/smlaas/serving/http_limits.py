"""Deadlines on the HTTP layer that uvicorn does not have: a request's headers must arrive
within HEADER_TIMEOUT_S of its first byte (or of the connection), and its body within
BODY_TIMEOUT_S of its headers; otherwise the connection is closed. With uvicorn's own
``timeout_keep_alive`` (idle connections) and ``limit_concurrency`` (503 beyond it), no client
can hold a connection open without sending a request at a useful rate (slowloris), nor make
the gateway wait forever on a Content-Length larger than the body it sends.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 256


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines (see the module doc)."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s, "headers")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
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


def deadline_protocol(*, header_timeout_s: float, body_timeout_s: float
                      ) -> type[DeadlineHttpProtocol]:
    """The protocol class for uvicorn's ``http=`` with these deadlines."""
    return type("DeadlineHttpProtocol", (DeadlineHttpProtocol,),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})
