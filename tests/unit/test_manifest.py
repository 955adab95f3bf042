"""The manifest as data: its digest commits to every field, it round-trips, and it fails
closed on malformed input."""

from __future__ import annotations

import dataclasses

import pytest

from smlaas.coordinator.manifest import Manifest, StageCommitment, key_commitment
from smlaas.enclave.policy import Policy
from smlaas.errors import ConfigError

MR = "11" * 32


def manifest(**changes: object) -> Manifest:
    base = Manifest(version=1, policy={"allow_simulation_insecure": True, "roles": {
        "gateway": {"mrenclave": [MR]}, "stage-0": {"mrenclave": [MR]}}},
        topology=("gateway", "stage-0"),
        stages={0: StageCommitment(key_commitment(0, b"k" * 32), "22" * 32)})
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    {"version": 2},
    {"stages": {0: StageCommitment(key_commitment(0, b"K" * 32), "22" * 32)}},
    {"stages": {0: StageCommitment(key_commitment(0, b"k" * 32), "33" * 32)}},
    {"policy": {"allow_simulation_insecure": True, "max_collateral_age_days": 1, "roles": {
        "gateway": {"mrenclave": [MR]}, "stage-0": {"mrenclave": [MR]}}}},
    {"max_batch_size": 8},
    {"replicas": {0: 2}},
    {"collateral": {"pccs_url": "https://pccs.example/sgx/certification/v4/"}},
])
def test_the_digest_covers_every_field(change: dict) -> None:
    changed = manifest(**change)
    assert changed.digest() != manifest().digest()
    assert Manifest.from_json(changed.to_json()) == changed


def test_commitments_are_bound_to_the_stage_and_hide_the_key() -> None:
    key = b"k" * 32
    assert key_commitment(0, key) != key_commitment(1, key)
    assert key.hex() not in manifest().to_json()


@pytest.mark.parametrize(("text", "problem"), [
    ('{"format": 2}', "not a deployment manifest"),
    ("[" * 100_000, "not a deployment manifest"),
])
def test_malformed_text_is_a_config_error(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Manifest.from_json(text)


def test_invalid_manifests_list_every_problem() -> None:
    bad = manifest(version=0, topology=("gateway", "stage-1"), max_batch_size=-1,
                   replicas={0: 0, 5: 2})
    problems = bad.validate()
    assert any("stage 0 replicas must be an integer >= 1" in p for p in problems)
    assert any("replicas name stage 5" in p for p in problems)
    assert any("version" in p for p in problems)
    assert any("numbered 0..0" in p for p in problems)
    assert any("max_batch_size" in p for p in problems)


def test_an_explicit_null_never_switches_the_age_limit_off() -> None:
    with pytest.raises(ConfigError, match="max_collateral_age_days must be a positive number"):
        Policy.from_dict({"max_collateral_age_days": None})
    assert Policy.from_dict({}).max_collateral_age_days == 7.0
