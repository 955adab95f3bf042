"""RA-TLS: TLS certificates that carry attestation evidence for their own key.

The certificate is self-signed by a key created inside the enclave; an extension holds a quote
whose report_data starts with SHA-256 of the certificate's SubjectPublicKeyInfo, and a second
extension the collateral to verify it (signed by Intel, or by the simulation root, so carrying
it in the certificate adds no trust). A client checks the binding and the quote against its
policy after the handshake and before it sends a byte (:func:`connect_attested`).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smlaas.enclave.attestation import attest
from smlaas.enclave.keys import spki_sha256
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import (
    QuoteVerdict,
    TrustedRoot,
    load_collateral,
)
from smlaas.errors import AttestationError

# Gramine's RA-TLS extension for an SGX quote; the collateral OID is a UUID-based OID
# (ITU-T X.667, arc 2.25) so that no registry is needed.
QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
COLLATERAL_OID = x509.ObjectIdentifier("2.25.240839413963640812745512394108287045411")
QuoteProvider = Callable[[bytes], bytes]
"""Returns a quote whose report_data is the given (<= 64) bytes."""


def public_key_hash(certificate: x509.Certificate) -> bytes:
    return spki_sha256(certificate.public_key())


@dataclass(frozen=True)
class RaTlsIdentity:
    """An enclave's TLS key and its RA-TLS certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def server_context(self) -> ssl.SSLContext:
        """A TLS 1.3 server context presenting this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        load_identity(context, self.cert_pem().decode(), self.key)
        return context


def load_identity(context: ssl.SSLContext, certificate_pem: str,
                  key: ec.EllipticCurvePrivateKey) -> None:
    """Loads a certificate and key into ``context``. The ssl module reads keys from files
    only: they go to a private temporary directory that is removed at once."""
    with tempfile.TemporaryDirectory(prefix="smlaas-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_text(certificate_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context.load_cert_chain(cert_path, key_path)


def create_identity(common_name: str, quote_provider: QuoteProvider, collateral_json: str, *,
                    key: ec.EllipticCurvePrivateKey | None = None,
                    validity: dt.timedelta = dt.timedelta(days=1)) -> RaTlsIdentity:
    """An RA-TLS certificate binding ``key`` (default: a fresh key pair) to a fresh quote."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    quote = quote_provider(spki_sha256(key.public_key()))
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(QUOTE_OID, quote), critical=False)
        .add_extension(x509.UnrecognizedExtension(COLLATERAL_OID, collateral_json.encode()),
                       critical=False)
        .sign(key, hashes.SHA256()))
    return RaTlsIdentity(key, certificate)


def verify_certificate(der: bytes, policy: Policy, *, roots: list[TrustedRoot],
                       role: str | None = None, at: dt.datetime | None = None) -> QuoteVerdict:
    """Checks an RA-TLS certificate: binding, quote, collateral, policy.

    Raises:
        AttestationError (or its PolicyError): the first check that fails, in words.
    """
    certificate = x509.load_der_x509_certificate(der)
    try:
        quote = certificate.extensions.get_extension_for_oid(QUOTE_OID).value
        collateral = certificate.extensions.get_extension_for_oid(COLLATERAL_OID).value
    except x509.ExtensionNotFound as err:
        raise AttestationError(f"the peer's certificate carries no attestation evidence "
                               f"({err}); it is not an RA-TLS certificate") from err
    assert isinstance(quote, x509.UnrecognizedExtension)
    assert isinstance(collateral, x509.UnrecognizedExtension)
    at = at or dt.datetime.now(dt.UTC)
    if not certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc:
        raise AttestationError(f"the peer's RA-TLS certificate is not valid at {at.isoformat()} "
                               f"(valid {certificate.not_valid_before_utc.isoformat()} to "
                               f"{certificate.not_valid_after_utc.isoformat()})")
    return attest(quote.value, load_collateral(collateral.value.decode(), source="RA-TLS cert"),
                  policy=policy, roots=roots, role=role,
                  expected_report_data=public_key_hash(certificate), whose="the peer's", at=at)


def connect_attested(host: str, port: int, policy: Policy, *, roots: list[TrustedRoot],
                     role: str | None = None, timeout_s: float = 10.0
                     ) -> tuple[ssl.SSLSocket, QuoteVerdict]:
    """Opens TLS to an RA-TLS server and returns the socket only once its evidence passed;
    otherwise closes it without sending application data and raises AttestationError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # trust comes from the quote, not from a CA
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((host, port), timeout=timeout_s)
    tls = context.wrap_socket(raw, server_hostname=host)
    try:
        der = tls.getpeercert(binary_form=True)
        if der is None:
            raise AttestationError("the peer presented no certificate")
        verdict = verify_certificate(der, policy, roots=roots, role=role)
    except BaseException:
        tls.close()
        raise
    return tls, verdict
