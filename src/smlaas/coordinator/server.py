"""The coordinator's RA-TLS server: one framed request per connection, bounded in every way.

Connections are handled on an asyncio event loop (in a thread of its own, or the caller's):
a TLS handshake or a slow peer costs no thread, and each connection has a deadline for the
handshake and one for the whole exchange, so peers that open connections and trickle bytes
cannot hold the coordinator. At most ``max_connections`` are open at once, counted from
accept (before the handshake); more are closed at once, before any TLS, and their peers retry.
Requests are at most MAX_REQUEST_BYTES, so buffered requests stay under max_connections times
that. The work of a request (quote verification, signing) runs on a fixed pool of threads.
Every request that arrives gets a reply: a frame that does not parse is refused as
``malformed`` on its connection, never dropped. The RA-TLS certificate (quote and collateral)
is remade every IDENTITY_REFRESH_S, so that verifiers' collateral-age limits keep accepting
a long-running coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from smlaas.coordinator.owner import public_key_fingerprint
from smlaas.coordinator.protocol import COORDINATOR_ROLE, Code, Op
from smlaas.coordinator.service import LEASE_FIELD, CoordinatorService
from smlaas.coordinator.slots import LEASE_S, Lease
from smlaas.coordinator.state import SealedStateStore
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.ratls import RaTlsIdentity, create_identity, load_identity
from smlaas.enclave.verification import INTEL_ROOT
from smlaas.transport.framing import (
    ProtocolError,
    decode_frame_body,
    encode_frame,
    frame_length,
)

logger = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_S = 10.0
CONNECTION_DEADLINE_S = 20.0
WORKER_THREADS = 4
MAX_CONNECTIONS = 64
MAX_REQUEST_BYTES = 1024 * 1024
"""A manifest with collateral documents is the largest request (tens of KiB)."""
IDENTITY_REFRESH_S = 6 * 3600.0
"""The default policy accepts collateral up to 7 days old; fresh collateral is ~1 day old."""


class CoordinatorServer:
    """Serves :class:`CoordinatorService` over RA-TLS on ``host:port`` (0 = any free port).

    ``backend`` must measure ``owner_public_key`` (the CLI creates it from the coordinator's
    spec, :class:`smlaas.roles.CoordinatorSpec`); then whoever attests this coordinator
    knows which owner it obeys.
    """

    def __init__(self, backend: EnclaveBackend, state_path: Path, *, owner_public_key: str,
                 host: str = "127.0.0.1", port: int = 0,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        roots = [INTEL_ROOT, backend.trusted_root] if backend.simulated else [INTEL_ROOT]
        self.service = CoordinatorService(
            SealedStateStore(state_path, backend.sealing_key("coordinator-state")), roots,
            backend=backend, owner_public_key=owner_public_key)
        self._backend = backend
        self._context = self._fresh_identity().server_context()
        self._listener = socket.create_server((host, port), backlog=128)
        bound_host, bound_port = self._listener.getsockname()[:2]
        self._address = (str(bound_host), int(bound_port))
        self._max_connections = max_connections
        self._open = 0
        self._pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="coordinator")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        logger.info("coordinator for owner %s", public_key_fingerprint(owner_public_key))

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    def _fresh_identity(self) -> RaTlsIdentity:
        return create_identity(COORDINATOR_ROLE, self._backend.quote,
                               self._backend.collateral_json(), key=self.service.instance_key)

    async def _refresh_identity(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(IDENTITY_REFRESH_S)
            try:
                identity = await loop.run_in_executor(self._pool, self._fresh_identity)
                load_identity(self._context, identity.cert_pem().decode(), identity.key)
                logger.info("RA-TLS certificate renewed (fresh quote and collateral)")
            except Exception:  # keep serving with the old one; the next round retries
                logger.exception("could not renew the RA-TLS certificate")

    def start(self) -> CoordinatorServer:
        """Serves in a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name="coordinator")
        self._thread.start()
        self._ready.wait(timeout=10)
        return self

    def serve_forever(self) -> None:
        """Serves in this thread until :meth:`stop` (or KeyboardInterrupt)."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=self._listener)
        refresh = asyncio.create_task(self._refresh_identity())
        logger.info("coordinator listening on %s:%d", *self.address)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            refresh.cancel()
            server.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._open >= self._max_connections:
            logger.warning("closed a connection from %s: %d are open already", peer,
                           self._open)
            writer.close()
            return
        self._open += 1
        counted = True
        lease: Lease | None = None
        try:
            async with asyncio.timeout(CONNECTION_DEADLINE_S):
                await writer.start_tls(self._context,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
                reply = await self._answer(reader)
                lease = reply.pop(LEASE_FIELD, None)  # type: ignore[assignment]
                writer.write(encode_frame(reply))
                await writer.drain()
            if lease is not None:  # bounded by the manifest's slots, not max_connections
                self._open -= 1
                counted = False
                await self._hold(reader, writer, lease)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError,
                OSError) as err:
            logger.info("connection from %s ended without a reply: %s", peer,
                        str(err) or type(err).__name__)
        finally:
            if lease is not None:
                self.service.slots.free(lease)
            if counted:
                self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    lease: Lease) -> None:
        """Keeps a stage's registration connection as its lease (:mod:`slots`): a heartbeat
        at least every LEASE_S, answered until the lease is revoked; it ends (and the slot is
        freed by the caller) when the connection closes, stalls or sends anything else."""
        reason = "revoked"
        try:
            while not lease.revoked.is_set():
                async with asyncio.timeout(LEASE_S):
                    length = frame_length(await reader.readexactly(4), max_bytes=4096)
                    request = decode_frame_body(await reader.readexactly(length))
                if lease.revoked.is_set():
                    break
                if not isinstance(request, dict) or request.get("op") != Op.HEARTBEAT.value:
                    reason = "not a heartbeat"
                    writer.write(encode_frame({"ok": False, "code": Code.MALFORMED.value,
                                               "error": "only heartbeats on a lease"}))
                    await writer.drain()
                    return
                writer.write(encode_frame({"ok": True, "lease_s": LEASE_S}))
                await writer.drain()
            writer.write(encode_frame({"ok": False, "code": Code.SLOT_REVOKED.value,
                                       "error": "the manifest this lease was held under was "
                                                "replaced; stop serving"}))
            await writer.drain()
        except TimeoutError:
            reason = f"no heartbeat for {LEASE_S:g} s"
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError,
                ProtocolError) as err:
            reason = f"connection ended ({str(err) or type(err).__name__})"
        finally:
            logger.info("lease of %s slot %d ended: %s", lease.role, lease.slot, reason)

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, object]:
        try:
            length = frame_length(await reader.readexactly(4), max_bytes=MAX_REQUEST_BYTES)
            request = decode_frame_body(await reader.readexactly(length))
        except ProtocolError as err:
            return {"ok": False, "code": Code.MALFORMED.value,
                    "error": f"not a request frame: {err}"}
        future = self._pool.submit(self.service.handle, request)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The connection's deadline passed while the work ran: a lease it claimed would
            # never reach its connection, so it is freed as soon as the work ends.
            future.add_done_callback(self._free_orphan_lease)
            raise

    def _free_orphan_lease(self, future: Future[dict[str, object]]) -> None:
        if not future.cancelled() and future.exception() is None:
            lease = future.result().get(LEASE_FIELD)
            if isinstance(lease, Lease):
                self.service.slots.free(lease)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already stopped
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(timeout=CONNECTION_DEADLINE_S)
        self._listener.close()


_HANDED_OUT: set[int] = set()
LISTEN_PORTS_FLOOR = 20000
"""Above Ray's default worker ports (10002-19999), which a Ray node claims as a whole."""


def free_port() -> int:
    """A port to listen on: free now, not handed out before by this process, and outside the
    kernel's ephemeral range (``ip_local_port_range``) when there is room below it, so that
    no outgoing connection takes it between now and its listener's bind (port 0 picks from
    that range: a client's connection took a stage's port in a test run so)."""
    low = _ephemeral_floor()
    if low - LISTEN_PORTS_FLOOR >= 1000:
        for _ in range(200):
            port = random.randrange(LISTEN_PORTS_FLOOR, low)
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    """The lowest port the kernel gives outgoing connections (32768 when not known)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
