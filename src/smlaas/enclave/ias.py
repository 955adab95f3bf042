"""EPID attestation verification reports from Intel's Attestation Service (IAS), which the
research prototype used: RSA signature over the exact report bytes, signing certificate
chained to the pinned IAS root, and the enclave's report body from ``isvEnclaveQuoteBody``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import urllib.parse

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from smlaas.enclave.quote import HEADER_BYTES, REPORT_BODY_BYTES, ReportBody
from smlaas.enclave.verification import QuoteVerdict, report_verdict
from smlaas.errors import InputError

# Intel SGX Attestation Report Signing CA (valid to 2049-12-31), SHA-256 of its DER encoding.
IAS_ROOT_CA_SHA256 = "7b42e41ec43b91db834a065de4f98a13c44d695570e839cfa8921e584e40735d"
IAS_ROOT_NAME = "Intel SGX Attestation Report Signing CA"
# IAS quote statuses in the vocabulary of DCAP TCB statuses, so one policy covers both.
_STATUS = {
    "OK": "UpToDate",
    "SW_HARDENING_NEEDED": "SWHardeningNeeded",
    "CONFIGURATION_NEEDED": "ConfigurationNeeded",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED": "ConfigurationAndSWHardeningNeeded",
    "GROUP_OUT_OF_DATE": "OutOfDate",
    "GROUP_REVOKED": "Revoked",
}


def parse_certificates(text: str) -> list[x509.Certificate]:
    """PEM certificates, URL-encoded as IAS sends them in X-IASReport-Signing-Certificate, or
    plain."""
    decoded = urllib.parse.unquote(text) if "%" in text else text
    try:
        return x509.load_pem_x509_certificates(decoded.encode())
    except ValueError as err:
        raise InputError(f"the IAS certificates are not PEM: {err}") from err


def verify_ias_report(report: bytes, signature_b64: bytes, certificates: str, *,
                      at: dt.datetime) -> QuoteVerdict:
    """Verifies an IAS attestation verification report; the verdict says why it fails.

    The signature is checked over the exact bytes before anything in them is believed.
    """
    error = _check_signature(report, signature_b64, parse_certificates(certificates), at)
    try:
        data = json.loads(report)
        body_raw = base64.b64decode(data["isvEnclaveQuoteBody"])
        body = ReportBody.parse(body_raw[HEADER_BYTES:HEADER_BYTES + REPORT_BODY_BYTES])
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        if error is not None:  # a damaged report: the signature failure is the finding
            return _failed(error)
        raise InputError(f"not an IAS attestation verification report: {err}") from err
    status = str(data.get("isvEnclaveQuoteStatus", ""))
    tcb_status = _STATUS.get(status, status)
    if error is None and status not in _STATUS:
        error = f"IAS quote status {status!r} means the quote itself is invalid"
    return report_verdict(
        body, root=IAS_ROOT_NAME, simulated=False,
        tcb_status=tcb_status if error is None else None,
        advisories=sorted(data.get("advisoryIDs", [])), error=error,
        details={"ias_status": status, "ias_version": data.get("version"),
                 "ias_timestamp": data.get("timestamp"), "nonce": data.get("nonce"),
                 # IAS's evaluation time stands in for the collateral's issue date: the
                 # policy's max_collateral_age_days bounds how old a report may be.
                 "collateral_issued": _utc(data.get("timestamp")),
                 "verified_at": at.isoformat()})


def _utc(timestamp: object) -> str | None:
    """IAS timestamps are UTC without a zone ("2020-05-11T09:21:15.454051")."""
    if not isinstance(timestamp, str):
        return None
    try:
        return dt.datetime.fromisoformat(timestamp).replace(tzinfo=dt.UTC).isoformat()
    except ValueError:
        return None


def _failed(error: str) -> QuoteVerdict:
    """A verdict for a report too damaged to read its enclave report (all fields zero)."""
    return report_verdict(ReportBody.parse(bytes(REPORT_BODY_BYTES)), root=IAS_ROOT_NAME,
                          simulated=False, error=error)


def _check_signature(report: bytes, signature_b64: bytes, certs: list[x509.Certificate],
                     at: dt.datetime) -> str | None:
    by_hash = {hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest(): c
               for c in certs}
    root = by_hash.get(IAS_ROOT_CA_SHA256)
    leaves = [c for c in certs if c.issuer != c.subject]
    if root is None:
        return f"the certificates do not include the pinned {IAS_ROOT_NAME}"
    if len(leaves) != 1 or leaves[0].issuer != root.subject:
        return f"expected one report signing certificate issued by the {IAS_ROOT_NAME}"
    signer = leaves[0]
    root_key, signer_key = root.public_key(), signer.public_key()
    if not isinstance(root_key, rsa.RSAPublicKey) or not isinstance(signer_key,
                                                                    rsa.RSAPublicKey):
        return "IAS certificates must carry RSA keys"
    for cert in (signer, root):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            return (f"certificate {cert.subject.rfc4514_string()} is not valid at "
                    f"{at.isoformat()} (valid {cert.not_valid_before_utc.date()} .. "
                    f"{cert.not_valid_after_utc.date()})")
    try:
        hash_algorithm = signer.signature_hash_algorithm or hashes.SHA256()
        root_key.verify(signer.signature, signer.tbs_certificate_bytes, padding.PKCS1v15(),
                        hash_algorithm)
    except InvalidSignature:
        return "the report signing certificate is not signed by the IAS root"
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
        signer_key.verify(signature, report, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, binascii.Error):
        return "the report's signature does not verify (report changed or wrong signature)"
    return None
