"""The request bodies the REST front end reads, bounded in bytes: each body (``read_body``), and
those read at once, in all and per source address (``BodyBudget``, pure bookkeeping on one
event loop: no sockets).

Each request's body limit follows from the model (``RequestLimits``), but nothing bounded how
many bodies were read at once: 200 ResNet requests sent at once had their 600 KB bodies read
side by side (issue 18). A request now reserves its declared size (or the model's limit when
it declares none) before its body is read, and gives it back once the body is decoded (its
tensors then wait in the batch queue, which is bounded apart). A request that does not fit
waits for room; a body larger than the whole budget is read alone. No source may hold more
than its share, so a client that trickles its bodies cannot keep the others waiting.

Below this, each TLS connection that received a large body keeps about half a megabyte of
buffers (uvloop's and OpenSSL's; a bare TLS server grew by 112 MiB for 200 connections that
each sent 600 KB) until it closes; the per-source connection bound of
:mod:`~smlaas.serving.http_limits` bounds that per client address.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from smlaas.errors import BadRequest, ClientGone

REQUEST_BODY_BUDGET_BYTES = 32 * 1024 * 1024
"""Bytes of request bodies read at once (about 50 ResNet-sized images)."""
SOURCE_SHARE = 4
"""A source address may hold 1/SOURCE_SHARE of the budget (as of the connections)."""


class BodyBudget:
    """See the module doc; use :meth:`reserve` around reading and decoding a body."""

    def __init__(self, total_bytes: int = REQUEST_BODY_BUDGET_BYTES, *,
                 per_source_bytes: int | None = None) -> None:
        if total_bytes < 1:
            raise ValueError(f"a body budget must be at least 1 byte, got {total_bytes}")
        self.total_bytes = total_bytes
        self.per_source_bytes = per_source_bytes or max(1, total_bytes // SOURCE_SHARE)
        self.held_bytes = 0
        self._by_source: dict[str, int] = {}
        self._waiters: list[asyncio.Future[None]] = []

    def fits(self, source: str, size: int) -> bool:
        """Whether ``size`` bytes from ``source`` can be read now (one body alone always
        can, in all and for its source)."""
        held_by_source = self._by_source.get(source, 0)
        return ((self.held_bytes == 0 or self.held_bytes + size <= self.total_bytes)
                and (held_by_source == 0 or held_by_source + size <= self.per_source_bytes))

    @contextlib.asynccontextmanager
    async def reserve(self, source: str, size: int, *, timeout_s: float | None = None
                      ) -> AsyncIterator[None]:
        """Holds ``size`` bytes (at most the whole budget) for ``source`` while the body is
        read and decoded, after waiting for room (TimeoutError after ``timeout_s``)."""
        size = max(0, min(size, self.total_bytes))
        loop = asyncio.get_running_loop()
        end = None if timeout_s is None else loop.time() + timeout_s
        while not self.fits(source, size):
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, None if end is None else end - loop.time())
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.held_bytes += size
        self._by_source[source] = self._by_source.get(source, 0) + size
        try:
            yield
        finally:
            self._release(source, size)

    def _release(self, source: str, size: int) -> None:
        self.held_bytes -= size
        left = self._by_source[source] - size
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]
        for waiter in self._waiters:  # each looks again whether it fits
            if not waiter.done():
                waiter.set_result(None)


async def read_body(request: Request, limit: int, *, what: str) -> bytearray:
    """The body, refused from Content-Length (or as soon as it passes ``limit``: the bytes
    ``what`` can take) with BadRequest; ClientGone if the client disconnects meanwhile."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes exceeds the {limit} bytes "
                         f"{what} can take")
    body = bytearray()  # one buffer, not chunks and their join
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise BadRequest(f"request body exceeds the {limit} bytes {what} can take")
            body += chunk
    except ClientDisconnect:
        raise ClientGone("the client disconnected while sending its body") from None
    return body
