"""The coordinator's state, sealed to its own measurement so a restart loses nothing."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from smlaas.coordinator.ca import DeploymentCA
from smlaas.coordinator.manifest import Manifest
from smlaas.enclave.sealing import seal, unseal

_STATE_STAGE = 0  # the sealed-file header's stage field; the state is one object


@dataclass
class CoordinatorState:
    ca: DeploymentCA
    manifest: Manifest | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({"ca_key": self.ca.key_pem().decode(), "ca_cert": self.ca.cert_pem(),
                           "manifest": self.manifest.to_json() if self.manifest else None}
                          ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CoordinatorState:
        raw = json.loads(data)
        manifest = Manifest.from_json(raw["manifest"]) if raw["manifest"] else None
        return cls(DeploymentCA.from_pem(raw["ca_key"].encode(), raw["ca_cert"].encode()),
                   manifest)


class SealedStateStore:
    """One sealed file; written atomically."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = Path(path)
        self._key = key

    def load(self) -> CoordinatorState | None:
        if not self.path.is_file():
            return None
        return CoordinatorState.from_bytes(unseal(self.path.read_bytes(), key=self._key,
                                                  stage=_STATE_STAGE))

    def save(self, state: CoordinatorState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(seal(state.to_bytes(), key=self._key, stage=_STATE_STAGE))
        tmp.replace(self.path)
