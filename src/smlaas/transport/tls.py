"""Mutual TLS 1.3 between pipeline roles, under the deployment CA.

A role certificate names its role in one place, a dedicated extension (:data:`ROLE_OID`)
that only the coordinator's CA writes, from the manifest. Both ends of every link check the
peer the same way: the certificate must chain to the deployment CA (the TLS handshake), and
:func:`peer_role` of it must be the role expected (:func:`require_peer_role`), before any
application byte is sent. Host names (subject alternative names) play no part between roles.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.enclave.ratls import load_identity
from smlaas.errors import AttestationError

# A UUID-based OID (ITU-T X.667, arc 2.25): the smlaas role of a deployment certificate.
ROLE_OID = x509.ObjectIdentifier("2.25.97464431924611431185380425069414512145")


def server_context(certificate_pem: str, key: ec.EllipticCurvePrivateKey,
                   ca_pem: str) -> ssl.SSLContext:
    """Presents this role's certificate; requires a client certificate from the same CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca_pem)
    load_identity(context, certificate_pem, key)
    return context


def client_context(certificate_pem: str, key: ec.EllipticCurvePrivateKey,
                   ca_pem: str) -> ssl.SSLContext:
    """Presents this role's certificate; requires the server's to chain to the CA. The
    server's role is checked after the handshake with :func:`require_peer_role`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=ca_pem)
    context.check_hostname = False  # roles are checked from ROLE_OID, not from host names
    context.verify_mode = ssl.CERT_REQUIRED
    load_identity(context, certificate_pem, key)
    return context


def certificate_role(certificate: x509.Certificate) -> str | None:
    """The role a deployment certificate names (its ROLE_OID extension), if any."""
    try:
        extension = certificate.extensions.get_extension_for_oid(ROLE_OID).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(extension, x509.UnrecognizedExtension):
        return None
    try:
        return extension.value.decode("ascii")
    except UnicodeDecodeError:
        return None


def peer_role(tls: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The role named by the verified peer certificate."""
    der = tls.getpeercert(binary_form=True)
    if der is None:
        return None
    return certificate_role(x509.load_der_x509_certificate(der))


def require_peer_role(tls: ssl.SSLSocket | ssl.SSLObject, expected: str) -> None:
    """AttestationError unless the peer's certificate is for role ``expected``."""
    role = peer_role(tls)
    if role != expected:
        raise AttestationError(f"the peer's certificate is for role {role!r}, expected "
                               f"{expected!r}")
