"""Raw Intel PCS collateral (``{"tcbInfo": {...}, "signature": "..."}`` responses) and the
verification of quotes against it when no CRLs come with it.

dcap-qvl needs both CRLs. PCS responses saved without them (as in oasis-core's test data) can
still be checked for everything else, in Python with the ``cryptography`` library: the PCK
chain and the TCB signing chain up to the pinned Intel root, every validity window, the
signatures over the *exact bytes* of the TCB info and QE identity as they stand in the files
(never re-serialised), the QE report (signed by the PCK key, bound to the attestation key,
matching the QE identity), the ISV report signature, and the platform's TCB level combined
with the QE identity's TCB level as Intel's QVL combines them. Only Intel's TCB signing
certificate may sign the documents: a chain of exactly [TCB signer, root], the signer named as
the root expects, not a CA, with the digitalSignature key usage and no SGX PCK extension (so a
PCK leaf key cannot vouch for its own platform).

This is a FALLBACK: revocation is NOT checked on this path, and every result says so
(``details.revocation_checked = false``, ``details.verifier``). Prefer dcap-qvl with both CRLs
(:func:`smlaas.enclave.verification.verify_quote`) wherever the files allow.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from smlaas.enclave.quote import SGX_EXTENSION_OID, Quote, order_chain, parse_quote
from smlaas.enclave.verification import (
    INTEL_ROOT,
    QuoteVerdict,
    TrustedRoot,
    collateral_facts,
    report_verdict,
)
from smlaas.errors import AttestationError, InputError, QuoteFormatError

VERIFIER_LABEL = "raw PCS fallback (no CRLs: revocation NOT checked)"


@dataclass(frozen=True)
class PcsCollateral:
    tcb_info_text: str
    tcb_info_signature: bytes
    qe_identity_text: str
    qe_identity_signature: bytes
    signing_chain: list[x509.Certificate]


def signed_body(text: str, key: str) -> tuple[str, bytes]:
    """The exact text of ``key``'s object in a PCS response, and the response's signature."""
    decoder = json.JSONDecoder()
    try:
        outer = json.loads(text)
        marker = text.index(f'"{key}"') + len(key) + 2
        start = text.index(":", marker - 1) + 1
        while text[start] in " \t\r\n":
            start += 1
        _, end = decoder.raw_decode(text, start)
        return text[start:end], bytes.fromhex(outer["signature"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"not a PCS response with {key!r} and a signature: {err}") from err


def load_pcs_collateral(tcb_info: Path, qe_identity: Path, certs: Path) -> PcsCollateral:
    tcb_text, tcb_sig = signed_body(tcb_info.read_text(), "tcbInfo")
    qe_text, qe_sig = signed_body(qe_identity.read_text(), "enclaveIdentity")
    try:
        chain = order_chain(x509.load_pem_x509_certificates(certs.read_bytes()))
    except (ValueError, QuoteFormatError) as err:
        raise InputError(f"{certs} is not a PEM certificate chain: {err}") from err
    return PcsCollateral(tcb_text, tcb_sig, qe_text, qe_sig, chain)


def verify_quote_pcs(raw: bytes, collateral: PcsCollateral, *, at: dt.datetime,
                     root: TrustedRoot = INTEL_ROOT) -> QuoteVerdict:
    """Verifies ``raw`` against raw PCS collateral without CRLs (see the module docstring)."""
    quote = parse_quote(raw)
    details: dict[str, Any] = {"verifier": VERIFIER_LABEL, "revocation_checked": False,
                               "verified_at": at.isoformat()}
    try:
        status, advisories = _verify(quote, collateral, at, root, details)
    except AttestationError as failure:
        return _verdict(quote, root, details, error=str(failure))
    return _verdict(quote, root, details, tcb_status=status, advisories=advisories)


def _verify(quote: Quote, pcs: PcsCollateral, at: dt.datetime, root: TrustedRoot,
            details: dict[str, Any]) -> tuple[str, list[str]]:
    try:
        pck_chain = quote.pck_chain()
    except QuoteFormatError as err:
        raise AttestationError(str(err)) from err
    _check_chain(pck_chain, at, root, "PCK")
    _check_pck_structure(pck_chain)
    _check_chain(pcs.signing_chain, at, root, "TCB signing")
    _check_tcb_signer(pcs.signing_chain, root)
    signer = pcs.signing_chain[0].public_key()
    qe_identity = _signed_document(pcs.qe_identity_text, pcs.qe_identity_signature, signer, at,
                                   "QE identity")
    tcb = _signed_document(pcs.tcb_info_text, pcs.tcb_info_signature, signer, at, "TCB info")
    details.update(collateral_facts(pcs.tcb_info_text, pcs.qe_identity_text))
    pck_key = pck_chain[0].public_key()
    assert isinstance(pck_key, ec.EllipticCurvePublicKey)
    if not _ecdsa_ok(pck_key, quote.qe_report_signature, quote.qe_report.raw):
        raise AttestationError("QE report signature is invalid (not signed by the PCK key)")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    if quote.qe_report.report_data[:32] != binding:
        raise AttestationError("QE report does not bind the attestation key")
    qe_status = _check_qe_identity(quote, qe_identity)
    details["qe_tcb_status"] = qe_status
    attestation_key = ec.EllipticCurvePublicNumbers(
        int.from_bytes(quote.attestation_key[:32], "big"),
        int.from_bytes(quote.attestation_key[32:], "big"), ec.SECP256R1()).public_key()
    if not _ecdsa_ok(attestation_key, quote.signature, quote.signed_bytes):
        raise AttestationError("ISV enclave report signature is invalid")
    platform_status, advisories = _tcb_level(pck_chain[0], tcb)
    details["platform_tcb_status"] = platform_status
    return converge_tcb_status(platform_status, qe_status), advisories


def converge_tcb_status(platform: str, qe: str) -> str:
    """The quote's TCB status from the platform's and the quoting enclave's, as Intel's QVL
    combines them: a revoked QE revokes the quote; an out-of-date QE makes an otherwise
    acceptable platform out of date."""
    if qe == "UpToDate":
        return platform
    if qe == "Revoked" or platform == "Revoked":
        return "Revoked"
    if qe == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
        return platform
    raise AttestationError(f"the QE identity's TCB status {qe!r} is not one this verifier knows")


def _check_chain(chain: list[x509.Certificate], at: dt.datetime, root: TrustedRoot,
                 label: str) -> None:
    top = chain[-1]
    if hashlib.sha256(top.public_bytes(serialization.Encoding.DER)).hexdigest() != root.sha256:
        raise AttestationError(f"the {label} chain does not end in the trusted {root.name}")
    for index, cert in enumerate(chain):
        name = cert.subject.rfc4514_string()
        if at < cert.not_valid_before_utc:
            raise AttestationError(f"{label} certificate {name} is not yet valid at "
                                   f"{at.isoformat()}")
        if at > cert.not_valid_after_utc:
            raise AttestationError(f"{label} certificate {name} expired at "
                                   f"{cert.not_valid_after_utc.isoformat()}")
        issuer = chain[min(index + 1, len(chain) - 1)]
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as err:
            raise AttestationError(f"{label} certificate {name} is not signed by its "
                                   f"issuer") from err


def _constraints(cert: x509.Certificate, label: str
                 ) -> tuple[x509.BasicConstraints, x509.KeyUsage]:
    try:
        return (cert.extensions.get_extension_for_class(x509.BasicConstraints).value,
                cert.extensions.get_extension_for_class(x509.KeyUsage).value)
    except x509.ExtensionNotFound as err:
        raise AttestationError(f"{label} certificate {cert.subject.rfc4514_string()} lacks an "
                               f"extension it must have: {err}") from err


def _has_sgx_extension(cert: x509.Certificate) -> bool:
    return any(ext.oid.dotted_string == SGX_EXTENSION_OID for ext in cert.extensions)


def _check_pck_structure(chain: list[x509.Certificate]) -> None:
    """PCK certificate -> PCK Platform/Processor CA -> root: exactly three, only the top two
    CAs that may sign certificates, and a leaf that is an end entity with the SGX extension
    (so one platform's PCK key cannot mint PCK certificates for others)."""
    if len(chain) != 3:
        raise AttestationError(f"the PCK chain has {len(chain)} certificates; expected the PCK "
                               f"certificate, its PCK CA and the root")
    for position, cert in enumerate(chain):
        constraints, usage = _constraints(cert, "PCK chain")
        is_leaf = position == 0
        if constraints.ca == is_leaf or usage.key_cert_sign == is_leaf:
            raise AttestationError(f"PCK chain certificate {cert.subject.rfc4514_string()} is "
                                   f"{'a CA' if is_leaf else 'not a CA'} where the chain needs "
                                   f"{'an end entity' if is_leaf else 'a CA'}")
    if not _has_sgx_extension(chain[0]):
        raise AttestationError("the PCK certificate carries no SGX extension")


def _check_tcb_signer(chain: list[x509.Certificate], root: TrustedRoot) -> None:
    """Only the root's TCB signing certificate may sign TCB info and QE identities."""
    if len(chain) != 2:
        raise AttestationError(f"the TCB signing chain has {len(chain)} certificates; "
                               f"expected the TCB signing certificate issued directly by the "
                               f"{root.name}")
    signer = chain[0]
    names = signer.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = str(names[0].value) if names else signer.subject.rfc4514_string()
    if name != root.tcb_signer:
        raise AttestationError(f"TCB info is signed by {name!r}, not by {root.tcb_signer!r}")
    constraints, usage = _constraints(signer, "TCB signing")
    if constraints.ca or not usage.digital_signature or usage.key_cert_sign:
        raise AttestationError("the TCB signing certificate is not a signing-only end-entity "
                      "certificate (basic constraints / key usage)")
    if _has_sgx_extension(signer):
        raise AttestationError("the TCB signing certificate is a PCK certificate (it carries SGX "
                      "platform extensions)")


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, raw_signature: bytes, data: bytes) -> bool:
    signature = encode_dss_signature(int.from_bytes(raw_signature[:32], "big"),
                                     int.from_bytes(raw_signature[32:64], "big"))
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _signed_document(text: str, signature: bytes, signer: Any, at: dt.datetime,
                     label: str) -> dict[str, Any]:
    if not isinstance(signer, ec.EllipticCurvePublicKey) or not _ecdsa_ok(
            signer, signature, text.encode()):
        raise AttestationError(f"{label} signature is invalid")
    document = json.loads(text)
    issued = dt.datetime.fromisoformat(document["issueDate"].replace("Z", "+00:00"))
    next_update = dt.datetime.fromisoformat(document["nextUpdate"].replace("Z", "+00:00"))
    if at < issued:
        raise AttestationError(f"{label} is not yet valid at {at.isoformat()} (issued "
                               f"{document['issueDate']})")
    if at > next_update:
        raise AttestationError(f"{label} expired at {document['nextUpdate']}")
    return dict(document)


