"""A coordinator, its owner and its registrants for tests (sim backend, one PKI dir)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from smlaas.coordinator.client import CoordinatorClient, coordinator_policy
from smlaas.coordinator.manifest import Manifest, StageCommitment, key_commitment
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import Code
from smlaas.coordinator.server import CoordinatorServer
from smlaas.enclave import INTEL_ROOT
from smlaas.enclave.backends.sim import SimBackend
from smlaas.errors import CoordinatorRefused
from smlaas.roles import CoordinatorSpec


@dataclass
class Ceremony:
    """The owner's key and stage keys, and sim enclaves for every role, on one PKI."""

    pki_dir: Path
    owner: OwnerKey = field(default_factory=OwnerKey.create)
    stage_keys: dict[int, bytes] = field(default_factory=lambda: {0: os.urandom(32)})
    stage_sha256: dict[int, str] = field(
        default_factory=lambda: {0: hashlib.sha256(b"stage 0").hexdigest()})

    def coordinator_backend(self, owner: OwnerKey | None = None) -> SimBackend:
        spec = CoordinatorSpec(backend="sim",
                               owner_public_key=(owner or self.owner).public_key_hex)
        return SimBackend("coordinator", config=spec.measured_config(), pki_dir=self.pki_dir)

    def start(self, state: Path, *, owner: OwnerKey | None = None) -> CoordinatorServer:
        return CoordinatorServer(self.coordinator_backend(owner), state,
                                 owner_public_key=(owner or self.owner).public_key_hex).start()

    def client(self, server: CoordinatorServer, *, owner: OwnerKey | None = None
               ) -> CoordinatorClient:
        backend = self.coordinator_backend(owner)
        return CoordinatorClient(*server.address, roots=[INTEL_ROOT, backend.trusted_root],
                                 policy=coordinator_policy(
                                     backend.measurement.mrenclave.hex(), simulated=True))

    def enclave(self, role: str, **config: object) -> SimBackend:
        """A registrant; any extra ``config`` changes its measurement (other code)."""
        return SimBackend(role, config={"test": True, **config}, pki_dir=self.pki_dir)

    def manifest(self, *, version: int = 1, policy: dict | None = None) -> Manifest:
        roles = ["gateway", *(f"stage-{k}" for k in sorted(self.stage_keys))]
        return Manifest(
            version=version,
            policy=policy or {"allow_simulation_insecure": True, "roles": {
                role: {"mrenclave": [self.enclave(role).measurement.mrenclave.hex()]}
                for role in roles}},
            topology=tuple(roles),
            stages={k: StageCommitment(key_commitment(k, key), self.stage_sha256[k])
                    for k, key in self.stage_keys.items()})

    def set_manifest(self, client: CoordinatorClient, manifest: Manifest | None = None) -> str:
        return client.set_manifest(manifest or self.manifest(), owner=self.owner,
                                   stage_keys=self.stage_keys)


class refused:  # noqa: N801 - used like pytest.raises
    """``with refused(Code.X): ...`` expects CoordinatorRefused with that code."""

    def __init__(self, code: Code) -> None:
        self.code = code
        self.error: CoordinatorRefused | None = None

    def __enter__(self) -> refused:
        return self

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> bool:
        assert isinstance(error, CoordinatorRefused), f"expected a {self.code} refusal, " \
                                                      f"got {error!r}"
        assert error.code == self.code.value, f"expected {self.code}, got {error.code}: {error}"
        self.error = error
        return True
