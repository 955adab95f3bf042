"""Measurements of simulated enclaves: what MRENCLAVE and MRSIGNER would be.

A real SGX MRENCLAVE hashes the enclave's initial pages; under Gramine those include the
manifest and, through trusted-file hashes, every file the enclave may load. The simulation
follows the same idea: MRENCLAVE is SHA-256 over every file of the installed smlaas package
(sorted by path) and the role's configuration, so changed code or configuration changes the
measurement. MRSIGNER identifies the signer (one fixed simulated signing key).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import smlaas

SIM_MRSIGNER = hashlib.sha256(b"smlaas simulated enclave signer v1").digest()
_MEASURED_SUFFIXES = (".py", ".toml", ".json")


@dataclass(frozen=True)
class Measurement:
    mrenclave: bytes
    mrsigner: bytes
    role: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "mrenclave": self.mrenclave.hex(),
                "mrsigner": self.mrsigner.hex()}


@lru_cache(maxsize=1)
def package_digest() -> bytes:
    """SHA-256 over the installed smlaas package's files, paths included."""
    root = Path(smlaas.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in _MEASURED_SUFFIXES):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.digest()


def measure(role: str, config: Mapping[str, Any] | None = None) -> Measurement:
    """The measurement a simulated enclave for ``role`` with ``config`` has."""
    canonical = json.dumps({"role": role, "config": dict(config or {})}, sort_keys=True,
                           separators=(",", ":")).encode()
    mrenclave = hashlib.sha256(package_digest() + hashlib.sha256(canonical).digest()).digest()
    return Measurement(mrenclave=mrenclave, mrsigner=SIM_MRSIGNER, role=role)
