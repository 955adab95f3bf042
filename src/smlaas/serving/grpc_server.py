"""The gateway's gRPC server, whose message and call limits are the model's.

gRPC fixes ``max_receive_message_length`` and ``maximum_concurrent_rpcs`` when a server is
created, but the gateway learns its model's inputs only once the pipeline first describes
them, after the gateway starts. So :class:`GrpcServer` listens at once with
:data:`~smlaas.serving.grpc_limits.BOOTSTRAP_LIMITS` (health and metadata work, and no
inference can run before the model is described), and as soon as the data plane knows the
model it starts a second server with the model's limits on the same address (gRPC binds with
``SO_REUSEPORT``) and stops the first: connections move to the new server on their next call
(gRPC's GOAWAY), calls already running finish within :data:`HANDOVER_GRACE_S`. A call sent
on an old connection in the very milliseconds of the handover can fail once with
``UNAVAILABLE`` (gRPC retries it by itself when it is small), as at any server restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from smlaas.serving.grpc_limits import BOOTSTRAP_LIMITS, GrpcLimits

logger = logging.getLogger(__name__)
SIZE_POLL_S = 0.1
"""How often the server looks whether the model's limits are known yet (a local check)."""
HANDOVER_GRACE_S = 30.0
"""What calls running on the first server get to finish once the sized server took over."""


class GrpcServer:
    """A TLS gRPC server on ``address`` serving ``handler`` (start with :meth:`start`)."""

    def __init__(self, handler: grpc.GenericRpcHandler | tuple[grpc.GenericRpcHandler, ...],
                 *, address: str,
                 credentials: grpc.ServerCredentials,
                 model_limits: Callable[[], GrpcLimits | None],
                 on_limits: Callable[[GrpcLimits], None] = lambda limits: None) -> None:
        self.address = address
        self.limits = BOOTSTRAP_LIMITS
        self._handler, self._credentials = handler, credentials
        self._model_limits, self._on_limits = model_limits, on_limits
        self._servers: list[grpc.aio.Server] = []
        self._sizing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listens with the model's limits if they are known, else with the bootstrap ones
        until they are."""
        limits = self._model_limits()
        await self._listen(limits or BOOTSTRAP_LIMITS)
        if limits is None:
            self._sizing = asyncio.create_task(self._size_when_known())
        else:
            self._on_limits(limits)

    async def stop(self, grace: float | None = None) -> None:
        if self._sizing is not None:
            self._sizing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sizing
        await asyncio.gather(*(server.stop(grace) for server in self._servers))
        self._servers.clear()

    async def _listen(self, limits: GrpcLimits) -> grpc.aio.Server:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limits.max_receive_bytes),
            ("grpc.max_send_message_length", limits.max_send_bytes),
            ("grpc.so_reuseport", 1), ("grpc.http2.bdp_probe", 0)],
            maximum_concurrent_rpcs=limits.max_rpcs)
        server.add_generic_rpc_handlers(
            self._handler if isinstance(self._handler, tuple) else (self._handler,))
        server.add_secure_port(self.address, self._credentials)
        await server.start()
        self._servers.append(server)
        self.limits = limits
        return server

    async def _size_when_known(self) -> None:
        while (limits := self._model_limits()) is None:
            await asyncio.sleep(SIZE_POLL_S)
        self._on_limits(limits)
        bootstrap = self._servers[-1]
        try:
            await self._listen(limits)
        except RuntimeError as err:  # the address could not be bound again
            logger.error("gRPC keeps its bootstrap limits (%s): cannot listen on %s again: "
                         "%s", BOOTSTRAP_LIMITS.describe(), self.address, err)
            return
        logger.info("gRPC on %s now admits %s", self.address, limits.describe())
        await bootstrap.stop(HANDOVER_GRACE_S)
        self._servers.remove(bootstrap)
        logger.debug("the bootstrap gRPC server on %s has stopped", self.address)
