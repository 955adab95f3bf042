"""The evidence receipts refer to, fetched once per deployment (``GET /v2/smlaas/evidence``).

For every role replica that signs receipts: its receipt public key, its key id, and a quote
whose report_data binds that key to the role, the replica and the manifest
(:func:`receipt_binding`), with the collateral to verify it; beside them the owner's manifest
(canonical JSON: its digest is what every receipt names, its policy says which measurement
each role must have) and the owner's signed release. Encoded as one CBOR map.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from smlaas.coordinator.protocol import bound
from smlaas.enclave.attestation import RefreshedEvidence
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.errors import ReceiptError
from smlaas.receipts.cose import ReceiptKey, key_id

RECEIPT_KEY_LABEL = b"smlaas receipt key v1"
FORMAT = 1


def receipt_binding(role: str, replica: int, public_key_raw: bytes,
                    manifest_digest: str) -> bytes:
    """What a role's quote carries in its report_data for its receipt key (32 bytes)."""
    return hashlib.sha256(bound(RECEIPT_KEY_LABEL, role.encode(), str(replica).encode(),
                                public_key_raw, bytes.fromhex(manifest_digest))).digest()


@dataclass(frozen=True)
class KeyEvidence:
    role: str
    replica: int
    public_key: bytes
    quote: bytes
    collateral: str
    """JSON, as dcap-qvl reads it."""
    simulated: bool
    sim_root: bytes | None = None
    """The simulation's root certificate (DER) for a simulated quote; None on hardware."""

    @property
    def kid(self) -> bytes:
        return key_id(self.public_key)

    def to_cbor(self) -> dict[str, Any]:
        return {"role": self.role, "replica": self.replica, "public_key": self.public_key,
                "quote": self.quote, "collateral": self.collateral,
                "simulated": self.simulated, "sim_root": self.sim_root}

    @classmethod
    def from_cbor(cls, data: Any) -> KeyEvidence:
        if not isinstance(data, dict):
            raise TypeError("a key's evidence is a map")
        root = data.get("sim_root")
        values = (data["role"], data["replica"], data["public_key"], data["quote"],
                  data["collateral"], data["simulated"])
        types = (str, int, bytes, bytes, str, bool)
        if not all(isinstance(v, t) for v, t in zip(values, types)) or \
                not (root is None or isinstance(root, bytes)):
            raise TypeError("a key's evidence has a field of the wrong type")
        return cls(*values, sim_root=root)


def key_evidence(backend: EnclaveBackend, key: ReceiptKey, *, role: str, replica: int,
                 manifest_digest: str) -> KeyEvidence:
    """This enclave's evidence for its receipt key (one quote, made at start)."""
    quote = backend.quote(receipt_binding(role, replica, key.public_raw, manifest_digest))
    root = backend.trusted_root.der if backend.simulated else None
    return KeyEvidence(role, replica, key.public_raw, quote, backend.collateral_json(),
                       backend.simulated, root)


class KeyEvidenceSource(RefreshedEvidence[KeyEvidence]):
    """A role's current receipt key evidence, its quote remade as it ages: a verifier checks
    the collateral's age at a receipt's signing time, which a quote made once at start would
    fail after a week."""

    def __init__(self, backend: EnclaveBackend, key: ReceiptKey, *, role: str, replica: int,
                 manifest_digest: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(lambda: key_evidence(backend, key, role=role, replica=replica,
                                              manifest_digest=manifest_digest), clock=clock)


def key_evidence_to_json(evidence: KeyEvidence) -> dict[str, Any]:
    """The form a stage reports it in to the gateway (JSON)."""
    data = evidence.to_cbor()
    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v
            for k, v in data.items()}


def key_evidence_from_json(data: Any) -> KeyEvidence:
    if not isinstance(data, dict):
        raise TypeError("a key's evidence is an object")
    decoded = {k: base64.b64decode(v) if k in ("public_key", "quote", "sim_root") and
               isinstance(v, str) else v for k, v in data.items()}
    return KeyEvidence.from_cbor(decoded)


@dataclass(frozen=True)
class EvidenceBundle:
    manifest_json: str
    release: Mapping[str, Any] | None
    """The owner's signed release as :meth:`SignedRelease.to_dict` writes it."""
    keys: tuple[KeyEvidence, ...]

    def encode(self) -> bytes:
        return cbor2.dumps({"smlaas_evidence": FORMAT, "manifest": self.manifest_json,
                            "release": None if self.release is None else dict(self.release),
                            "keys": [k.to_cbor() for k in self.keys]}, canonical=True)

    @classmethod
    def decode(cls, data: bytes) -> EvidenceBundle:
        """ReceiptError if ``data`` is not an evidence bundle."""
        try:
            bundle = cbor2.loads(data)
            if not isinstance(bundle, dict) or bundle.get("smlaas_evidence") != FORMAT:
                raise ValueError("not an smlaas evidence bundle (format 1)")
            release = bundle["release"]
            if not isinstance(bundle["manifest"], str) or \
                    not (release is None or isinstance(release, dict)) or \
                    not isinstance(bundle["keys"], list):
                raise TypeError("manifest, release or keys of the wrong type")
            return cls(bundle["manifest"], release,
                       tuple(KeyEvidence.from_cbor(k) for k in bundle["keys"]))
        except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError) as err:
            raise ReceiptError(f"the evidence is malformed: {err}") from err

    def key(self, kid: bytes) -> KeyEvidence | None:
        return next((k for k in self.keys if k.kid == kid), None)
