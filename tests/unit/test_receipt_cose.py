"""The receipt signer (cbor2 and cryptography) against the ``cwt`` library's COSE_Sign1."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cwt import COSE, COSEKey

from smlaas.errors import ReceiptError
from smlaas.receipts.cose import ReceiptKey, unverified, verified

CLAIMS = {6: 1_765_000_000, "smlaas": 2, "role": "stage-1", "replica": 0, "root": b"r" * 32,
          "prev": b"p" * 32, "leaves": 3, "model": "ab" * 32}


def test_the_signer_makes_the_bytes_cwt_makes() -> None:
    key = ReceiptKey()
    cose_key = COSEKey.from_pem(key._key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), kid=key.kid)
    by_cwt = COSE.new().encode(cbor2.dumps(CLAIMS, canonical=True), cose_key,
                               protected={"alg": "EdDSA", "kid": key.kid})
    assert key.sign(CLAIMS) == bytes(by_cwt)  # Ed25519 signatures are deterministic


def test_cwt_verifies_what_the_signer_signed_and_nothing_else() -> None:
    key, other = ReceiptKey(), ReceiptKey()
    message = key.sign(CLAIMS)
    assert verified(message, key.public_raw) == CLAIMS
    assert unverified(message) == (key.kid, CLAIMS)
    with pytest.raises(ReceiptError):
        verified(message, other.public_raw)
    tampered = bytearray(message)
    tampered[-70] ^= 1  # in the payload
    with pytest.raises(ReceiptError):
        verified(bytes(tampered), key.public_raw)
