"""``smlaas attest verify`` as a user runs it, on real and simulated quotes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_cli import smlaas
from tests.sgx_testdata import TESTDATA, requires_testdata

JSON_FIELDS = {"status", "tcb_status", "advisories", "mrenclave", "mrsigner", "isv_prod_id",
               "isv_svn", "debug", "report_data", "simulated", "policy_ok", "error"}


@requires_testdata
def test_real_quote_verifies_at_the_stated_time(tmp_path: Path) -> None:
    args = ["attest", "verify", str(TESTDATA / "phala" / "sgx_quote"), "--collateral",
            str(TESTDATA / "phala" / "sgx_quote_collateral.json"), "--at",
            "2025-07-01T00:00:00Z", "--json"]
    # The default policy fails closed: this platform needs configuration and hardening.
    refused = smlaas(*args, cwd=tmp_path)
    assert refused.returncode == 1
    data = json.loads(refused.stdout)
    assert data["status"] == "REJECTED" and data["error"].startswith("tcb_status:")
    (tmp_path / "reviewed.toml").write_text(
        'accepted_tcb_statuses = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]\n'
        'accepted_advisory_ids = ["INTEL-SA-00289", "INTEL-SA-00615"]\n'
        "max_collateral_age_days = 30\n")
    result = smlaas(*args, "--policy", "reviewed.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= JSON_FIELDS
    assert data["status"] == "OK" and data["policy_ok"] is True and data["simulated"] is False
    assert data["tcb_status"] == "ConfigurationAndSWHardeningNeeded"


@requires_testdata
@pytest.mark.parametrize("at", ["2025-07-20T00:00:00Z", "1753000000"])
def test_real_quote_after_collateral_expiry_fails(tmp_path: Path, at: str) -> None:
    result = smlaas("attest", "verify", str(TESTDATA / "phala" / "sgx_quote"), "--collateral",
                    str(TESTDATA / "phala" / "sgx_quote_collateral.json"), "--at", at,
                    "--json", cwd=tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "FAILED"


def test_sim_quote_needs_allow_simulation(tmp_path: Path) -> None:
    smlaas("attest", "sim-quote", "-o", "q.bin", "--collateral-out", "c.json",
           "--report-data", "key-hash", cwd=tmp_path, check=True)
    refused = smlaas("attest", "verify", "q.bin", "--collateral", "c.json", "--json",
                     cwd=tmp_path)
    assert refused.returncode == 1
    data = json.loads(refused.stdout)
    assert data["status"] == "REJECTED" and data["simulated"] is True
    assert "SIMULATION quote" in data["error"]
    (tmp_path / "policy.toml").write_text("allow_simulation_insecure = true\n")
    accepted = smlaas("attest", "verify", "q.bin", "--collateral", "c.json", "--policy",
                      "policy.toml", "--json", cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert bytes.fromhex(json.loads(accepted.stdout)["report_data"]).startswith(b"key-hash")


def test_garbage_quote_and_collateral_are_exit_2(tmp_path: Path) -> None:
    smlaas("attest", "sim-quote", "-o", "good.bin", "--collateral-out", "good.json",
           cwd=tmp_path, check=True)
    (tmp_path / "q.bin").write_bytes(b"not a quote")
    (tmp_path / "c.json").write_text("{}")
    bad_quote = smlaas("attest", "verify", "q.bin", "--collateral", "good.json", cwd=tmp_path)
    assert bad_quote.returncode == 2 and "quote is at least" in bad_quote.stderr
    bad_collateral = smlaas("attest", "verify", "good.bin", "--collateral", "c.json",
                            cwd=tmp_path)
    assert bad_collateral.returncode == 2 and "not DCAP collateral" in bad_collateral.stderr


@requires_testdata
@pytest.mark.parametrize("version", ["v4", "v5"])
def test_ias_report_verifies_before_the_signing_cert_expires(tmp_path: Path,
                                                             version: str) -> None:
    ias = TESTDATA / "ias"
    args = ["attest", "verify-ias", str(ias / f"avr_{version}_body_sw_hardening_needed.json"),
            "--signature", str(ias / f"avr_{version}_body_sw_hardening_needed.sig"),
            "--certs", str(ias / "avr_certificates_urlencoded.pem"), "--json"]
    # These reports come from a debug enclave: verified, but the default policy refuses it.
    refused = smlaas(*args, "--at", "2024-01-01T00:00:00Z", cwd=tmp_path)
    assert refused.returncode == 1
    data = json.loads(refused.stdout)
    assert data["status"] == "REJECTED" and data["debug"] is True
    assert data["error"].startswith("debug:")
    (tmp_path / "debug_ok.toml").write_text(
        'allow_debug_insecure = true\naccepted_tcb_statuses = ["SWHardeningNeeded"]\n'
        "max_collateral_age_days = 3650\n")  # the reports are from 2020 and 2023
    ok = smlaas(*args, "--at", "2024-01-01T00:00:00Z", "--policy", "debug_ok.toml",
                cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["tcb_status"] == "SWHardeningNeeded" and "INTEL-SA-00334" in data["advisories"]
    expired = smlaas(*args, "--at", "2026-11-21T00:00:00Z", cwd=tmp_path)
    assert expired.returncode == 1 and "not valid at" in json.loads(expired.stdout)["error"]


@requires_testdata
def test_raw_pcs_collateral_from_the_cli(tmp_path: Path) -> None:
    oasis = TESTDATA / "oasis"
    (tmp_path / "hardening.toml").write_text('accepted_tcb_statuses = ["SWHardeningNeeded"]\n')
    result = smlaas("attest", "verify", str(oasis / "quote_v3_ecdsa_p256_pck_chain.bin"),
                    "--tcb-info", str(oasis / "tcb_info_v3_fmspc_00606A000000.json"),
                    "--qe-identity", str(oasis / "qe_identity_v2.json"),
                    "--pcs-certs", str(oasis / "tcb_info_v3_fmspc_00606A000000_certs.pem"),
                    "--at", "1671497404", "--policy", "hardening.toml", "--json",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "OK" and data["details"]["revocation_checked"] is False
    assert data["tcb_status"] == "SWHardeningNeeded"
    assert "fallback" in data["details"]["verifier"]


@requires_testdata
def test_unreachable_pccs_fails_quickly_and_clearly(tmp_path: Path) -> None:
    import time

    from smlaas.coordinator.server import free_port

    start = time.monotonic()
    result = smlaas("attest", "verify", str(TESTDATA / "phala" / "sgx_quote"), "--pccs",
                    f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot fetch collateral from http://127.0.0.1" in result.stderr
    assert time.monotonic() - start < 60
