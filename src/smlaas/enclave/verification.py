"""Verifying DCAP quotes: the maintained ``dcap-qvl`` library checks the chain to the trusted
root, both CRLs, TCB info and QE identity (signatures, validity, status, advisories), the QE
report and the ISV report signature; smlaas pins the root and reports the evidence.

Real quotes are checked against Intel's SGX Root CA (pinned by the SHA-256 of its DER
encoding); simulated quotes against the local simulation root, by the very same code path
(``dcap_qvl.verify_with_root_ca``). Which root signed is part of every result.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smlaas.enclave.quote import Quote, ReportBody, parse_quote
from smlaas.errors import AttestationError, InputError, QuoteFormatError

# Intel SGX Root CA (CN=Intel SGX Root CA, valid to 2049-12-31), SHA-256 of its DER encoding.
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"


@dataclass(frozen=True)
class TrustedRoot:
    """The root a quote's PCK chain must end in."""

    name: str
    der: bytes | None
    """DER of the root; None means dcap-qvl's built-in Intel root."""
    simulated: bool
    tcb_signer: str = "Intel SGX TCB Signing"
    """Common name of the only certificate (issued by this root) that may sign TCB info and
    QE identities."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest() if self.der else INTEL_SGX_ROOT_CA_SHA256


INTEL_ROOT = TrustedRoot(name="Intel SGX Root CA", der=None, simulated=False)


@dataclass(frozen=True)
class QuoteVerdict:
    """What a quote proves, or why it proves nothing."""

    verified: bool
    tcb_status: str | None
    advisories: list[str]
    mrenclave: str
    mrsigner: str
    isv_prod_id: int
    isv_svn: int
    debug: bool
    report_data: str
    simulated: bool
    root: str
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify_quote(raw: bytes, collateral: dcap_qvl.QuoteCollateralV3, *, at: dt.datetime,
                 root: TrustedRoot = INTEL_ROOT) -> QuoteVerdict:
    """Verifies ``raw`` with ``collateral`` at time ``at`` against ``root``.

    Never raises for a quote that fails verification: the verdict says why. Raises
    QuoteFormatError only for bytes that are not a quote at all.
    """
    quote = parse_quote(raw)
    chain_error = _chain_root_error(quote, root)
    if chain_error:
        return _verdict(quote, root, error=chain_error)
    now = int(at.timestamp())
    details: dict[str, Any] = {"verified_at": at.isoformat(), **collateral_facts(
        collateral.tcb_info, collateral.qe_identity)}
    try:
        if root.der is None:
            report = dcap_qvl.verify(quote.raw, collateral, now)
        else:
            report = dcap_qvl.verify_with_root_ca(quote.raw, collateral, root.der, now)
    except ValueError as err:
        return _verdict(quote, root, error=str(err).removeprefix("Verification failed: "),
                        details=details)
    return _verdict(quote, root, tcb_status=report.status,
                    advisories=sorted(report.advisory_ids), details=details)


def collateral_facts(tcb_info: str, qe_identity: str) -> dict[str, Any]:
    """What the policy needs of the collateral: the older issue date of the TCB info and the
    QE identity (ISO 8601), and the lower of their TCB evaluation data numbers (None where a
    document does not say)."""
    dates: list[str] = []
    numbers: list[int] = []
    for document in (tcb_info, qe_identity):
        try:
            parsed = json.loads(document)
            dates.append(str(parsed["issueDate"]))
        except (ValueError, KeyError, TypeError):
            return {"collateral_issued": None, "tcb_evaluation_data_number": None}
        number = parsed.get("tcbEvaluationDataNumber")
        if isinstance(number, int) and not isinstance(number, bool):
            numbers.append(number)
    return {"collateral_issued": min(dates),
            "tcb_evaluation_data_number": min(numbers) if len(numbers) == 2 else None}


def fetch_collateral(pccs_url: str, raw: bytes, *, timeout_s: float = 30.0
                     ) -> dcap_qvl.QuoteCollateralV3:
    """Collateral for ``raw`` from a PCCS (or Intel's PCS) at ``pccs_url``, within a deadline.

    Raises:
        AttestationError: the service could not be reached or answered with an error.
    """
    async def fetch() -> dcap_qvl.QuoteCollateralV3:
        return await asyncio.wait_for(dcap_qvl.get_collateral(pccs_url, raw), timeout_s)

    try:
        return asyncio.run(fetch())
    except TimeoutError as err:
        raise AttestationError(f"no collateral from {pccs_url} within {timeout_s:g} s") from err
    except (RuntimeError, ValueError, OSError) as err:
        raise AttestationError(f"cannot fetch collateral from {pccs_url}: {err}") from err


def select_root(raw: bytes, candidates: list[TrustedRoot]) -> TrustedRoot:
    """The candidate root the quote's PCK chain ends in (Intel's when none matches, so the
    verdict names the mismatch)."""
    try:
        top = parse_quote(raw).pck_chain()[-1]
    except QuoteFormatError:
        return INTEL_ROOT
    digest = hashlib.sha256(top.public_bytes(serialization.Encoding.DER)).hexdigest()
    return next((root for root in candidates if root.sha256 == digest), INTEL_ROOT)


def _chain_root_error(quote: Quote, root: TrustedRoot) -> str | None:
    """dcap-qvl checks the path; this says early, and in words, which root a chain ends in."""
    try:
        chain = quote.pck_chain()
    except QuoteFormatError as err:
        return str(err)
    top = chain[-1]
    if top.issuer != top.subject:
        return None  # chain given without its root: dcap-qvl adds the trusted one
    digest = hashlib.sha256(top.public_bytes(serialization.Encoding.DER)).hexdigest()
    if digest != root.sha256:
        name = top.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        label = name[0].value if name else top.subject.rfc4514_string()
        return (f"the PCK chain ends in {label!r} (sha256 {digest[:16]}...), not the trusted "
                f"{root.name} (sha256 {root.sha256[:16]}...)")
    return None


def report_verdict(report: ReportBody, *, root: str, simulated: bool,
                   tcb_status: str | None = None, advisories: list[str] | None = None,
                   error: str | None = None, details: dict[str, Any] | None = None
                   ) -> QuoteVerdict:
    """The verdict on evidence about enclave ``report``: verified unless ``error``."""
    return QuoteVerdict(
        verified=error is None, tcb_status=tcb_status, advisories=advisories or [],
        mrenclave=report.mr_enclave.hex(), mrsigner=report.mr_signer.hex(),
        isv_prod_id=report.isv_prod_id, isv_svn=report.isv_svn, debug=report.debug,
        report_data=report.report_data.hex(), simulated=simulated, root=root, error=error,
        details=details or {})


def _verdict(quote: Quote, root: TrustedRoot, **outcome: Any) -> QuoteVerdict:
    return report_verdict(quote.report, root=root.name, simulated=root.simulated, **outcome)


def load_collateral(text: str, *, source: str) -> dcap_qvl.QuoteCollateralV3:
    """Collateral in the JSON layout dcap-qvl reads (as written by ``dcap_qvl`` or PCCS
    clients); InputError naming ``source`` if it is not."""
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except ValueError as err:
        raise InputError(f"{source} is not DCAP collateral in dcap-qvl's JSON layout: "
                               f"{err}") from err