def _masked_equal(value: bytes, expected_hex: str, mask_hex: str) -> bool:
    expected, mask = bytes.fromhex(expected_hex), bytes.fromhex(mask_hex)
    return all((v & m) == (e & m) for v, e, m in zip(value, expected, mask))


def _check_qe_identity(quote: Quote, identity: dict[str, Any]) -> str:
    report = quote.qe_report
    if report.mr_signer.hex().upper() != identity["mrsigner"].upper():
        raise AttestationError("QE MRSIGNER does not match the QE identity")
    if report.isv_prod_id != identity["isvprodid"]:
        raise AttestationError("QE product id does not match the QE identity")
    if not _masked_equal(report.misc_select.to_bytes(4, "little"), identity["miscselect"],
                         identity["miscselectMask"]):
        raise AttestationError("QE MISCSELECT does not match the QE identity")
    if not _masked_equal(report.attributes, identity["attributes"],
                         identity["attributesMask"]):
        raise AttestationError("QE attributes do not match the QE identity")
    for level in identity["tcbLevels"]:
        if report.isv_svn >= level["tcb"]["isvsvn"]:
            return str(level["tcbStatus"])
    raise AttestationError(f"QE ISV SVN {report.isv_svn} is below every QE identity TCB level")


def _tcb_level(pck: x509.Certificate, tcb: dict[str, Any]) -> tuple[str, list[str]]:
    extension = dcap_qvl.parse_pck_extension_from_pem(
        pck.public_bytes(serialization.Encoding.PEM))
    if extension.fmspc.hex().upper() != str(tcb["fmspc"]).upper():
        raise AttestationError(f"PCK FMSPC {extension.fmspc.hex()} does not match the TCB info's "
                               f"{tcb['fmspc']}")
    components = list(extension.cpu_svn)
    for level in tcb["tcbLevels"]:
        wanted = [c["svn"] for c in level["tcb"]["sgxtcbcomponents"]]
        if all(have >= want for have, want in zip(components, wanted)) and \
                extension.pce_svn >= level["tcb"]["pcesvn"]:
            return str(level["tcbStatus"]), sorted(level.get("advisoryIDs", []))
    raise AttestationError("the platform's TCB is below every level of the TCB info")


def _verdict(quote: Quote, root: TrustedRoot, details: dict[str, Any],
             **outcome: Any) -> QuoteVerdict:
    return report_verdict(quote.report, root=root.name, simulated=root.simulated,
                          details=details, **outcome)
