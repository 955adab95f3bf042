"""Sealing a build: a sealed-only directory, the keyfile first, and unsealing that refuses
anything but the stage the owner's manifest commits to."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from smlaas.enclave.sealing import OwnerKeys, seal
from smlaas.errors import SealError
from smlaas.export.build_dir import read_plan
from smlaas.export.sealed_build import (
    ServingNote,
    plaintext_stages,
    sealed_directory,
    sealed_path,
    unseal_stage,
)
from tests.builds import sealed_chain_build


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, OwnerKeys]:
    build, keys, _ = sealed_chain_build(tmp_path_factory.mktemp("sealed"))
    return build, sealed_directory(build), OwnerKeys.load(keys)


def test_sealed_directory_holds_the_plan_and_sealed_stages_only(sealed) -> None:
    build, out, keys = sealed
    assert out == build / "sealed"
    plan = read_plan(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["plan.json", *(f"stage_{s.index}.sealed" for s in plan.stages)])
    assert plaintext_stages(out) == [] and plaintext_stages(build)
    assert keys.build_sha256 == hashlib.sha256((out / "plan.json").read_bytes()).hexdigest()
    note = ServingNote.of(plan)
    assert note.max_batch_size == 8 and "checked at seal time" in note.batching
    assert json.loads((out / "plan.json").read_text())["notes"]["serving"]["max_batch_size"] == 8


def test_unsealed_stage_equals_the_exported_file(sealed) -> None:
    build, out, keys = sealed
    assert unseal_stage(out, 0, keys.stage_keys[0], expected_sha256=keys.stage_sha256[0]) \
        == (build / "stage_0.onnx").read_bytes()


def test_one_changed_byte_is_refused(sealed) -> None:
    _, out, keys = sealed
    path = sealed_path(out, 0)
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    try:
        with pytest.raises(SealError, match="modified"):
            unseal_stage(out, 0, keys.stage_keys[0], expected_sha256=keys.stage_sha256[0])
    finally:
        path.write_bytes(original)


def test_another_stage_offered_is_refused(sealed) -> None:
    _, out, keys = sealed
    original = sealed_path(out, 1).read_bytes()
    sealed_path(out, 1).write_bytes(sealed_path(out, 0).read_bytes())
    try:
        with pytest.raises(SealError, match="is stage 0, expected stage 1"):
            unseal_stage(out, 1, keys.stage_keys[0], expected_sha256=keys.stage_sha256[1])
    finally:
        sealed_path(out, 1).write_bytes(original)


def test_a_stage_sealed_under_the_right_key_but_other_content_is_refused(sealed) -> None:
    """Even with the key, only the plaintext the manifest commits to is served."""
    _, out, keys = sealed
    original = sealed_path(out, 0).read_bytes()
    sealed_path(out, 0).write_bytes(seal(b"another model", key=keys.stage_keys[0], stage=0))
    try:
        with pytest.raises(SealError, match="manifest commits to"):
            unseal_stage(out, 0, keys.stage_keys[0], expected_sha256=keys.stage_sha256[0])
    finally:
        sealed_path(out, 0).write_bytes(original)


def test_keyfile_is_written_before_the_sealed_files(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from smlaas.export import sealed_build

    build, _, _ = sealed_chain_build(tmp_path / "a")
    order: list[str] = []
    real_save = OwnerKeys.save
    monkeypatch.setattr(OwnerKeys, "save", lambda self, path: (order.append("keys"),
                                                               real_save(self, path)))
    real_seal = sealed_build.seal
    monkeypatch.setattr(sealed_build, "seal", lambda *a, **k: (order.append("seal"),
                                                               real_seal(*a, **k))[1])
    sealed_build.seal_build(build, tmp_path / "k.json", out_dir=tmp_path / "out")
    assert order[0] == "keys" and "seal" in order
    assert os.stat(tmp_path / "k.json").st_mode & 0o077 == 0
