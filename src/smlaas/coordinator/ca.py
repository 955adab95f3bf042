"""The deployment CA: created inside the coordinator's enclave, never leaves it.

A role certificate names its role in exactly one place, a dedicated extension
(:data:`ROLE_OID`, read by :func:`smlaas.transport.tls.peer_role`), and the role written
there is the manifest's, never the registrant's choice. Host names for TLS clients go in the
subject alternative names, only for the gateway (the one role clients reach by name), and
only after :func:`validated_hosts`: DNS names or IP addresses, never a role name.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smlaas.coordinator.manifest import GATEWAY_ROLE, is_role_name
from smlaas.coordinator.protocol import Code, refusal
from smlaas.transport.tls import MANIFEST_OID, ROLE_OID

CA_VALIDITY = dt.timedelta(days=365)
ROLE_CERT_VALIDITY = dt.timedelta(days=7)
ROLE_CERT_SUBJECT = "smlaas deployment member"
MAX_HOSTS = 32
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def validated_hosts(role: str, hosts: object) -> list[str]:
    """The host names a registrant may have in its certificate, or CoordinatorRefused
    (malformed) saying which one is refused and why."""
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise refusal(Code.MALFORMED, "hosts must be a list of host names")
    if hosts and role != GATEWAY_ROLE:
        raise refusal(Code.MALFORMED, f"only the gateway's certificate names hosts; {role} "
                      f"asked for {len(hosts)}")
    if len(hosts) > MAX_HOSTS:
        raise refusal(Code.MALFORMED, f"at most {MAX_HOSTS} host names, got {len(hosts)}")
    for host in hosts:
        if is_role_name(host):
            raise refusal(Code.MALFORMED, f"host name {host!r} is a role name; roles come "
                          f"from the manifest only")
        if not _is_host(host):
            raise refusal(Code.MALFORMED, f"{host!r} is neither a DNS name nor an IP address")
    return sorted(set(hosts))


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    return 0 < len(name) <= 253 and all(_DNS_LABEL.match(label) for label in name.split("."))


@dataclass(frozen=True)
class DeploymentCA:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str = "smlaas deployment CA") -> DeploymentCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + CA_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, role: str, public_key: ec.EllipticCurvePublicKey, *, manifest_digest: str,
              hosts: list[str] | None = None) -> x509.Certificate:
        """A certificate for ``role`` under manifest ``manifest_digest`` for TLS server and
        client use; ``hosts`` must have passed :func:`validated_hosts`."""
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                               ROLE_CERT_SUBJECT)]))
                   .issuer_name(self.certificate.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + ROLE_CERT_VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False)
                   .add_extension(x509.UnrecognizedExtension(ROLE_OID, role.encode()),
                                  critical=False)
                   .add_extension(x509.UnrecognizedExtension(MANIFEST_OID,
                                                             manifest_digest.encode()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       self.key.public_key()), critical=False))
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [_general_name(h) for h in hosts]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def cert_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes) -> DeploymentCA:
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)  # written by key_pem()
        return cls(key, x509.load_pem_x509_certificate(cert_pem))


def _general_name(host: str) -> x509.GeneralName:
    """An IP address SAN for an address (TLS clients match IPs only against those), else a
    DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
