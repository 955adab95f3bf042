"""What the gateway keeps for receipts (:mod:`smlaas.receipts`): a request's part of the
stages' batch receipts until it signs its own, and the evidence bundle it serves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from smlaas.receipts.claims import GatewaySigner, StageReceipt
from smlaas.receipts.evidence import EvidenceBundle, KeyEvidence

EVIDENCE_TTL_S = 10.0
"""How long the evidence bundle is served before it is asked of the stages again (a replica
restarted since has a new receipt key)."""
INLINE_HASH_BYTES = 1024 * 1024
"""Request and response bytes up to this size are hashed (BLAKE3, at most ~0.15 ms here) and
a response's receipt signed on the event loop: less CPU than a hand-over to a thread and back;
larger ones are hashed in the encoding thread."""
MAX_KEYS_KEPT = 1024


@dataclass(frozen=True)
class PendingReceipt:
    """What the gateway's receipt for a request needs from the pipeline's answer."""

    stages: tuple[StageReceipt, ...]
    index: int
    salt: bytes


@dataclass(frozen=True)
class Answer:
    """The outputs of one request (its rows), and its stage receipts when it asked."""

    tensors: dict[str, np.ndarray]
    receipt: PendingReceipt | None = None


class GatewayReceipts:
    """The gateway's receipt signer and the evidence bundle (cached EVIDENCE_TTL_S)."""

    def __init__(self, signer: GatewaySigner, own: Callable[[], KeyEvidence],
                 manifest_json: str, release: Callable[[], dict[str, Any] | None]) -> None:
        self.signer, self.own = signer, own
        self.manifest_json, self.release = manifest_json, release
        self._bundle: bytes | None = None
        self._made = 0.0
        self._lock = asyncio.Lock()
        self._release_text: Any = None
        self._release_version = 0
        self._keys: dict[bytes, KeyEvidence] = {}
        """Every stage key seen (the latest evidence of each), so that the bundle still holds
        the key of a replica that restarted or went quiet since it signed."""

    def release_version(self) -> int:
        """The version of the owner's release the gateway serves under now (0: none yet);
        parsed once per release, not per receipt."""
        current = self.release()
        text = current.get("release") if current else None
        if text != self._release_text:  # the watcher makes a new string on every call
            try:
                self._release_version = int(json.loads(text)["version"]) if text else 0
            except (KeyError, TypeError, ValueError):
                self._release_version = 0
            self._release_text = text
        return self._release_version

    async def bundle(self, stage_keys: Callable[[], Awaitable[list[KeyEvidence]]]) -> bytes:
        """The CBOR bundle: this gateway's key, every stage key seen (``stage_keys`` asks
        the stages for theirs), the manifest and the current release."""
        async with self._lock:
            if self._bundle is None or time.monotonic() - self._made > EVIDENCE_TTL_S:
                for key in await stage_keys():
                    self._keys.pop(key.kid, None)
                    self._keys[key.kid] = key
                while len(self._keys) > MAX_KEYS_KEPT:  # the oldest first
                    self._keys.pop(next(iter(self._keys)))
                self._bundle = EvidenceBundle(self.manifest_json, self.release(),
                                              (self.own(), *self._keys.values())).encode()
                self._made = time.monotonic()
            return self._bundle
