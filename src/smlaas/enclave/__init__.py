"""Enclaves: quotes, their verification, and attestation policy."""

from __future__ import annotations

from smlaas.enclave.policy import DEFAULT_POLICY, Policy, RolePolicy
from smlaas.enclave.quote import Quote, ReportBody, parse_quote
from smlaas.enclave.verification import (
    INTEL_ROOT,
    QuoteVerdict,
    TrustedRoot,
    load_collateral,
    verify_quote,
)

__all__ = [
    "DEFAULT_POLICY",
    "INTEL_ROOT",
    "Policy",
    "Quote",
    "QuoteVerdict",
    "ReportBody",
    "RolePolicy",
    "TrustedRoot",
    "load_collateral",
    "parse_quote",
    "verify_quote",
]
