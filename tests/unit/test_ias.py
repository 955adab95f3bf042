from __future__ import annotations

import datetime as dt

import pytest

from smlaas.enclave.ias import verify_ias_report
from tests.sgx_testdata import TESTDATA, requires_testdata

pytestmark = requires_testdata
AT = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def _files(version: str) -> tuple[bytes, bytes, str]:
    ias = TESTDATA / "ias"
    return ((ias / f"avr_{version}_body_sw_hardening_needed.json").read_bytes(),
            (ias / f"avr_{version}_body_sw_hardening_needed.sig").read_bytes(),
            (ias / "avr_certificates_urlencoded.pem").read_text())


@pytest.mark.parametrize("version", ["v4", "v5"])
def test_real_reports_verify(version: str) -> None:
    verdict = verify_ias_report(*_files(version), at=AT)
    assert verdict.verified and verdict.tcb_status == "SWHardeningNeeded"
    assert verdict.details["ias_version"] == int(version[1])


def test_changed_report_byte_fails() -> None:
    report, signature, certs = _files("v4")
    damaged = bytearray(report)
    damaged[len(damaged) // 2] ^= 0x01
    assert "does not verify" in verify_ias_report(bytes(damaged), signature, certs,
                                                  at=AT).error


def test_chain_without_the_pinned_root_fails() -> None:
    report, signature, certs = _files("v4")
    only_leaf = certs[: certs.index("-----END%20CERTIFICATE-----") + 27]
    assert "pinned" in verify_ias_report(report, signature, only_leaf, at=AT).error
