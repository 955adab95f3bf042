"""The coordinator's RA-TLS server: one framed request per connection, bounded in every way.

Connections are served by a fixed pool of threads; at most ``max_connections`` are held at
once (more are closed at once, before any handshake: the peer retries). Each read has a
deadline, and each connection as a whole (handshake, request, reply) has one too, so a peer
that trickles bytes cannot hold a thread. Every request gets a reply: a frame that does not
parse is refused as ``malformed`` on the same connection, not dropped.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smlaas.coordinator.owner import public_key_fingerprint
from smlaas.coordinator.protocol import COORDINATOR_ROLE, Code
from smlaas.coordinator.service import CoordinatorService
from smlaas.coordinator.state import SealedStateStore
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.ratls import create_identity
from smlaas.enclave.verification import INTEL_ROOT
from smlaas.transport.framing import ProtocolError, recv_message, send_message

logger = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 10.0
CONNECTION_DEADLINE_S = 20.0
WORKER_THREADS = 8
MAX_CONNECTIONS = 64


class CoordinatorServer:
    """Serves :class:`CoordinatorService` over RA-TLS on ``host:port`` (0 = any free port).

    ``backend`` must measure ``owner_public_key`` (the CLI creates it from the coordinator's
    spec, :class:`smlaas.deploy.roles.CoordinatorSpec`); then whoever attests this coordinator
    knows which owner it obeys.
    """

    def __init__(self, backend: EnclaveBackend, state_path: Path, *, owner_public_key: str,
                 host: str = "127.0.0.1", port: int = 0,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        roots = [INTEL_ROOT, backend.trusted_root] if backend.simulated else [INTEL_ROOT]
        self.service = CoordinatorService(
            SealedStateStore(state_path, backend.sealing_key("coordinator-state")), roots,
            backend=backend, owner_public_key=owner_public_key)
        identity = create_identity(COORDINATOR_ROLE, backend.quote, backend.collateral_json(),
                                   key=self.service.instance_key)
        self._context = identity.server_context()
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self._listener.settimeout(0.5)  # how often the accept loop looks at _stopping
        bound_host, bound_port = self._listener.getsockname()[:2]
        self._address = (str(bound_host), int(bound_port))
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="coordinator")
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        logger.info("coordinator for owner %s", public_key_fingerprint(owner_public_key))

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def start(self) -> CoordinatorServer:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name="coordinator-accept")
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        logger.info("coordinator listening on %s:%d", *self.address)
        while not self._stopping.is_set():
            try:
                connection, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            connection.settimeout(REQUEST_TIMEOUT_S)
            if not self._slots.acquire(blocking=False):
                self._pool.submit(self._refuse_busy, connection)
                continue
            self._pool.submit(self._serve, connection, peer[0])

    def _serve(self, connection: socket.socket, peer: str) -> None:
        deadline = threading.Timer(CONNECTION_DEADLINE_S, _shut_down, (connection,))
        deadline.start()
        try:
            with self._context.wrap_socket(connection, server_side=True) as tls:
                try:
                    request = recv_message(tls)
                except ProtocolError as err:
                    send_message(tls, {"ok": False, "code": Code.MALFORMED.value,
                                       "error": f"not a request frame: {err}"})
                    return
                send_message(tls, self.service.handle(request))
        except (ssl.SSLError, ProtocolError, OSError) as err:
            logger.info("connection from %s dropped: %s", peer, err)
        finally:
            deadline.cancel()
            self._slots.release()
            connection.close()

    @staticmethod
    def _refuse_busy(connection: socket.socket) -> None:
        logger.warning("closed a connection: %d connections are being served already",
                       MAX_CONNECTIONS)
        connection.close()

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        if self._thread:
            self._thread.join(timeout=REQUEST_TIMEOUT_S)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _shut_down(connection: socket.socket) -> None:
    """Ends a connection past its deadline (shutdown wakes a thread blocked reading it)."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

