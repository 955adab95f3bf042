"""A hop: how a role sends its requests to the next one, over the network or in memory.

The gateway's data plane and every stage but the last hold one :class:`Hop` to the next role.
Over the network it is a :class:`~smlaas.serving.link.Link` or a
:class:`~smlaas.serving.link.ReplicaSet` (mutual TLS, many requests in flight). In memory it
is a :class:`LocalHop` that calls the next role's :meth:`Stage.handle` directly, so that the
gateway, its data plane, the batcher and real stage workers run in one process (component
tests), with the same typed messages and the same deadlines.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Protocol

from smlaas.errors import Status
from smlaas.receipts.claims import StageReceipt
from smlaas.serving.protocol import Describe, Description, Failure, Infer, Outputs, Reply, Request

Follow = Callable[[], Awaitable[StageReceipt]]


class Hop(Protocol):
    """What a role sends its requests to; every reply comes by the request's deadline."""

    role: str

    async def request(self, message: Infer, *, request_id: str | None = None,
                      follow: Follow | None = None) -> Outputs | Failure:
        """``follow``: called once ``message`` is written, the sender's receipt for the
        batch, sent after it when it is ready (the next stage awaits it only to sign its
        own)."""
        ...

    async def describe(self, message: Describe, *, request_id: str | None = None
                       ) -> Description | Failure: ...

    async def close(self) -> None: ...


class Stage(Protocol):
    """A role that answers requests (a stage worker)."""

    async def handle(self, request_id: str, message: Request,
                     previous: Awaitable[StageReceipt] | None = None) -> Reply: ...


class LocalHop:
    """A :class:`Hop` to ``stage`` in this process."""

    def __init__(self, role: str, stage: Stage) -> None:
        self.role = role
        self._stage = stage
        self._ids = itertools.count()

    async def request(self, message: Infer, *, request_id: str | None = None,
                      follow: Follow | None = None) -> Outputs | Failure:
        reply = await self._call(message, request_id, None if follow is None else follow())
        assert isinstance(reply, (Outputs, Failure)), reply
        return reply

    async def describe(self, message: Describe, *, request_id: str | None = None
                       ) -> Description | Failure:
        reply = await self._call(message, request_id)
        assert isinstance(reply, (Description, Failure)), reply
        return reply

    async def _call(self, message: Request, request_id: str | None,
                    follow: Awaitable[StageReceipt] | None = None) -> Reply:
        request_id = request_id or f"{self.role}-{next(self._ids)}"
        try:
            return await asyncio.wait_for(self._stage.handle(request_id, message, follow),
                                          message.remaining_s())
        except TimeoutError:
            return Failure(Status.DEADLINE, f"no reply from {self.role} before the deadline")

    async def close(self) -> None:
        pass
