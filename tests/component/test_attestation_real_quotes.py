"""The verifier against real Intel SGX evidence (expected results from the data's README)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from smlaas.enclave import DEFAULT_POLICY, Policy, load_collateral, verify_quote
from smlaas.errors import PolicyError
from tests.sgx_testdata import PHALA_EXPIRED_AT, PHALA_VALID_AT, read, requires_testdata

pytestmark = requires_testdata

HEADER_AND_BODY = 48 + 384
# What an owner who reviewed this platform's advisories would accept (the collateral is 11.6
# days old at PHALA_VALID_AT).
REVIEWED = Policy(accepted_tcb_statuses=("UpToDate", "ConfigurationAndSWHardeningNeeded"),
                  accepted_advisory_ids=("INTEL-SA-00289", "INTEL-SA-00615"),
                  max_collateral_age_days=30)


@pytest.fixture(scope="module")
def collateral():
    return load_collateral(read("phala/sgx_quote_collateral.json").decode(), source="phala")


def test_phala_quote_verifies_with_expected_status(collateral) -> None:
    verdict = verify_quote(read("phala/sgx_quote"), collateral, at=PHALA_VALID_AT)
    assert verdict.verified, verdict.error
    assert verdict.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert verdict.advisories == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert not verdict.simulated and not verdict.debug
    assert bytes.fromhex(verdict.report_data).startswith(b"Hello, world!")
    assert verdict.details["tcb_evaluation_data_number"] == 17
    REVIEWED.check(verdict)


def test_default_policy_fails_closed_on_a_platform_that_needs_hardening(collateral) -> None:
    """SWHardeningNeeded / ConfigurationNeeded pass only when the policy lists them."""
    verdict = verify_quote(read("phala/sgx_quote"), collateral, at=PHALA_VALID_AT)
    with pytest.raises(PolicyError, match="^tcb_status:"):
        DEFAULT_POLICY.check(verdict)
    unreviewed = replace(REVIEWED, accepted_advisory_ids=("INTEL-SA-00289",))
    with pytest.raises(PolicyError, match="^advisories: INTEL-SA-00615"):
        unreviewed.check(verdict)
    with pytest.raises(PolicyError, match="^tcb_evaluation:.* 17.* at least 18"):
        replace(REVIEWED, min_tcb_evaluation_data_number=18).check(verdict)
    replace(REVIEWED, min_tcb_evaluation_data_number=17).check(verdict)


@pytest.mark.parametrize("offset", list(range(48, HEADER_AND_BODY, 29)) + [
    HEADER_AND_BODY + 4 + 10,        # ISV report signature
    HEADER_AND_BODY + 4 + 64 + 10,   # attestation key
    HEADER_AND_BODY + 4 + 128 + 70,  # QE report
    HEADER_AND_BODY + 4 + 128 + 384 + 5,  # QE report signature
])
def test_any_flipped_byte_fails(collateral, offset: int) -> None:
    raw = bytearray(read("phala/sgx_quote"))
    raw[offset] ^= 0x01
    verdict = verify_quote(bytes(raw), collateral, at=PHALA_VALID_AT)
    assert not verdict.verified and verdict.error


def test_expired_collateral_fails(collateral) -> None:
    verdict = verify_quote(read("phala/sgx_quote"), collateral, at=PHALA_EXPIRED_AT)
    assert not verdict.verified and "expired" in verdict.error.lower()


def test_synthetic_intel_quote_is_refused(collateral) -> None:
    verdict = verify_quote(read("intel-synthetic/quote.dat"), collateral, at=PHALA_VALID_AT)
    assert not verdict.verified


def test_eppid_quote_cannot_be_chained(collateral) -> None:
    verdict = verify_quote(read("oasis/quote_v3_ecdsa_p256_eppid.bin"), collateral,
                           at=dt.datetime(2022, 12, 20, tzinfo=dt.UTC))
    assert not verdict.verified and "PCCS" in verdict.error


def test_debug_enclave_refused_by_default_policy(collateral) -> None:
    verdict = verify_quote(read("phala/sgx_quote"), collateral, at=PHALA_VALID_AT)
    debug = replace(verdict, debug=True)
    with pytest.raises(PolicyError, match="^debug:"):
        DEFAULT_POLICY.check(debug)
    replace(REVIEWED, allow_debug_insecure=True).check(debug)


def test_policy_measurement_and_status_checks(collateral) -> None:
    verdict = verify_quote(read("phala/sgx_quote"), collateral, at=PHALA_VALID_AT)
    pinned = replace(REVIEWED, roles=Policy.from_dict(
        {"roles": {"stage-0": {"mrenclave": [verdict.mrenclave]},
                   "stage-1": {"mrenclave": ["00" * 32]}}}).roles)
    pinned.check(verdict, role="stage-0", expected_report_data=b"Hello, world!")
    with pytest.raises(PolicyError, match="^measurement:"):
        pinned.check(verdict, role="stage-1")
    with pytest.raises(PolicyError, match="^report_data:"):
        pinned.check(verdict, role="stage-0", expected_report_data=b"another key")


def test_collateral_age_limit(collateral) -> None:
    verdict = verify_quote(read("phala/sgx_quote"), collateral, at=PHALA_VALID_AT)
    assert verdict.details["collateral_issued"] == "2025-06-19T10:01:18Z"
    REVIEWED.check(verdict)  # 11.6 days old, 30 allowed
    with pytest.raises(PolicyError, match="^freshness:"):
        replace(REVIEWED, max_collateral_age_days=7).check(verdict)
    with pytest.raises(PolicyError, match="^freshness:"):  # the default is a week
        replace(REVIEWED, max_collateral_age_days=Policy().max_collateral_age_days
                ).check(verdict)
