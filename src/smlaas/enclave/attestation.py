"""Attesting evidence: the one sequence of verifying a quote against its collateral and a
trusted root, refusing what does not verify, and applying the policy (role, binding); and the
evidence an enclave serves, remade as it ages (:class:`RefreshedEvidence`)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import dcap_qvl

from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import QuoteVerdict, TrustedRoot, select_root, verify_quote
from smlaas.errors import AttestationError

T = TypeVar("T")
EVIDENCE_REFRESH_S = 6 * 3600.0
"""How old an enclave's served evidence (a quote and its collateral) may get before it is
remade, so that the collateral stays within what verifiers' policies accept
(``max_collateral_age_days``, 7 by default) however long the enclave runs."""


class RefreshedEvidence(Generic[T]):
    """The current evidence ``make`` gives, remade once it is REFRESH_S old (thread-safe)."""

    REFRESH_S = EVIDENCE_REFRESH_S

    def __init__(self, make: Callable[[], T], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._make, self._clock = make, clock
        self._lock = threading.Lock()
        self._evidence, self._made = make(), clock()

    def __call__(self) -> T:
        with self._lock:
            if self._clock() - self._made >= self.REFRESH_S:
                self._evidence, self._made = self._make(), self._clock()
            return self._evidence


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
