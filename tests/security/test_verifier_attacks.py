"""Attacks on verification and policy, through the CLI as a user runs it: forged raw PCS
collateral (a revoked QE passed off as fine, TCB info signed by a PCK leaf key) and policies
that would fail open."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from smlaas.enclave.backends.sim import SimBackend
from tests.integration.test_cli import smlaas

SIM_OK = "allow_simulation_insecure = true\n"


@pytest.fixture
def sim_quote(tmp_path: Path) -> SimBackend:
    backend = SimBackend("stage-0", pki_dir=tmp_path / "cache" / "sim-pki")  # the CLI's
    (tmp_path / "quote.bin").write_bytes(backend.quote(b"binding"))
    (tmp_path / "sim.toml").write_text(SIM_OK)
    return backend


def _verify_pcs(tmp_path: Path, tcb_info: str, qe_identity: str, certs: str):
    (tmp_path / "tcb.json").write_text(tcb_info)
    (tmp_path / "qe.json").write_text(qe_identity)
    (tmp_path / "certs.pem").write_text(certs)
    result = smlaas("attest", "verify", "quote.bin", "--tcb-info", "tcb.json", "--qe-identity",
                    "qe.json", "--pcs-certs", "certs.pem", "--policy", "sim.toml", "--json",
                    cwd=tmp_path)
    return result, json.loads(result.stdout)


def test_a_revoked_quoting_enclave_is_not_up_to_date(tmp_path: Path, sim_quote) -> None:
    pki = sim_quote.pki
    result, data = _verify_pcs(tmp_path, *pki.pcs_responses(), pki.tcb_chain_pem())
    assert result.returncode == 0 and data["tcb_status"] == "UpToDate", result.stderr
    for qe_status, expected in (("Revoked", "Revoked"), ("OutOfDate", "OutOfDate")):
        result, data = _verify_pcs(tmp_path, *pki.pcs_responses(qe_tcb_status=qe_status),
                                   pki.tcb_chain_pem())
        assert result.returncode == 1 and data["status"] == "REJECTED", result.stdout
        assert data["tcb_status"] == expected
        assert data["details"]["platform_tcb_status"] == "UpToDate"
        assert data["details"]["qe_tcb_status"] == qe_status


def test_tcb_info_signed_by_a_pck_leaf_is_refused(tmp_path: Path, sim_quote) -> None:
    """The PCK key belongs to the platform being judged: it must not vouch for itself."""
    pki = sim_quote.pki
    pem = [c.public_bytes(serialization.Encoding.PEM).decode()
           for c in (pki.pck, pki.platform, pki.root)]
    for key, chain, reason in (
            (pki.pck_key, pem[0] + pem[1] + pem[2], "chain has 3 certificates"),
            (pki.platform_key, pem[1] + pem[2], "not by 'smlaas SIMULATION SGX TCB Signing'")):
        result, data = _verify_pcs(tmp_path, *pki.pcs_responses(signing_key=key), chain)
        assert result.returncode == 1 and data["status"] == "FAILED", result.stdout
        assert reason in data["error"], data["error"]


@pytest.mark.parametrize(("policy", "problem"), [
    ('allow_simulation_insecure = "false"\n', "must be a boolean"),
    ('allow_simulation_insecure = true\nallow_debug_insecure = "no"\n', "must be a boolean"),
    (SIM_OK + "[roles.stage-0]\n", "pins no measurement"),
    (SIM_OK + 'accepted_tcb_statuses = ["UpToDate", "Revoked"]\n', "'Revoked' is not"),
    (SIM_OK + "max_collateral_age_days = \"7\"\n", "positive number"),
])
def test_policies_that_would_fail_open_are_refused(tmp_path: Path, sim_quote, policy: str,
                                                   problem: str) -> None:
    (tmp_path / "policy.toml").write_text(policy)
    (tmp_path / "c.json").write_text(sim_quote.collateral_json())
    result = smlaas("attest", "verify", "quote.bin", "--collateral", "c.json", "--policy",
                    "policy.toml", "--role", "stage-0", cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert problem in result.stderr and "invalid policy" in result.stderr


def test_a_pck_certificate_minted_by_a_pck_key_is_refused(tmp_path: Path, sim_quote) -> None:
    """Whoever holds one platform's PCK key signs a "PCK certificate" of its own (any FMSPC
    or TCB level it likes) and chains it under the real one: the leaf is not a CA."""
    import datetime as dt
    from dataclasses import dataclass

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from smlaas.enclave.backends.sim import SimQuotingEnclave
    from smlaas.enclave.quote import SGX_EXTENSION_OID

    pki = sim_quote.pki
    forged_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sgx = pki.pck.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "forged PCK Certificate")])
    forged = (x509.CertificateBuilder().subject_name(name)
              .issuer_name(pki.pck.subject).public_key(forged_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(days=1))
              .not_valid_after(now + dt.timedelta(days=30))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(True, True, False, False, False, False, False, False,
                                           False), critical=True)
              .add_extension(sgx.value, critical=False)
              .sign(pki.pck_key, hashes.SHA256()))

    @dataclass
    class ForgedPKI:  # what the quoting code reads of a PKI
        pck_key: ec.EllipticCurvePrivateKey
        chain: bytes
        root_der: bytes

        def pck_chain_pem(self) -> bytes:
            return self.chain

    chain = forged.public_bytes(serialization.Encoding.PEM) + pki.pck_chain_pem()
    quoting = SimQuotingEnclave(ForgedPKI(forged_key, chain, pki.root_der))  # type: ignore[arg-type]
    (tmp_path / "quote.bin").write_bytes(quoting.quote(
        mrenclave=bytes(32), mrsigner=bytes(32), report_data=b"x"))
    result, data = _verify_pcs(tmp_path, *pki.pcs_responses(), pki.tcb_chain_pem())
    assert result.returncode == 1 and data["status"] == "FAILED", result.stdout
    assert "the PCK chain has 4 certificates" in data["error"], data["error"]
