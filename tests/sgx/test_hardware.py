"""Tests that need real SGX hardware with Gramine and a reachable PCCS; skipped elsewhere."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.sgx,
              pytest.mark.skipif(not Path("/dev/attestation/quote").exists(),
                                 reason="needs a Gramine SGX enclave (/dev/attestation)")]


def test_hardware_quote_verifies_against_intel_root() -> None:
    """A quote of this enclave verifies against Intel's root with collateral from the PCCS
    (SMLAAS_PCCS_URL), binds the report data asked for, and fails once a byte changes."""
    from smlaas.enclave import INTEL_ROOT, load_collateral, verify_quote
    from smlaas.enclave.backends.gramine import GramineBackend

    backend = GramineBackend("stage-0")
    binding = os.urandom(32)
    quote = backend.quote(binding)
    collateral = load_collateral(backend.collateral_json(), source="PCCS")
    now = dt.datetime.now(dt.UTC)
    verdict = verify_quote(quote, collateral, at=now, root=INTEL_ROOT)
    assert verdict.verified, verdict.error
    assert not verdict.simulated and verdict.root == INTEL_ROOT.name
    assert bytes.fromhex(verdict.report_data)[:32] == binding
    assert verdict.tcb_status is not None
    tampered = bytearray(quote)
    tampered[48 + 64] ^= 0x01  # inside MRENCLAVE
    assert not verify_quote(bytes(tampered), collateral, at=now, root=INTEL_ROOT).verified
