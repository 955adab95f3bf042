"""The model owner's identity: an ECDSA P-256 signing key whose public half is part of the
coordinator's measured configuration, so that a coordinator obeys one owner only.

The owner signs each manifest for one coordinator instance (:func:`manifest_signing_payload`:
the manifest's digest and the SHA-256 of the coordinator's RA-TLS public key), so a signed
manifest can be neither altered nor replayed to another coordinator.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.protocol import Code, manifest_signing_payload, refusal, spki_der
from smlaas.errors import ConfigError
from smlaas.private_files import write_private

OWNER_KEY_ENV = "SMLAAS_OWNER_KEY"


def default_owner_key_path() -> Path:
    """``$SMLAAS_OWNER_KEY``, else ``~/.config/smlaas/owner.key``."""
    override = os.environ.get(OWNER_KEY_ENV)
    if override:
        return Path(override)
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "smlaas" / "owner.key"


@dataclass(frozen=True)
class OwnerKey:
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> OwnerKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_key_hex(self) -> str:
        """The public key as hex SubjectPublicKeyInfo DER: what the coordinator is
        configured (and measured) with."""
        return spki_der(self.private_key.public_key()).hex()

    @property
    def fingerprint(self) -> str:
        return public_key_fingerprint(self.public_key_hex)

    def sign_manifest(self, manifest_digest: str, coordinator_key_sha256: bytes) -> bytes:
        """DER ECDSA-SHA256 over :func:`manifest_signing_payload`."""
        return self.private_key.sign(
            manifest_signing_payload(manifest_digest, coordinator_key_sha256),
            ec.ECDSA(hashes.SHA256()))

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Writes the key (PKCS#8 PEM) readable by its owner only, atomically."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} already exists; an owner key is never overwritten "
                              f"without --force (the coordinator's measurement depends on it)")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    @classmethod
    def load_or_create(cls, path: Path) -> OwnerKey:
        """The key at ``path``, created there first if there is none (demos, benchmarks)."""
        if not Path(path).exists():
            cls.create().save(path)
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> OwnerKey:
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except FileNotFoundError:
            raise ConfigError(f"no owner key at {path}; create one with `smlaas owner init` "
                              f"(or give --owner-key)") from None
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{path} is not an owner key (PEM EC private key): {err}") \
                from err
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError(f"{path} is not an ECDSA P-256 key")
        return cls(key)


def parse_public_key(public_key_hex: str) -> ec.EllipticCurvePublicKey:
    """The owner's public key from its hex SubjectPublicKeyInfo DER."""
    try:
        key = serialization.load_der_public_key(bytes.fromhex(public_key_hex))
    except ValueError as err:
        raise ConfigError(f"not an owner public key (hex SubjectPublicKeyInfo DER): "
                          f"{err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise ConfigError("the owner public key must be an ECDSA P-256 key")
    return key


def public_key_fingerprint(public_key_hex: str) -> str:
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


def verify_manifest_signature(owner_public_key: ec.EllipticCurvePublicKey, signature: bytes,
                              *, manifest_digest: str, coordinator_key_sha256: bytes) -> None:
    """Raises CoordinatorRefused (bad_signature) unless ``signature`` is the owner's over this
    manifest for this coordinator."""
    try:
        owner_public_key.verify(signature, manifest_signing_payload(
            manifest_digest, coordinator_key_sha256), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise refusal(Code.BAD_SIGNATURE, "the manifest is not signed by this coordinator's "
                      "owner for this coordinator (unsigned, signed by another key, altered, "
                      "or signed for another coordinator instance)") from None
