"""A sealed stage on disk, opened inside the enclave with the key the coordinator released."""

from __future__ import annotations

import hashlib
from pathlib import Path

from smlaas.enclave.sealing import unseal
from smlaas.errors import SealError


def sealed_path(sealed_dir: Path, stage: int) -> Path:
    return Path(sealed_dir) / f"stage_{stage}.sealed"


def unseal_stage(sealed_dir: Path, stage: int, key: bytes, *, expected_sha256: str) -> bytes:
    """The plaintext ONNX bytes of one sealed stage, checked against the SHA-256 the owner's
    manifest commits to (SealError if anything is off)."""
    plaintext = unseal(sealed_path(sealed_dir, stage).read_bytes(), key=key, stage=stage)
    actual = hashlib.sha256(plaintext).hexdigest()
    if actual != expected_sha256:
        raise SealError(f"stage {stage} unseals to SHA-256 {actual[:16]}..., the owner's "
                        f"manifest commits to {expected_sha256[:16]}... (another sub-model); "
                        f"refusing to serve it")
    return plaintext
