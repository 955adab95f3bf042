"""The ``smlaas gateway`` process: enrol as role ``gateway``, prepare attestation evidence
for its HTTPS key, and serve the app under uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.client import CoordinatorClient, coordinator_policy
from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_role
from smlaas.coordinator.release import SignedRelease
from smlaas.enclave.attestation import RefreshedEvidence
from smlaas.enclave.backends import create_backend
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.keys import spki_sha256
from smlaas.enclave.verification import INTEL_ROOT
from smlaas.errors import ConfigError, ProtocolError, SmlaasError
from smlaas.receipts.claims import GatewaySigner
from smlaas.receipts.cose import ReceiptKey
from smlaas.receipts.evidence import KeyEvidenceSource
from smlaas.roles import GatewaySpec
from smlaas.serving.data_plane import DataPlane
from smlaas.serving.enrol import check_replica_count, enrol
from smlaas.serving.gateway import GatewaySettings, create_app
from smlaas.serving.gateway_receipts import GatewayReceipts
from smlaas.serving.http_limits import KEEP_ALIVE_S, MAX_CONNECTIONS, deadline_protocol
from smlaas.serving.link import replica_set, run_event_loop
from smlaas.transport.tls import client_context

logger = logging.getLogger(__name__)
WILDCARDS = {"0.0.0.0", "::", ""}
# The default policy accepts collateral up to 7 days old; sim and PCCS collateral is about a
# day old when fetched.
RELEASE_POLL_S = 30.0
"""How often the gateway asks the coordinator for the owner's latest release (a refreshed
release reaches clients within this; releases live for hours)."""
RELEASE_RETRY_S = 1.0
"""... and how often while it has none yet."""


def attestation_evidence(backend: EnclaveBackend, key: ec.EllipticCurvePrivateKey,
                         certificate_pem: str, ca_pem: str, manifest_digest: str
                         ) -> dict[str, Any]:
    """The gateway's quote, whose report_data is SHA-256 of its HTTPS key (SPKI DER); the
    certificate carries the manifest digest it was admitted under."""
    report_data = spki_sha256(key.public_key())
    return {"role": GATEWAY_ROLE, "simulated": backend.simulated,
            "quote": base64.b64encode(backend.quote(report_data)).decode(),
            "collateral": backend.collateral_json(), "certificate": certificate_pem,
            "ca": ca_pem, "manifest_digest": manifest_digest, "report_data": report_data.hex(),
            "binding": "report_data = SHA-256(SubjectPublicKeyInfo DER of the certificate)"}


class ReleaseWatcher:
    """The owner's latest release as the coordinator holds it, fetched over RA-TLS in a
    daemon thread (every RELEASE_POLL_S; every RELEASE_RETRY_S while there is none). The
    gateway staples it to its evidence as it is: clients verify it (owner signature, expiry,
    this gateway's manifest, version), so the gateway need not."""

    def __init__(self, fetch: Callable[[], SignedRelease | None],
                 first: SignedRelease | None) -> None:
        self._fetch, self._current = fetch, first
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="release-watch").start()

    def current(self) -> dict[str, str] | None:
        release = self._current
        return release.to_dict() if release is not None else None

    def _run(self) -> None:
        while not self._stop.wait(RELEASE_POLL_S if self._current else RELEASE_RETRY_S):
            try:
                fetched = self._fetch()
            except (SmlaasError, OSError, ProtocolError) as err:
                logger.info("could not fetch the owner's release: %s", err)
                continue
            if fetched is not None and fetched != self._current:
                logger.info("stapling the owner's %s", fetched.release.describe())
                self._current = fetched

    def stop(self) -> None:
        self._stop.set()


def read_labels(path: str, expected_sha256: str) -> tuple[str, ...] | None:
    """The class labels, only from the file the owner's manifest commits to."""
    if not expected_sha256:
        if path:
            raise ConfigError(f"--labels {path} was given, but the manifest names no labels "
                              f"file (deploy with --labels)")
        return None
    if not path:
        raise ConfigError("the manifest names a labels file; give it with --labels")
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the labels file {path}: {err}") from err
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ConfigError(f"the labels file {path} has SHA-256 {actual[:16]}..., the manifest "
                          f"names {expected_sha256[:16]}... (changed by the host?)")
    return tuple(data.decode("utf-8").splitlines())


def certificate_hosts(listen_host: str) -> list[str]:
    """Names the gateway's certificate carries: the address it listens on and loopback; for a
    wildcard address also this machine's host names and addresses."""
    hosts = {listen_host, "localhost", "127.0.0.1"}
    if listen_host in WILDCARDS:
        name = socket.gethostname()
        hosts |= {name, socket.getfqdn()}
        with contextlib.suppress(OSError):
            hosts |= set(socket.gethostbyname_ex(name)[2])
    return sorted(hosts - WILDCARDS)


def check_port_free(host: str, port: int, *, flag: str) -> None:
    """ConfigError in one line if ``host:port`` cannot be bound (checked before registering,
    so a port in use fails at once rather than after the enclave's whole start)."""
    bind_host = "" if host in WILDCARDS else host
    with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind_host, port))
        except OSError as err:
            raise ConfigError(f"the gateway cannot listen on {host}:{port} ({err.strerror}): "
                              f"another process holds it; choose another {flag}") from None


