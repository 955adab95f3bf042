"""Mutual TLS 1.3 between pipeline roles, under the deployment CA.

Every role certificate names its role (CN and DNS SAN, issued by the coordinator), so a client
connecting to ``stage-1`` checks the server's name against ``stage-1``, and a server accepts only
clients whose certificate chains to the deployment CA; :func:`peer_role` says which role it is.
"""

from __future__ import annotations

import ssl

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.enclave.ratls import load_identity


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
    """Presents this role's certificate; the server's name must be the role dialled
    (``wrap_socket(..., server_hostname=role)``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cadata=ca_pem)
    context.check_hostname = True
    load_identity(context, certificate_pem, key)
    return context


def peer_role(tls: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    """The role named by the verified peer certificate (its common name)."""
    der = tls.getpeercert(binary_form=True)
    if der is None:
        return None
    names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
