"""The one way a public key is named in a binding: its SubjectPublicKeyInfo DER, and SHA-256 of
that (what RA-TLS report_data, the gateway's evidence, registrations and coordinator instance
ids bind)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


def spki_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_sha256(key: PublicKeyTypes) -> bytes:
    """SHA-256 of ``key``'s SubjectPublicKeyInfo DER."""
    return hashlib.sha256(spki_der(key)).digest()
