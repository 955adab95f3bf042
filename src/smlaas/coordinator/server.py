"""The coordinator's RA-TLS server: one framed request per connection, bounded waits."""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from pathlib import Path

from smlaas.coordinator.service import CoordinatorService
from smlaas.coordinator.state import SealedStateStore
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.ratls import create_identity
from smlaas.enclave.verification import INTEL_ROOT
from smlaas.transport.framing import ProtocolError, recv_message, send_message

logger = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 10.0


class CoordinatorServer:
    """Serves :class:`CoordinatorService` over RA-TLS on ``host:port`` (0 = any free port)."""

    def __init__(self, backend: EnclaveBackend, state_path: Path, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        roots = [INTEL_ROOT, backend.trusted_root] if backend.simulated else [INTEL_ROOT]
        self.service = CoordinatorService(
            SealedStateStore(state_path, backend.sealing_key("coordinator-state")), roots)
        identity = create_identity("coordinator", backend.quote, backend.collateral_json())
        context = identity.server_context()
        service = self.service

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(REQUEST_TIMEOUT_S)
                try:
                    with context.wrap_socket(self.request, server_side=True) as tls:
                        request = recv_message(tls)
                        send_message(tls, service.handle(request))
                except (ssl.SSLError, ProtocolError, OSError, TimeoutError) as err:
                    logger.info("connection from %s dropped: %s", self.client_address[0], err)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server((host, port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> CoordinatorServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="coordinator")
        self._thread.start()
        logger.info("coordinator listening on %s:%d", *self.address)
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=REQUEST_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
