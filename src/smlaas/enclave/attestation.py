"""Attesting evidence: the one sequence of verifying a quote against its collateral and a
trusted root, refusing what does not verify, and applying the policy (role, binding)."""

from __future__ import annotations

import datetime as dt

import dcap_qvl

from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import QuoteVerdict, TrustedRoot, select_root, verify_quote
from smlaas.errors import AttestationError


def attest(quote: bytes, collateral: dcap_qvl.QuoteCollateralV3, *, policy: Policy,
           roots: list[TrustedRoot], role: str | None, expected_report_data: bytes | None,
           whose: str, at: dt.datetime | None = None) -> QuoteVerdict:
    """The verdict on ``quote`` if it verifies (chained to one of ``roots``, with
    ``collateral``, at ``at``) and ``policy`` accepts it for ``role`` with that report data.

    Raises:
        AttestationError: it does not verify ("``whose`` quote does not verify: ...").
        PolicyError: the policy refuses it, naming the first check that fails.
    """
    verdict = verify_quote(quote, collateral, at=at or dt.datetime.now(dt.UTC),
                           root=select_root(quote, roots))
    if not verdict.verified:
        raise AttestationError(f"{whose} quote does not verify: {verdict.error}")
    policy.check(verdict, role=role, expected_report_data=expected_report_data)
    return verdict
