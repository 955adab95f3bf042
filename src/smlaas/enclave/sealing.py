"""Sealed sub-models: AES-256-GCM with an authenticated header, one random key per stage.

File layout::

    b"SMLSEAL1" | header length (u32, little endian) | header (canonical JSON) | nonce (12) |
    ciphertext + GCM tag

The header (format version, stage index, SHA-256 of the plaintext, key id) is the AEAD's
associated data, so it cannot be changed without detection; the key id (HMAC of a fixed label
under the key) tells a wrong key apart from a modified file. The owner keeps the keys in a
keyfile (mode 0600); the coordinator releases a stage's key only to an attested worker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from smlaas.errors import ConfigError, SealError
from smlaas.private_files import write_private

MAGIC = b"SMLSEAL1"
FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
_KEY_ID_LABEL = b"smlaas sealed-file key id v1"


def key_id(key: bytes) -> str:
    """A public fingerprint of ``key`` that reveals nothing about it."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class SealedHeader:
    format: int
    stage: int
    sha256: str
    key_id: str

    def encode(self) -> bytes:
        return json.dumps({"format": self.format, "stage": self.stage, "sha256": self.sha256,
                           "key_id": self.key_id}, sort_keys=True,
                          separators=(",", ":")).encode()


def seal(plaintext: bytes, *, key: bytes, stage: int) -> bytes:
    """Encrypts ``plaintext`` as stage ``stage`` under ``key`` (a fresh random nonce)."""
    if len(key) != KEY_BYTES:
        raise SealError(f"a sealing key is {KEY_BYTES} bytes, got {len(key)}")
    header = SealedHeader(FORMAT_VERSION, stage, hashlib.sha256(plaintext).hexdigest(),
                          key_id(key)).encode()
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, MAGIC + header)
    return MAGIC + struct.pack("<I", len(header)) + header + nonce + ciphertext


def read_header(sealed: bytes) -> SealedHeader:
    if not sealed.startswith(MAGIC) or len(sealed) < len(MAGIC) + 4:
        raise SealError("not an smlaas sealed file (bad magic)")
    length, = struct.unpack_from("<I", sealed, len(MAGIC))
    raw = sealed[len(MAGIC) + 4: len(MAGIC) + 4 + length]
    try:
        data = json.loads(raw)
        return SealedHeader(int(data["format"]), int(data["stage"]), str(data["sha256"]),
                            str(data["key_id"]))
    except (ValueError, KeyError, TypeError) as err:
        raise SealError(f"the sealed file's header is unreadable: {err}") from err


def read_header_of(path: Path) -> SealedHeader:
    """The header of a sealed file, reading only its first bytes."""
    with open(path, "rb") as stream:
        start = stream.read(len(MAGIC) + 4)
        if len(start) < len(MAGIC) + 4:
            raise SealError(f"{path} is not an smlaas sealed file (too short)")
        length, = struct.unpack_from("<I", start, len(MAGIC))
        return read_header(start + stream.read(min(length, 1 << 16)))


def unseal(sealed: bytes, *, key: bytes, stage: int) -> bytes:
    """Decrypts a sealed stage, checking it is stage ``stage`` and unchanged.

    Raises:
        SealError: saying whether the file is another stage, the key is wrong, or the file
            (header or body) was modified.
    """
    header = read_header(sealed)
    if header.format != FORMAT_VERSION:
        raise SealError(f"sealed format {header.format} is not supported (this smlaas "
                        f"reads {FORMAT_VERSION})")
    if header.stage != stage:
        raise SealError(f"the sealed file is stage {header.stage}, expected stage {stage} "
                        f"(files swapped?)")
    if not hmac.compare_digest(header.key_id, key_id(key)):
        raise SealError(f"wrong key for this sealed stage {stage} (key id {key_id(key)} != "
                        f"{header.key_id})")
    start = len(MAGIC) + 4 + len(header.encode())
    raw_header = sealed[len(MAGIC) + 4: start]
    nonce, ciphertext = sealed[start:start + NONCE_BYTES], sealed[start + NONCE_BYTES:]
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, MAGIC + raw_header)
    except InvalidTag:
        raise SealError(f"sealed stage {stage} was modified (authentication failed)") from None
    if hashlib.sha256(plaintext).hexdigest() != header.sha256:
        raise SealError(f"sealed stage {stage} decrypts to other content than it was sealed "
                        f"with")
    return plaintext


# -- the owner's keyfile -----------------------------------------------------------------------
KEYFILE_FORMAT = 2


@dataclass(frozen=True)
class OwnerKeys:
    """The stage keys of one sealed build, and the SHA-256 of each stage's plaintext, as the
    model owner keeps them (the manifest commits to both)."""

    build_sha256: str
    """SHA-256 of the sealed directory's plan.json."""
    stage_keys: dict[int, bytes]
    stage_sha256: dict[int, str]

    def to_json(self) -> str:
        return json.dumps({"format": KEYFILE_FORMAT, "build_sha256": self.build_sha256,
                           "stages": {str(k): {"key": base64.b64encode(v).decode(),
                                               "sha256": self.stage_sha256[k]}
                                      for k, v in sorted(self.stage_keys.items())}}, indent=2)

    @classmethod
    def from_json(cls, text: str, *, source: str = "keyfile") -> OwnerKeys:
        try:
            data = json.loads(text)
            if data.get("format") != KEYFILE_FORMAT:
                raise ValueError(f"keyfile format {data.get('format')!r}, this smlaas reads "
                                 f"{KEYFILE_FORMAT} (seal the build again)")
            stages = {int(k): v for k, v in data["stages"].items()}
            keys = {k: base64.b64decode(v["key"], validate=True) for k, v in stages.items()}
            if any(len(key) != KEY_BYTES for key in keys.values()):
                raise ValueError(f"a stage key is not {KEY_BYTES} bytes")
            return cls(str(data["build_sha256"]), keys,
                       {k: str(v["sha256"]) for k, v in stages.items()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{source} is not an smlaas owner keyfile: {err}") from err

    def save(self, path: Path) -> None:
        """Writes the keyfile readable by its owner only (0600, also over an existing file),
        atomically."""
        write_private(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: Path) -> OwnerKeys:
        try:
            return cls.from_json(Path(path).read_text(), source=str(path))
        except FileNotFoundError:
            raise ConfigError(f"keyfile {path} does not exist") from None
