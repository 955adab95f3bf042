"""The owner's release, the client's check of it, replica slots and remembered versions, as
pure logic (no sockets): every way a release can fail to be the owner's current one."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smlaas.client.release_check import ReleaseCheck, owner_public_key_text
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import Code
from smlaas.coordinator.release import MAX_VALIDITY_S, Release, SignedRelease, sign_release
from smlaas.coordinator.slots import SlotTable
from smlaas.errors import ConfigError, CoordinatorRefused, ReleaseError
from smlaas.version_memory import VersionMemory

NOW = 1_800_000_000
DIGEST_A, DIGEST_B = "aa" * 32, "bb" * 32


def _release(owner: OwnerKey, *, version: int = 1, digest: str = DIGEST_A, issued: int = NOW,
             validity: int = 3600) -> SignedRelease:
    return sign_release(owner.private_key, Release(
        owner=owner.fingerprint, coordinator_instance="cc" * 32,
        coordinator_mrenclave="dd" * 32, coordinator_address="", manifest_digest=digest,
        version=version, issued_at=issued, expires_at=issued + validity))


def _check(owner: OwnerKey, tmp_path: Path, now: float = NOW + 10) -> ReleaseCheck:
    return ReleaseCheck(owner.public_key_hex, roots=[], memory=VersionMemory(
        tmp_path / "seen.json"), clock=lambda: now)


def test_a_current_release_passes_and_is_remembered(tmp_path: Path) -> None:
    owner = OwnerKey.create()
    check = _check(owner, tmp_path)
    release = check.check(_release(owner).to_dict(), admitted_manifest=DIGEST_A, simulated=True)
    assert release.version == 1
    assert check.memory.highest(f"{owner.fingerprint}/{'cc' * 32}") == 1


@pytest.mark.parametrize("case, match", [
    ("none", "staples no owner release"),
    ("other owner", "not signed by the owner key"),
    ("altered", "not signed by the owner key"),
    ("expired", "expired"),
    ("other manifest", "not the owner's current deployment"),
    ("garbage", "malformed"),
])
def test_releases_that_are_not_the_owners_current_one_are_refused(tmp_path: Path, case: str,
                                                                  match: str) -> None:
    owner = OwnerKey.create()
    stapled: object = _release(owner).to_dict()
    if case == "none":
        stapled = None
    elif case == "other owner":
        stapled = _release(OwnerKey.create()).to_dict()
    elif case == "altered":
        data = json.loads(_release(owner).to_dict()["release"])
        data["version"] = 9
        stapled = {**_release(owner).to_dict(), "release": json.dumps(data)}
    elif case == "expired":
        stapled = _release(owner, issued=NOW - 7200).to_dict()
    elif case == "other manifest":
        stapled = _release(owner, digest=DIGEST_B).to_dict()
    elif case == "garbage":
        stapled = {"release": 1, "signature": []}
    with pytest.raises(ReleaseError, match=match):
        _check(owner, tmp_path).check(stapled, admitted_manifest=DIGEST_A, simulated=True)


def test_a_client_never_goes_back_to_a_lower_version(tmp_path: Path) -> None:
    owner = OwnerKey.create()
    check = _check(owner, tmp_path)
    check.check(_release(owner, version=3, digest=DIGEST_B).to_dict(),
                admitted_manifest=DIGEST_B, simulated=True)
    with pytest.raises(ReleaseError, match="v3 is current"):
        check.check(_release(owner, version=2).to_dict(), admitted_manifest=DIGEST_A,
                    simulated=True)
    # ...across runs: the memory is a file.
    with pytest.raises(ReleaseError, match="v3 is current"):
        _check(owner, tmp_path).check(_release(owner, version=1).to_dict(),
                                      admitted_manifest=DIGEST_A, simulated=True)


def test_two_manifests_under_one_version_are_refused(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator answers with a release of the same version but another manifest (the
    owner lost its memory of signed versions): neither is accepted."""
    owner = OwnerKey.create()
    check = _check(owner, tmp_path)
    other = _release(owner, digest=DIGEST_B).release
    monkeypatch.setattr(check, "_coordinator_release", lambda release, simulated: other)
    with pytest.raises(ReleaseError, match="two manifests under one version"):
        check.check(_release(owner).to_dict(), admitted_manifest=DIGEST_A, simulated=True)


def test_a_release_is_valid_for_at_most_a_day() -> None:
    owner = OwnerKey.create()
    with pytest.raises(ReleaseError, match="valid for 1 s to"):
        _release(owner, validity=MAX_VALIDITY_S + 1)
    with pytest.raises(ReleaseError, match="exactly the fields"):
        Release.from_json('{"version": 1}')


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8)),
                       max_size=9))
def test_any_json_object_is_a_release_or_a_release_error(data: dict) -> None:
    with contextlib.suppress(ReleaseError):
        Release.from_json(json.dumps(data))


def test_owner_public_key_from_hex_or_file(tmp_path: Path) -> None:
    owner = OwnerKey.create()
    (tmp_path / "owner.pub").write_text(owner.public_key_hex + "\n")
    assert owner_public_key_text(tmp_path / "owner.pub") == owner.public_key_hex
    assert owner_public_key_text(owner.public_key_hex.upper()) == owner.public_key_hex
    with pytest.raises(ConfigError, match="owner public key"):
        owner_public_key_text(tmp_path / "missing.pub")


def test_slots_bound_the_holders_to_the_manifests_replicas() -> None:
    slots = SlotTable()
    first = slots.claim("stage-1", 0, capacity=2, manifest_digest=DIGEST_A)
    slots.claim("stage-1", 1, capacity=2, manifest_digest=DIGEST_A)
    for slot, code in ((0, Code.SLOT_TAKEN), (1, Code.SLOT_TAKEN), (2, Code.NO_SLOT),
                       (-1, Code.NO_SLOT), ("0", Code.NO_SLOT), (True, Code.NO_SLOT)):
        with pytest.raises(CoordinatorRefused) as refused:
            slots.claim("stage-1", slot, capacity=2, manifest_digest=DIGEST_A)  # type: ignore[arg-type]
        assert refused.value.code == code.value, slot
    slots.free(first)  # its connection closed: a restart takes the slot at once
    again = slots.claim("stage-1", 0, capacity=2, manifest_digest=DIGEST_A)
    slots.free(first)  # a stale free of the old lease does not free the new holder
    assert slots.held() == {"stage-1": [0, 1]}
    assert slots.revoke_all_but(DIGEST_B) == 2 and again.revoked.is_set()
    assert slots.held() == {}


def test_version_memory_only_grows(tmp_path: Path) -> None:
    memory = VersionMemory(tmp_path / "v.json")
    assert memory.highest("k") == 0
    assert memory.record("k", 3) == 3 and memory.record("k", 2) == 3
    assert VersionMemory(tmp_path / "v.json").highest("k") == 3
    (tmp_path / "v.json").write_text("{")
    with pytest.raises(ConfigError, match="unreadable"):
        memory.highest("k")
