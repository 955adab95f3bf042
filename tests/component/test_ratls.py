"""RA-TLS over real sockets on 127.0.0.1 with the sim backend."""

from __future__ import annotations

import datetime as dt
import socket
import threading
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from smlaas.enclave import Policy
from smlaas.enclave.backends.sim import SimQuotingEnclave
from smlaas.enclave.measurement import measure
from smlaas.enclave.ratls import RaTlsIdentity, connect_attested, create_identity
from smlaas.enclave.sim_pki import SimulationPKI
from smlaas.errors import AttestationError, PolicyError

TIMEOUT_S = 10


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> SimQuotingEnclave:
    return SimQuotingEnclave(SimulationPKI.load_or_create(tmp_path_factory.mktemp("pki")))


def identity_for(enclave: SimQuotingEnclave, role: str, *, bind_other_key: bool = False
                 ) -> RaTlsIdentity:
    m = measure(role)

    def provider(report_data: bytes) -> bytes:
        data = b"\x01" * 32 if bind_other_key else report_data
        return enclave.quote(mrenclave=m.mrenclave, mrsigner=m.mrsigner, report_data=data)

    return create_identity("localhost", provider, enclave.pki.collateral().to_json())


def serve_once(identity: RaTlsIdentity, received: list[bytes]) -> tuple[int, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(TIMEOUT_S)
    context = identity.server_context()

    def run() -> None:
        with server:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                return
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(TIMEOUT_S)
                try:
                    data = tls.recv(100)
                except (OSError, TimeoutError):
                    return
                received.append(data)
                if data:
                    tls.sendall(b"pong")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def policy_for(role: str) -> Policy:
    return Policy.from_dict({"allow_simulation_insecure": True,
                             "roles": {role: {"mrenclave": [measure(role).mrenclave.hex()]}}})


@pytest.fixture
def roots(enclave: SimQuotingEnclave) -> Iterator[list]:
    yield [enclave.trusted_root]


def test_attested_connection_carries_data(enclave, roots) -> None:
    received: list[bytes] = []
    port, thread = serve_once(identity_for(enclave, "coordinator"), received)
    tls, verdict = connect_attested("127.0.0.1", port, policy_for("coordinator"), roots=roots,
                                    role="coordinator")
    with tls:
        tls.sendall(b"ping")
        assert tls.recv(4) == b"pong"
    thread.join(TIMEOUT_S)
    assert received == [b"ping"] and verdict.simulated


def test_wrong_measurement_is_refused_before_any_data(enclave, roots) -> None:
    received: list[bytes] = []
    port, thread = serve_once(identity_for(enclave, "impostor"), received)
    with pytest.raises(PolicyError, match="^measurement:"):
        connect_attested("127.0.0.1", port, policy_for("coordinator"), roots=roots,
                         role="coordinator")
    thread.join(TIMEOUT_S)
    assert received in ([], [b""])  # the server saw the connection close, never data


def test_quote_bound_to_another_key_is_refused(enclave, roots) -> None:
    received: list[bytes] = []
    port, thread = serve_once(identity_for(enclave, "coordinator", bind_other_key=True),
                              received)
    with pytest.raises(PolicyError, match="^report_data:"):
        connect_attested("127.0.0.1", port, policy_for("coordinator"), roots=roots,
                         role="coordinator")
    thread.join(TIMEOUT_S)
    assert received in ([], [b""])


def test_default_policy_refuses_a_simulated_peer(enclave, roots) -> None:
    received: list[bytes] = []
    port, thread = serve_once(identity_for(enclave, "coordinator"), received)
    with pytest.raises(PolicyError, match="SIMULATION"):
        connect_attested("127.0.0.1", port, Policy(), roots=roots)
    thread.join(TIMEOUT_S)


def test_plain_tls_server_is_not_ra_tls(enclave, roots) -> None:
    plain = identity_for(enclave, "coordinator")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(plain.key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
            .sign(plain.key, hashes.SHA256()))
    received: list[bytes] = []
    port, thread = serve_once(RaTlsIdentity(plain.key, cert), received)
    with pytest.raises(AttestationError, match="not an RA-TLS certificate"):
        connect_attested("127.0.0.1", port, policy_for("coordinator"), roots=roots)
    thread.join(TIMEOUT_S)
