"""Raw PCS collateral without CRLs (oasis-core's test data): expected results from the
data's README."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from smlaas.enclave.pcs import load_pcs_collateral, verify_quote_pcs
from tests.sgx_testdata import TESTDATA, read, requires_testdata

pytestmark = requires_testdata
OASIS = TESTDATA / "oasis"


@pytest.fixture(scope="module")
def collateral():
    return load_pcs_collateral(OASIS / "tcb_info_v3_fmspc_00606A000000.json",
                               OASIS / "qe_identity_v2.json",
                               OASIS / "tcb_info_v3_fmspc_00606A000000_certs.pem")


def verify_at(collateral, unix: int, quote: bytes | None = None):
    raw = quote or read("oasis/quote_v3_ecdsa_p256_pck_chain.bin")
    return verify_quote_pcs(raw, collateral, at=dt.datetime.fromtimestamp(unix, dt.UTC))


def test_valid_at_the_stated_time(collateral) -> None:
    verdict = verify_at(collateral, 1671497404)
    assert verdict.verified, verdict.error
    assert verdict.mrenclave.startswith("68823bc6") and verdict.mrsigner.startswith("9affcfae")
    assert verdict.details["revocation_checked"] is False


@pytest.mark.parametrize("unix, message", [
    (1891163522, "PCK certificate .* expired"),
    (1670238720, "PCK certificate .* not yet valid"),
    (1671194735, "QE identity is not yet valid"),
    (1673786737, "QE identity expired"),
])
def test_expected_failures(collateral, unix: int, message: str) -> None:
    verdict = verify_at(collateral, unix)
    assert not verdict.verified
    assert re.search(message, verdict.error), verdict.error


def test_wrong_signing_chain_fails() -> None:
    bad = load_pcs_collateral(OASIS / "tcb_info_v3_fmspc_00606A000000.json",
                              OASIS / "qe_identity_v2.json",
                              OASIS / "tcb_info_v3_fmspc_00606A000000_certs_bad.pem")
    assert not verify_at(bad, 1671497404).verified


@pytest.mark.parametrize("offset", [48 + 64, 48 + 320, 48 + 384 + 4 + 10])
def test_flipped_byte_fails(collateral, offset: int) -> None:
    raw = bytearray(read("oasis/quote_v3_ecdsa_p256_pck_chain.bin"))
    raw[offset] ^= 0x01
    assert not verify_at(collateral, 1671497404, bytes(raw)).verified


def test_eppid_quote_is_refused_with_a_reason(collateral) -> None:
    verdict = verify_at(collateral, 1671497404, read("oasis/quote_v3_ecdsa_p256_eppid.bin"))
    assert not verdict.verified and "PCCS" in verdict.error
