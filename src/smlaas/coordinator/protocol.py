"""The coordinator's wire protocol: operations, refusal codes, and the byte strings that bind
a quote, a signature or a released key to its context.

Every value that is hashed or signed is built by :func:`bound`: a domain label and then each
field with its length, so that no two different contexts can produce the same bytes (a
registration binding can never be read as a manifest signature, ``("ab", "c")`` never as
``("a", "bc")``).

Key release follows RFC 9180 (HPKE, base mode, single shot): KEM DHKEM(P-256, HKDF-SHA256),
KDF HKDF-SHA256, AEAD AES-256-GCM, to the P-256 key the registrant's quote binds, with
``info`` = bound(role, manifest digest, nonce). Only the holder of that private key (created
inside the attested enclave) can decrypt the stage key, so whoever relays or records the
registration learns nothing.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from smlaas.enclave.keys import spki_der
from smlaas.errors import CoordinatorRefused

__all__ = ["COORDINATOR_ROLE", "Code", "Op", "bound", "open_stage_key", "refusal",
           "registration_binding", "seal_stage_key", "spki_der"]

COORDINATOR_ROLE = "coordinator"
REGISTRATION_LABEL = b"smlaas registration v2"
STAGE_KEY_LABEL = b"smlaas stage key release v1"
MANIFEST_SIGNATURE_LABEL = b"smlaas manifest signature v1"
HPKE_SUITE = Suite(KEM.P256, KDF.HKDF_SHA256, AEAD.AES_256_GCM)


class Op(StrEnum):
    CA = "ca"
    STATUS = "status"
    SET_MANIFEST = "set_manifest"
    NONCE = "nonce"
    REGISTER = "register"
    RELEASE = "release"
    SET_RELEASE = "set_release"
    HEARTBEAT = "heartbeat"


class Code(StrEnum):
    """Why the coordinator refused a request (the ``code`` of every refusal)."""

    MALFORMED = "malformed"
    """The request, manifest, policy or collateral is not well formed."""
    UNKNOWN_OP = "unknown_op"
    BAD_SIGNATURE = "bad_signature"
    """The manifest is not signed by this coordinator's owner, for this coordinator."""
    STALE_VERSION = "stale_version"
    """A manifest is already set; only a signed manifest with a higher version replaces it."""
    KEY_MISMATCH = "key_mismatch"
    """A stage key does not match the manifest's commitment to it."""
    NO_MANIFEST = "no_manifest"
    """No manifest is set yet (retry later)."""
    BAD_NONCE = "bad_nonce"
    """Unknown, used or expired nonce (retry with a new one; a replay never succeeds)."""
    UNKNOWN_ROLE = "unknown_role"
    """The role is not in the manifest's topology."""
    NOT_ACCEPTED = "not_accepted"
    """The quote does not verify, or the manifest's policy does not accept it."""
    NO_SLOT = "no_slot"
    """The manifest has fewer replicas of the role than the slot asked for."""
    SLOT_TAKEN = "slot_taken"
    """A live replica holds that slot (retry: a restart waits for the old lease to end)."""
    SLOT_REVOKED = "slot_revoked"
    """The lease ended: the manifest it was held under was replaced."""
    MANIFEST_CHANGED = "manifest_changed"
    """The manifest was replaced while a registration was checked (retry)."""
    BAD_RELEASE = "bad_release"
    """The release is not the owner's, not for this coordinator and manifest, or older."""
    INTERNAL = "internal"


RETRYABLE = frozenset({Code.NO_MANIFEST, Code.BAD_NONCE, Code.SLOT_TAKEN,
                       Code.MANIFEST_CHANGED})
"""Refusals that a registrant waits out (the owner has not set the manifest yet; its nonce
expired while it waited; its slot's previous holder has not let go yet)."""


def refusal(code: Code, message: str) -> CoordinatorRefused:
    return CoordinatorRefused(code.value, message)


def bound(label: bytes, *fields: bytes) -> bytes:
    """``label`` and each field, length-prefixed (see the module docstring)."""
    parts = [len(label).to_bytes(2, "big"), label]
    for value in fields:
        parts += [len(value).to_bytes(4, "big"), value]
    return b"".join(parts)


def registration_binding(role: str, public_key_der: bytes, nonce: bytes) -> bytes:
    """What a registering enclave puts in its quote's report_data (32 bytes)."""
    return hashlib.sha256(bound(REGISTRATION_LABEL, role.encode(), public_key_der, nonce)
                          ).digest()


def manifest_signing_payload(manifest_digest: str, coordinator_key_sha256: bytes) -> bytes:
    """What the owner signs: this manifest, for this coordinator instance (its RA-TLS key)."""
    return bound(MANIFEST_SIGNATURE_LABEL, bytes.fromhex(manifest_digest),
                 coordinator_key_sha256)


def _release_info(role: str, manifest_digest: str, nonce: bytes) -> bytes:
    return bound(STAGE_KEY_LABEL, role.encode(), bytes.fromhex(manifest_digest), nonce)


def seal_stage_key(stage_key: bytes, recipient: ec.EllipticCurvePublicKey, *, role: str,
                   manifest_digest: str, nonce: bytes) -> bytes:
    """HPKE-encrypts ``stage_key`` to the registrant's attested public key."""
    return HPKE_SUITE.encrypt(stage_key, recipient,
                              info=_release_info(role, manifest_digest, nonce))


def open_stage_key(ciphertext: bytes, key: ec.EllipticCurvePrivateKey, *, role: str,
                   manifest_digest: str, nonce: bytes) -> bytes:
    """The stage key, decrypted inside the enclave that holds ``key``.

    Raises:
        CoordinatorRefused (code malformed): the ciphertext is not for this key and context.
    """
    try:
        return HPKE_SUITE.decrypt(ciphertext, key,
                                  info=_release_info(role, manifest_digest, nonce))
    except (InvalidTag, ValueError) as err:
        raise refusal(Code.MALFORMED, "the released stage key does not decrypt with this "
                      "enclave's key (not released to us)") from err
