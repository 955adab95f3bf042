"""The owner's release: which manifest is the owner's *current* decision, until when.

A manifest says what may run; a release says which manifest clients should accept now. The
owner signs it over its canonical form (:func:`~smlaas.coordinator.protocol.bound` with its
own label): the coordinator instance it is for (SHA-256 of its RA-TLS key) and that
coordinator's MRENCLAVE and address, the manifest's digest and version, an issue time and an
expiry at most :data:`MAX_VALIDITY_S` later. The coordinator keeps the latest release of the
manifest it holds, the gateway staples it to its evidence, and a client accepts a gateway only
under an unexpired release signed by the owner key it was configured with, for the manifest
the gateway was admitted under, whose version is at least the highest it has seen
(:mod:`smlaas.client.release_check`).

Without a monotonic counter a host can restore an earlier sealed coordinator state, which
holds an earlier release: a client that has seen nothing newer accepts it until it expires.
The expiry bounds that window (docs/SECURITY.md).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.protocol import bound
from smlaas.errors import ReleaseError

RELEASE_LABEL = b"smlaas owner release v1"
MAX_VALIDITY_S = 24 * 3600
"""A release is valid for at most a day: the longest a rolled-back deployment can be accepted
by a client that has seen nothing newer."""
DEFAULT_VALIDITY_S = MAX_VALIDITY_S
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = ("owner", "coordinator_instance", "coordinator_mrenclave", "coordinator_address",
           "manifest_digest", "version", "issued_at", "expires_at")


@dataclass(frozen=True)
class Release:
    owner: str
    """Fingerprint of the owner key that signs it."""
    coordinator_instance: str
    """SHA-256 (hex) of the coordinator instance's RA-TLS key."""
    coordinator_mrenclave: str
    coordinator_address: str
    """HOST:PORT where clients can ask the coordinator for the current release ('' = none)."""
    manifest_digest: str
    version: int
    issued_at: int
    """Unix seconds."""
    expires_at: int

    def validate(self) -> list[str]:
        problems = [f"{name} must be a string" for name in ("owner", "coordinator_address")
                    if not isinstance(getattr(self, name), str)]
        for name in ("coordinator_instance", "coordinator_mrenclave", "manifest_digest"):
            if not _HEX64.match(str(getattr(self, name))):
                problems.append(f"{name} is not 64 lower-case hex digits")
        for name in ("version", "issued_at", "expires_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if not problems:
            if self.version < 1:
                problems.append(f"version must be >= 1, got {self.version}")
            validity = self.expires_at - self.issued_at
            if not 0 < validity <= MAX_VALIDITY_S:
                problems.append(f"a release is valid for 1 s to {MAX_VALIDITY_S} s, this one "
                                f"for {validity} s")
        return problems

    def to_json(self) -> str:
        """The canonical form: sorted keys, no whitespace."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Release:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or set(data) != set(_FIELDS):
                raise ValueError(f"a release has exactly the fields {', '.join(_FIELDS)}")
            release = cls(**{name: data[name] for name in _FIELDS})
        except (ValueError, TypeError, RecursionError) as err:
            raise ReleaseError(f"not an owner release: {err}") from err
        problems = release.validate()
        if problems:
            raise ReleaseError("invalid owner release: " + "; ".join(problems))
        return release

    def signing_payload(self) -> bytes:
        return bound(RELEASE_LABEL, self.to_json().encode())

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def describe(self) -> str:
        return (f"release v{self.version} of manifest {self.manifest_digest[:16]} "
                f"(expires {self.expires_at})")


@dataclass(frozen=True)
class SignedRelease:
    release: Release
    signature: bytes
    """DER ECDSA-SHA256 over :meth:`Release.signing_payload`."""

    def to_dict(self) -> dict[str, str]:
        return {"release": self.release.to_json(),
                "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_dict(cls, data: Any) -> SignedRelease:
        """Parses (not verifies); ReleaseError if malformed."""
        try:
            if not isinstance(data, dict):
                raise TypeError("a signed release is an object {release, signature}")
            text, signature = data["release"], data["signature"]
            if not isinstance(text, str) or not isinstance(signature, str):
                raise TypeError("release and signature must be strings")
            return cls(Release.from_json(text), base64.b64decode(signature, validate=True))
        except (KeyError, TypeError, binascii.Error) as err:
            raise ReleaseError(f"the owner release is malformed: {err}") from err

    def verify(self, owner_public_key: ec.EllipticCurvePublicKey) -> Release:
        """The release, if the owner key signed it; ReleaseError otherwise."""
        try:
            owner_public_key.verify(self.signature, self.release.signing_payload(),
                                    ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise ReleaseError("the release is not signed by the owner key this client "
                               "trusts (forged, altered, or another owner's)") from None
        return self.release


def sign_release(private_key: ec.EllipticCurvePrivateKey, release: Release) -> SignedRelease:
    problems = release.validate()
    if problems:
        raise ReleaseError("invalid owner release: " + "; ".join(problems))
    return SignedRelease(release, private_key.sign(release.signing_payload(),
                                                   ec.ECDSA(hashes.SHA256())))
