"""Simulated quotes go through the same verifier as real ones, and are refused by default."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from smlaas.enclave import DEFAULT_POLICY, Policy, verify_quote
from smlaas.enclave.backends.sim import SimQuotingEnclave
from smlaas.enclave.measurement import measure
from smlaas.enclave.sim_pki import SimulationPKI
from smlaas.errors import PolicyError

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimulationPKI:
    return SimulationPKI.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def enclave(pki: SimulationPKI) -> SimQuotingEnclave:
    return SimQuotingEnclave(pki)


def _quote(enclave: SimQuotingEnclave, **overrides) -> bytes:
    m = measure("stage-0")
    args = {"mrenclave": m.mrenclave, "mrsigner": m.mrsigner, "report_data": b"binding"}
    return enclave.quote(**(args | overrides))


def test_sim_quote_verifies_against_the_simulation_root(pki, enclave) -> None:
    verdict = verify_quote(_quote(enclave), pki.collateral(), at=NOW, root=enclave.trusted_root)
    assert verdict.verified, verdict.error
    assert verdict.tcb_status == "UpToDate" and verdict.simulated
    assert verdict.mrenclave == measure("stage-0").mrenclave.hex()


def test_default_policy_refuses_simulation_and_says_so(pki, enclave) -> None:
    verdict = verify_quote(_quote(enclave), pki.collateral(), at=NOW, root=enclave.trusted_root)
    with pytest.raises(PolicyError, match="SIMULATION quote"):
        DEFAULT_POLICY.check(verdict)
    Policy(allow_simulation_insecure=True).check(verdict)


def test_sim_quote_is_refused_against_intel_root(pki, enclave) -> None:
    verdict = verify_quote(_quote(enclave), pki.collateral(), at=NOW)
    assert not verdict.verified and "not the trusted Intel SGX Root CA" in verdict.error


def test_tampered_sim_quote_fails(pki, enclave) -> None:
    raw = bytearray(_quote(enclave))
    raw[48 + 64] ^= 0x01  # MRENCLAVE
    verdict = verify_quote(bytes(raw), pki.collateral(), at=NOW, root=enclave.trusted_root)
    assert not verdict.verified


def test_expired_sim_collateral_fails(pki, enclave) -> None:
    verdict = verify_quote(_quote(enclave), pki.collateral(now=NOW - dt.timedelta(days=60)),
                           at=NOW, root=enclave.trusted_root)
    assert not verdict.verified and "expired" in verdict.error.lower()


def test_debug_sim_enclave_is_refused(pki, enclave) -> None:
    verdict = verify_quote(_quote(enclave, debug=True), pki.collateral(), at=NOW,
                           root=enclave.trusted_root)
    if verdict.verified:  # dcap-qvl may leave the debug decision to the policy
        with pytest.raises(PolicyError, match="^simulation:|^debug:"):
            Policy(allow_simulation_insecure=True).check(verdict)
    else:
        assert "debug" in verdict.error.lower()


def test_pki_persists_across_loads(tmp_path: Path) -> None:
    first = SimulationPKI.load_or_create(tmp_path / "pki")
    again = SimulationPKI.load_or_create(tmp_path / "pki")
    assert first.root_der == again.root_der
    assert oct((tmp_path / "pki" / "root.key").stat().st_mode & 0o777) == "0o600"


def test_measurement_depends_on_role_and_config() -> None:
    assert measure("stage-0").mrenclave != measure("stage-1").mrenclave
    assert measure("stage-0", {"threads": 2}).mrenclave != measure("stage-0").mrenclave
    assert measure("stage-0").mrenclave == measure("stage-0").mrenclave
