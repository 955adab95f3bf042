"""The coordinator's state, sealed to its own measurement so a restart loses nothing.

It holds the deployment CA, the coordinator's instance key (its RA-TLS key: an owner's
manifest signature is bound to it), the signed manifest, its signature, the stage keys and the
owner's latest release of that manifest.
Without a monotonic counter the host can put back an earlier sealed file (rollback): the
coordinator then holds an earlier manifest version and release, which the owner sees in
``status`` and clients refuse once they have seen a later release or the old one expired
(docs/SECURITY.md).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.ca import DeploymentCA
from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.release import SignedRelease
from smlaas.enclave.keys import spki_sha256
from smlaas.enclave.sealing import seal, unseal
from smlaas.errors import SealError, SmlaasError
from smlaas.private_files import write_private

_STATE_STAGE = 0  # the sealed-file header's stage field; the state is one object


@dataclass(frozen=True)
class CoordinatorState:
    """One immutable snapshot: a new manifest makes a new state, saved before it is used, so
    a request never sees one manifest with another's keys."""

    ca: DeploymentCA
    instance_key: ec.EllipticCurvePrivateKey
    manifest: Manifest | None = None
    manifest_signature: bytes = b""
    stage_keys: dict[int, bytes] = field(default_factory=dict)
    release: SignedRelease | None = None
    """The owner's latest release of ``manifest`` (None: none yet)."""

    @classmethod
    def create(cls) -> CoordinatorState:
        return cls(DeploymentCA.create(), ec.generate_private_key(ec.SECP256R1()))

    @property
    def instance_id(self) -> bytes:
        """SHA-256 of the instance key's SubjectPublicKeyInfo: what RA-TLS binds and what
        manifest signatures are bound to."""
        return spki_sha256(self.instance_key.public_key())

    def to_bytes(self) -> bytes:
        instance_pem = self.instance_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        return json.dumps({
            "ca_key": self.ca.key_pem().decode(), "ca_cert": self.ca.cert_pem(),
            "instance_key": instance_pem,
            "manifest": self.manifest.to_json() if self.manifest else None,
            "manifest_signature": base64.b64encode(self.manifest_signature).decode(),
            "stage_keys": {str(k): base64.b64encode(v).decode()
                           for k, v in self.stage_keys.items()},
            "release": self.release.to_dict() if self.release else None}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CoordinatorState:
        try:
            raw = json.loads(data)
            key = serialization.load_pem_private_key(raw["instance_key"].encode(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise TypeError("the instance key is not an EC key")
            return cls(DeploymentCA.from_pem(raw["ca_key"].encode(), raw["ca_cert"].encode()),
                       key, Manifest.from_json(raw["manifest"]) if raw["manifest"] else None,
                       base64.b64decode(raw["manifest_signature"]),
                       {int(k): base64.b64decode(v) for k, v in raw["stage_keys"].items()},
                       SignedRelease.from_dict(raw["release"]) if raw.get("release") else None)
        except (ValueError, KeyError, TypeError, SmlaasError) as err:
            raise SealError(f"the coordinator's sealed state is of another format: {err}; "
                            f"start with a new --state file") from err


class SealedStateStore:
    """One sealed file; written atomically (0600)."""

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
        write_private(self.path, seal(state.to_bytes(), key=self._key, stage=_STATE_STAGE))
