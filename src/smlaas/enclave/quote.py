"""SGX DCAP quote v3 parsing (pure): header, report body, signature data, QE report and
certification data, per Intel's "SGX ECDSA Quote Library API" (Appendix A.4).

Trailing bytes after the signature data (padding some quote providers add) are tolerated.
The PCK certificate chain is ordered by issuer, not by its position in the PEM blob.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography import x509

from smlaas.errors import QuoteFormatError

HEADER_BYTES = 48
REPORT_BODY_BYTES = 384
QUOTE_VERSION_SGX = 3
ATTESTATION_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_DATA_PCK_CHAIN = 5
# Intel's SGX extension of PCK certificates (FMSPC, TCB components, PCE id and SVN).
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_CERT_DATA_KINDS = {1: "a plain PPID", 2: "an RSA-2048-encrypted PPID",
                    3: "an RSA-3072-encrypted PPID", 4: "a PCK leaf certificate alone",
                    6: "a QE report certification data block"}
ATTRIBUTE_DEBUG = 0x2


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    attestation_key_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class ReportBody:
    """An SGX enclave report (the ISV enclave's, or the quoting enclave's)."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @property
    def debug(self) -> bool:
        flags = int.from_bytes(self.attributes[:8], "little")
        return bool(flags & ATTRIBUTE_DEBUG)

    @classmethod
    def parse(cls, raw: bytes) -> ReportBody:
        if len(raw) != REPORT_BODY_BYTES:
            raise QuoteFormatError(f"a report body is {REPORT_BODY_BYTES} bytes, got {len(raw)}")
        misc_select, = struct.unpack_from("<I", raw, 16)
        isv_prod_id, isv_svn = struct.unpack_from("<HH", raw, 256)
        return cls(raw=bytes(raw), cpu_svn=raw[0:16], misc_select=misc_select,
                   attributes=raw[48:64], mr_enclave=raw[64:96], mr_signer=raw[128:160],
                   isv_prod_id=isv_prod_id, isv_svn=isv_svn, report_data=raw[320:384])


@dataclass(frozen=True)
class Quote:
    """A parsed DCAP quote v3 with an ECDSA P-256 attestation key."""

    raw: bytes
    header: QuoteHeader
    report: ReportBody
    signature: bytes
    attestation_key: bytes
    qe_report: ReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    cert_data: bytes

    @property
    def signed_bytes(self) -> bytes:
        """What the attestation key signs: header and ISV report body."""
        return self.raw[: HEADER_BYTES + REPORT_BODY_BYTES]

    @property
    def has_pck_chain(self) -> bool:
        return self.cert_data_type == CERT_DATA_PCK_CHAIN

    def pck_chain(self) -> list[x509.Certificate]:
        """The PCK certificate chain, leaf first, ordered by issuer.

        Raises:
            QuoteFormatError: the quote carries no chain (e.g. an encrypted PPID, type 1-3)
                or the chain is not a single path.
        """
        if not self.has_pck_chain:
            kind = _CERT_DATA_KINDS.get(self.cert_data_type, f"of type {self.cert_data_type}")
            raise QuoteFormatError(
                f"the quote's certification data is {kind} (type {self.cert_data_type}), not a "
                f"PCK certificate chain "
                f"(type 5); its PCK certificate must be fetched from a PCCS to verify it"
            )
        try:
            certs = x509.load_pem_x509_certificates(self.cert_data.rstrip(b"\0"))
        except ValueError as err:
            raise QuoteFormatError(f"the quote's PCK chain is not valid PEM: {err}") from err
        return order_chain(certs)


def order_chain(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """Orders certificates leaf -> root by matching issuer to subject."""
    if not certs:
        raise QuoteFormatError("empty certificate chain")
    subjects = {c.subject: c for c in certs}
    issuers = {c.issuer for c in certs if c.issuer != c.subject}
    leaves = [c for c in certs if c.subject not in issuers]
    if len(leaves) != 1:
        raise QuoteFormatError(f"the certificate chain has {len(leaves)} leaves, expected 1")
    chain = [leaves[0]]
    while chain[-1].issuer != chain[-1].subject and chain[-1].issuer in subjects:
        chain.append(subjects[chain[-1].issuer])
        if len(chain) > len(certs):
            raise QuoteFormatError("the certificate chain has a loop")
    return chain


def parse_quote(raw: bytes) -> Quote:
    """Parses a DCAP quote v3.

    Raises:
        QuoteFormatError: the bytes are not a v3 ECDSA quote, or are truncated.
    """
    raw = bytes(raw)
    minimum = HEADER_BYTES + REPORT_BODY_BYTES + 4
    if len(raw) < minimum:
        raise QuoteFormatError(f"a quote is at least {minimum} bytes, got {len(raw)}")
    version, key_type = struct.unpack_from("<HH", raw, 0)
    if version != QUOTE_VERSION_SGX:
        raise QuoteFormatError(f"quote version {version} is not supported (SGX DCAP quotes "
                               f"are version {QUOTE_VERSION_SGX})")
    if key_type != ATTESTATION_KEY_ECDSA_P256:
        raise QuoteFormatError(f"attestation key type {key_type} is not ECDSA P-256 "
                               f"({ATTESTATION_KEY_ECDSA_P256})")
    qe_svn, pce_svn = struct.unpack_from("<HH", raw, 8)
    header = QuoteHeader(version, key_type, qe_svn, pce_svn, raw[12:28], raw[28:48])
    report = ReportBody.parse(raw[HEADER_BYTES:HEADER_BYTES + REPORT_BODY_BYTES])
    sig_len, = struct.unpack_from("<I", raw, HEADER_BYTES + REPORT_BODY_BYTES)
    body = raw[minimum:]
    if sig_len > len(body):
        raise QuoteFormatError(f"signature data claims {sig_len} bytes, the quote has "
                               f"{len(body)} left (truncated quote)")
    data = body[:sig_len]  # anything after is padding
    fixed = 64 + 64 + REPORT_BODY_BYTES + 64 + 2
    if len(data) < fixed:
        raise QuoteFormatError("signature data too short for an ECDSA quote")
    qe_report = ReportBody.parse(data[128:128 + REPORT_BODY_BYTES])
    offset = 128 + REPORT_BODY_BYTES + 64
    auth_len, = struct.unpack_from("<H", data, offset)
    offset += 2
    auth = data[offset:offset + auth_len]
    offset += auth_len
    if offset + 6 > len(data):
        raise QuoteFormatError("signature data ends before its certification data")
    cert_type, cert_len = struct.unpack_from("<HI", data, offset)
    offset += 6
    cert = data[offset:offset + cert_len]
    if len(cert) != cert_len:
        raise QuoteFormatError(f"certification data claims {cert_len} bytes, {len(cert)} "
                               f"present (truncated quote)")
    return Quote(raw=raw, header=header, report=report, signature=data[0:64],
                 attestation_key=data[64:128], qe_report=qe_report,
                 qe_report_signature=data[128 + REPORT_BODY_BYTES:
                                          128 + REPORT_BODY_BYTES + 64],
                 qe_auth_data=auth, cert_data_type=cert_type, cert_data=cert)
