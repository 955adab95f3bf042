"""Mutual TLS 1.3 between pipeline roles, under the deployment CA.

A role certificate names its role in one place, a dedicated extension (:data:`ROLE_OID`)
that only the coordinator's CA writes, from the manifest, and the digest of that manifest
(:data:`MANIFEST_OID`). Both ends of every link check the peer the same way: the certificate
must chain to the deployment CA (the TLS handshake), be for the role expected and issued under
the same manifest as their own (:func:`require_peer`), before any application byte is sent.
Host names (subject alternative names) play no part between roles.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.enclave.ratls import load_identity
from smlaas.errors import AttestationError

# UUID-based OIDs (ITU-T X.667, arc 2.25): the smlaas role of a deployment certificate, and the
# digest of the manifest under which the coordinator issued it.
ROLE_OID = x509.ObjectIdentifier("2.25.97464431924611431185380425069414512145")
MANIFEST_OID = x509.ObjectIdentifier("2.25.232581419516432637390398829104785626133")


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


def _text_extension(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    try:
        extension = certificate.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(extension, x509.UnrecognizedExtension):
        return None
    try:
        return extension.value.decode("ascii")
    except UnicodeDecodeError:
        return None


def certificate_role(certificate: x509.Certificate) -> str | None:
    """The role a deployment certificate names (its ROLE_OID extension), if any."""
    return _text_extension(certificate, ROLE_OID)


def certificate_manifest(certificate: x509.Certificate) -> str | None:
    """The manifest digest a deployment certificate was issued under, if any."""
    return _text_extension(certificate, MANIFEST_OID)


def _peer_certificate(tls: ssl.SSLSocket | ssl.SSLObject | None) -> x509.Certificate | None:
    if tls is None:  # not a TLS connection: no certificate, so no role
        return None
    der = tls.getpeercert(binary_form=True)
    return None if der is None else x509.load_der_x509_certificate(der)


def peer_role(tls: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The role named by the verified peer certificate."""
    certificate = _peer_certificate(tls)
    return None if certificate is None else certificate_role(certificate)


def require_peer(tls: ssl.SSLSocket | ssl.SSLObject | None, role: str,
                 manifest_digest: str) -> None:
    """AttestationError unless the peer's certificate is for ``role`` under the manifest
    ``manifest_digest`` (roles registered under another manifest never link up)."""
    certificate = _peer_certificate(tls)
    found = None if certificate is None else certificate_role(certificate)
    if found != role:
        raise AttestationError(f"the peer's certificate is for role {found!r}, expected "
                               f"{role!r}")
    digest = certificate_manifest(certificate) if certificate is not None else None
    if digest != manifest_digest:
        raise AttestationError(f"the peer ({role}) was admitted under manifest "
                               f"{str(digest)[:16]}..., this role under "
                               f"{manifest_digest[:16]}... (restart it under the current "
                               f"manifest)")
