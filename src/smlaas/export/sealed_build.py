"""Sealing a build directory's stages for deployment: ``BUILD/sealed/stage_<k>.sealed``."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from smlaas.enclave.sealing import KEY_BYTES, OwnerKeys, seal, unseal
from smlaas.errors import BuildDirError
from smlaas.export.build_dir import PLAN_FILE, read_plan, stage_paths

logger = logging.getLogger(__name__)
SEALED_DIR = "sealed"


def sealed_path(build_dir: Path, stage: int) -> Path:
    return Path(build_dir) / SEALED_DIR / f"stage_{stage}.sealed"


def seal_build(build_dir: Path, keys_path: Path) -> OwnerKeys:
    """Seals every stage with a fresh random key; writes the sealed files and the keyfile."""
    plan = read_plan(build_dir)
    paths = stage_paths(build_dir, plan)
    if any(p.with_name(p.name + ".data").exists() for p in paths):
        raise BuildDirError("stages with external weight files cannot be sealed yet")
    build_sha256 = hashlib.sha256((Path(build_dir) / PLAN_FILE).read_bytes()).hexdigest()
    keys = OwnerKeys(build_sha256, {s.index: os.urandom(KEY_BYTES) for s in plan.stages})
    out = Path(build_dir) / SEALED_DIR
    out.mkdir(exist_ok=True)
    for stage, path in zip(plan.stages, paths):
        sealed_path(build_dir, stage.index).write_bytes(
            seal(path.read_bytes(), key=keys.stage_keys[stage.index], stage=stage.index))
    keys.save(Path(keys_path))
    logger.info("sealed %d stage(s) of %s", len(plan.stages), build_dir)
    return keys


def unseal_stage(build_dir: Path, stage: int, key: bytes) -> bytes:
    """The plaintext ONNX bytes of one sealed stage (SealError if anything is off)."""
    return unseal(sealed_path(build_dir, stage).read_bytes(), key=key, stage=stage)
