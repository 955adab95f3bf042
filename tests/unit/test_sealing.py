from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from smlaas.enclave.sealing import KEY_BYTES, MAGIC, OwnerKeys, seal, unseal
from smlaas.errors import ConfigError, SealError

KEY = bytes(range(KEY_BYTES))
PAYLOAD = b"onnx model bytes " * 1000


def test_round_trip() -> None:
    assert unseal(seal(PAYLOAD, key=KEY, stage=2), key=KEY, stage=2) == PAYLOAD


def test_ciphertext_hides_the_plaintext_and_is_fresh() -> None:
    first, second = seal(PAYLOAD, key=KEY, stage=0), seal(PAYLOAD, key=KEY, stage=0)
    assert b"onnx model bytes" not in first
    assert first != second  # fresh nonce each time


@pytest.mark.parametrize("where", ["header", "nonce", "body", "tag"])
def test_any_changed_byte_is_refused(where: str) -> None:
    sealed = bytearray(seal(PAYLOAD, key=KEY, stage=1))
    header_end = sealed.index(b"}") + 1
    offset = {"header": header_end - 5, "nonce": header_end + 3,
              "body": header_end + 500, "tag": len(sealed) - 1}[where]
    sealed[offset] ^= 0x01
    with pytest.raises(SealError, match="modified|unreadable|wrong key|stage"):
        unseal(bytes(sealed), key=KEY, stage=1)


def test_body_change_says_modified() -> None:
    sealed = bytearray(seal(PAYLOAD, key=KEY, stage=1))
    sealed[-100] ^= 0x80
    with pytest.raises(SealError, match="sealed stage 1 was modified"):
        unseal(bytes(sealed), key=KEY, stage=1)


def test_swapped_stage_and_wrong_key_are_named() -> None:
    sealed = seal(PAYLOAD, key=KEY, stage=1)
    with pytest.raises(SealError, match="is stage 1, expected stage 2"):
        unseal(sealed, key=KEY, stage=2)
    with pytest.raises(SealError, match="wrong key"):
        unseal(sealed, key=os.urandom(KEY_BYTES), stage=1)
    with pytest.raises(SealError, match="bad magic"):
        unseal(b"PLAINONNX" + sealed[len(MAGIC):], key=KEY, stage=1)


def test_keyfile_round_trip_and_mode(tmp_path: Path) -> None:
    keys = OwnerKeys("ab" * 32, {0: KEY, 1: os.urandom(KEY_BYTES)}, {0: "cd" * 32, 1: "ef" * 32})
    path = tmp_path / "owner.keys"
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert OwnerKeys.load(path) == keys


def test_keyfile_over_a_world_readable_file_ends_up_0600(tmp_path: Path) -> None:
    path = tmp_path / "owner.keys"
    path.write_text("old")
    path.chmod(0o644)
    OwnerKeys("ab" * 32, {0: KEY}, {0: "cd" * 32}).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert OwnerKeys.load(path).stage_keys == {0: KEY}
    assert not [p for p in tmp_path.iterdir() if p.name != "owner.keys"]  # no temp left


def test_keyfile_of_the_old_format_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "old.keys"
    path.write_text('{"format": 1, "build_sha256": "ab", "stages": {"0": "AAAA"}}')
    with pytest.raises(ConfigError, match="seal the build again"):
        OwnerKeys.load(path)
