"""Mutual TLS between roles under the deployment CA, over 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.ca import ROLE_CERT_SUBJECT, DeploymentCA, validated_hosts
from smlaas.errors import AttestationError, CoordinatorRefused
from smlaas.transport.tls import (
    certificate_role,
    client_context,
    peer_role,
    require_peer,
    server_context,
)

TIMEOUT_S = 10


DIGEST = "ab" * 32  # the manifest every identity here is issued under, unless told


def role_identity(ca: DeploymentCA, role: str, hosts: list[str] | None = None,
                  manifest_digest: str = DIGEST) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(role, key.public_key(), manifest_digest=manifest_digest, hosts=hosts)
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
        require_peer(tls, role, DIGEST)  # as Link does, before any byte is sent
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
    with pytest.raises(AttestationError, match="'stage-2', expected 'stage-1'"):
        dial(port, client_context(*role_identity(ca, "stage-0"), ca.cert_pem()), "stage-1")
    thread.join(TIMEOUT_S)


def test_role_comes_from_the_role_field_not_from_host_names(ca: DeploymentCA) -> None:
    """A gateway certificate whose host names say "stage-1" is still the gateway's: the CA
    writes the role in one field and both ends read only that one."""
    seen: list = []
    gateway = role_identity(ca, "gateway", hosts=["stage-1", "127.0.0.1"])
    port, thread = serve(server_context(*gateway, ca.cert_pem()), seen)
    with pytest.raises(AttestationError, match="'gateway', expected 'stage-1'"):
        dial(port, client_context(*role_identity(ca, "stage-0"), ca.cert_pem()), "stage-1")
    thread.join(TIMEOUT_S)
    certificate = x509.load_pem_x509_certificate(gateway[0].encode())
    assert certificate_role(certificate) == "gateway"
    assert certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value \
        == ROLE_CERT_SUBJECT


def test_a_peer_admitted_under_another_manifest_is_refused(ca: DeploymentCA) -> None:
    """After a manifest is replaced, roles admitted under the old one never link with the
    new ones (no pipeline mixes two policies)."""
    seen: list = []
    port, thread = serve(server_context(*role_identity(ca, "stage-1", manifest_digest="cd" * 32),
                                        ca.cert_pem()), seen)
    with pytest.raises(AttestationError, match="admitted under manifest cdcd"):
        dial(port, client_context(*role_identity(ca, "stage-0"), ca.cert_pem()), "stage-1")
    thread.join(TIMEOUT_S)


@pytest.mark.parametrize(("role", "hosts", "reason"), [
    ("gateway", ["stage-1"], "is a role name"),
    ("gateway", ["Gateway."], "is a role name"),
    ("gateway", ["coordinator"], "is a role name"),
    ("gateway", ["bad host!"], "neither a DNS name"),
    ("gateway", "localhost", "must be a list"),
    ("stage-0", ["localhost"], "only the gateway"),
])
def test_registrants_cannot_ask_for_role_names_or_junk_as_hosts(role: str, hosts: object,
                                                                reason: str) -> None:
    with pytest.raises(CoordinatorRefused, match=reason) as refused:
        validated_hosts(role, hosts)
    assert refused.value.code == "malformed"
    assert validated_hosts("gateway", ["localhost", "127.0.0.1", "::1", "gw.example.com"])
