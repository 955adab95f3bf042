"""Receipt signatures: COSE_Sign1 (RFC 9052) over a CBOR claims map, EdDSA with Ed25519, the
key named by its key id in the protected header.

Signing builds the COSE_Sign1 with ``cbor2`` and signs with ``cryptography`` (RFC 9052 4.4:
Ed25519 over the CBOR ``Sig_structure`` ``["Signature1", protected, h'', payload]``): every
stage signs every receipted batch, and the ``cwt`` library's encoder cost 0.15 ms per
signature in a stage just after a run, against 0.03 ms for the Ed25519 signature itself.
Verification goes through ``cwt``, an implementation of its own; a test checks that ``cwt``
encodes the same bytes.

A key id is the first 16 bytes of SHA-256 of the raw public key; the evidence bundle maps key
ids to keys and to the quotes that bind them (:mod:`~smlaas.receipts.evidence`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cwt import COSE, COSEKey

from smlaas.errors import ReceiptError

COSE_SIGN1_TAG = 18
HEADER_ALG, HEADER_KID = 1, 4
EDDSA = -8
SIGNATURE1 = "Signature1"
"""The context of a COSE_Sign1's Sig_structure (RFC 9052 4.4)."""


def key_id(public_key_raw: bytes) -> bytes:
    return hashlib.sha256(public_key_raw).digest()[:16]


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class ReceiptKey:
    """A signing key made inside the enclave that signs with it (never leaves it)."""

    def __init__(self, key: Ed25519PrivateKey | None = None) -> None:
        self._key = key or Ed25519PrivateKey.generate()
        self.public_raw = raw_public_key(self._key.public_key())
        self.kid = key_id(self.public_raw)
        self._protected = cbor2.dumps({HEADER_ALG: EDDSA, HEADER_KID: self.kid})

    def sign(self, claims: dict[Any, Any]) -> bytes:
        """A tagged COSE_Sign1 whose payload is ``claims`` as (canonical) CBOR."""
        payload = cbor2.dumps(claims, canonical=True)
        signature = self._key.sign(cbor2.dumps([SIGNATURE1, self._protected, b"", payload]))
        return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG,
                                         [self._protected, {}, payload, signature]))


def unverified(message: bytes) -> tuple[bytes, dict[Any, Any]]:
    """The key id and claims of a COSE_Sign1, NOT verified (to find the key to verify it
    with); ReceiptError if it is not a well-formed one."""
    try:
        tagged = cbor2.loads(message)
        if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != COSE_SIGN1_TAG:
            raise ValueError("not a tagged COSE_Sign1")
        protected, _, payload, _ = tagged.value
        header = cbor2.loads(protected)
        claims = cbor2.loads(payload)
        if not isinstance(header, dict):
            raise ValueError("the protected header is not a map")
        kid = header[HEADER_KID]
        if header.get(HEADER_ALG) != EDDSA or not isinstance(kid, bytes) or \
                not isinstance(claims, dict):
            raise ValueError("not an EdDSA COSE_Sign1 with a key id over a claims map")
        return kid, claims
    except (cbor2.CBORDecodeError, ValueError, TypeError, KeyError, IndexError) as err:
        raise ReceiptError(f"not a receipt (COSE_Sign1): {err}") from err


def verified(message: bytes, public_key_raw: bytes) -> dict[Any, Any]:
    """The claims of ``message`` if ``public_key_raw`` signed it; ReceiptError otherwise."""
    try:
        public = Ed25519PublicKey.from_public_bytes(public_key_raw)
        cose_key = COSEKey.from_pem(public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            kid=key_id(public_key_raw))
        claims = cbor2.loads(COSE.new().decode(message, cose_key))
    except Exception as err:  # cwt raises its own errors for a bad signature or format
        raise ReceiptError(f"the signature does not verify: {err}") from err
    if not isinstance(claims, dict):
        raise ReceiptError("the signed payload is not a claims map")
    return claims


def digest(message: bytes) -> bytes:
    """How a receipt is referred to by the next one in the chain."""
    return hashlib.sha256(message).digest()
