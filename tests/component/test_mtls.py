"""Mutual TLS between roles under the deployment CA, over 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.ca import DeploymentCA
from smlaas.transport.tls import client_context, peer_role, server_context

TIMEOUT_S = 10


def role_identity(ca: DeploymentCA, role: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(role, key.public_key())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key


def serve(context: ssl.SSLContext, seen: list) -> tuple[int, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(TIMEOUT_S)

    def run() -> None:
        with server:
            try:
                conn, _ = server.accept()
                conn.settimeout(TIMEOUT_S)
                with context.wrap_socket(conn, server_side=True) as tls:
                    seen.append(peer_role(tls))
                    tls.sendall(tls.recv(4))
            except (OSError, ssl.SSLError) as err:
                seen.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def dial(port: int, context: ssl.SSLContext, role: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw, \
            context.wrap_socket(raw, server_hostname=role) as tls:
        tls.sendall(b"ping")
        return tls.recv(4)


@pytest.fixture(scope="module")
def ca() -> DeploymentCA:
    return DeploymentCA.create()


def test_roles_talk_and_know_each_other(ca: DeploymentCA) -> None:
    seen: list = []
    port, thread = serve(server_context(*role_identity(ca, "stage-1"), ca.cert_pem()), seen)
    assert dial(port, client_context(*role_identity(ca, "stage-0"), ca.cert_pem()),
                "stage-1") == b"ping"
    thread.join(TIMEOUT_S)
    assert seen == ["stage-0"]


def test_client_from_another_ca_is_refused(ca: DeploymentCA) -> None:
    seen: list = []
    port, thread = serve(server_context(*role_identity(ca, "stage-1"), ca.cert_pem()), seen)
    rogue = DeploymentCA.create()
    with pytest.raises((ssl.SSLError, OSError)):
        dial(port, client_context(*role_identity(rogue, "stage-0"), ca.cert_pem()), "stage-1")
    thread.join(TIMEOUT_S)
    assert seen and isinstance(seen[0], ssl.SSLError | OSError)


def test_server_with_the_wrong_role_is_refused(ca: DeploymentCA) -> None:
    seen: list = []
    port, thread = serve(server_context(*role_identity(ca, "stage-2"), ca.cert_pem()), seen)
    with pytest.raises(ssl.SSLCertVerificationError, match="stage-1"):
        dial(port, client_context(*role_identity(ca, "stage-0"), ca.cert_pem()), "stage-1")
    thread.join(TIMEOUT_S)
