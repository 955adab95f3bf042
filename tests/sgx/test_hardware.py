"""Tests that need real SGX hardware with Gramine; skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.sgx,
              pytest.mark.skipif(not Path("/dev/attestation/quote").exists(),
                                 reason="needs a Gramine SGX enclave (/dev/attestation)")]


def test_hardware_quote_verifies_against_intel_root() -> None:
    from smlaas.enclave.backends.gramine import GramineBackend

    quote = GramineBackend("stage-0").quote(b"smlaas hardware test")
    assert len(quote) > 1000