def run_gateway(spec: GatewaySpec) -> None:
    listen = spec.listen
    check_port_free(listen[0], listen[1], flag="--port")
    if spec.grpc_port:
        check_port_free(listen[0], spec.grpc_port, flag="--grpc-port")
    enclave = create_backend(spec.backend, GATEWAY_ROLE, spec.measured_config())
    registration = enrol(spec.coordinator, role=GATEWAY_ROLE, backend=enclave,
                         coordinator_mrenclave=spec.coordinator_mrenclave,
                         hosts=certificate_hosts(listen[0]))
    roots = [INTEL_ROOT, enclave.trusted_root] if enclave.simulated else [INTEL_ROOT]
    coordinator = CoordinatorClient(*spec.coordinator, roots=roots, policy=coordinator_policy(
        spec.coordinator_mrenclave, simulated=enclave.simulated))
    releases = ReleaseWatcher(coordinator.release, registration.release)
    attested_at = time.time()
    check_replica_count(spec.first_stages, stage_role(0), registration.replicas_of(0))
    identity = (registration.certificate_pem, registration.key, registration.ca_pem)
    link = replica_set(stage_role(0), spec.first_stages, client_context(*identity),
                       manifest_digest=registration.manifest_digest)
    max_batch = min(spec.max_batch_size, registration.max_batch_size)
    if max_batch < spec.max_batch_size:
        logger.warning("--max-batch-size %d lowered to the manifest's %d", spec.max_batch_size,
                       max_batch)
    settings = GatewaySettings(
        model_name=spec.model_name, max_batch_size=max_batch,
        labels=read_labels(spec.labels_path, registration.labels_sha256),
        max_queue_delay_us=spec.max_queue_delay_us, max_inflight=spec.max_inflight,
        request_timeout_s=spec.request_timeout_s, max_queue=spec.max_queue,
        max_sequences_per_client=spec.max_sequences_per_client,
        stage_count=sum(1 for role in registration.topology if role != GATEWAY_ROLE))
    quoted = RefreshedEvidence(lambda: attestation_evidence(
        enclave, registration.key, registration.certificate_pem, registration.ca_pem,
        registration.manifest_digest))
    receipt_key = ReceiptKey()  # made in the enclave; its quote binds it to the gateway role
    receipts = GatewayReceipts(
        GatewaySigner(receipt_key, registration.manifest_digest,
                      registration.release.release.version if registration.release else 0,
                      spec.model_name),
        KeyEvidenceSource(enclave, receipt_key, role=GATEWAY_ROLE, replica=0,
                          manifest_digest=registration.manifest_digest),
        registration.manifest_json, releases.current)
    plane = DataPlane(settings, link, evidence=lambda: {**quoted(),
                                                        "release": releases.current()},
                      attested_at=attested_at, receipts=receipts)
    app = create_app(settings, link, plane=plane)
    key_pem = registration.key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
    # uvicorn reads the key from a file: write it to a private directory, load the TLS
    # context, remove it (inside an enclave this directory is Gramine's in-memory tmpfs).
    with tempfile.TemporaryDirectory(prefix="smlaas-gateway-") as private:
        os.chmod(private, 0o700)
        cert_file, key_file = Path(private) / "cert.pem", Path(private) / "key.pem"
        cert_file.write_text(registration.certificate_pem + registration.ca_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(key_pem)
        config = uvicorn.Config(app, host=listen[0], port=listen[1], log_level="warning",
                                ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
                                access_log=False, timeout_graceful_shutdown=3,
                                http=deadline_protocol(
                                    max_open_connections=spec.max_open_connections,
                                    max_connections_per_source=spec.max_connections_per_source,
                                    header_timeout_s=spec.header_timeout_s,
                                    body_timeout_s=spec.body_timeout_s),
                                limit_concurrency=MAX_CONNECTIONS,
                                timeout_keep_alive=KEEP_ALIVE_S)
        config.load()
    logger.info("gateway serving %s on https://%s:%d", settings.model_name, *listen)
    chain = (registration.certificate_pem + registration.ca_pem).encode()
    run_event_loop(_serve(uvicorn.Server(config), plane, spec, chain, key_pem))


async def _serve(http: uvicorn.Server, plane: DataPlane, spec: GatewaySpec, chain: bytes,
                 key_pem: bytes) -> None:
    """REST (uvicorn handles SIGINT/SIGTERM) and, with a gRPC port, gRPC beside it."""
    grpc_server = None
    if spec.grpc_port:
        from smlaas.serving.grpc_gateway import create_grpc_server

        grpc_server = create_grpc_server(plane, host=spec.listen[0], port=spec.grpc_port,
                                         certificate_chain_pem=chain, key_pem=key_pem)
        await grpc_server.start()
        logger.info("gateway serving gRPC on %s:%d", spec.listen[0], spec.grpc_port)
    try:
        await http.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
