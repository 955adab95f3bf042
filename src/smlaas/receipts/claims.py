"""What each role signs about a request (its claims map), and how it signs it.

A stage that ran a batch signs once for the batch (:class:`StageSigner`):

- ``6`` (iat): Unix seconds; ``role``, ``replica``; ``manifest`` (digest, hex) and
  ``release`` (the owner's release version it serves under, 0 if none);
- ``model``: SHA-256 (hex) of its sub-model, as the manifest commits to it;
- ``root`` and ``leaves``: the Merkle root over one leaf per request in the batch, and how
  many (:mod:`~smlaas.receipts.digests`);
- ``prev``: SHA-256 of the previous stage's receipt for this batch (absent for stage 0).

The gateway signs once per request (:class:`GatewaySigner`): iat, role, manifest, release,
``model`` (the served model's name), ``request_id``, ``request`` and ``response`` (BLAKE3 of
the request bytes exactly as received and of the response bytes returned), ``received`` and
``sent`` (the digests of the request's input tensors and of its outputs), the request's
``salt``, and ``stages``: for each stage in order its receipt, the request's leaf
(``received``, ``sent``, its ``index``) and Merkle ``path``. That one COSE_Sign1 is the
receipt a client keeps: it closes the chain.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from smlaas.receipts.cose import ReceiptKey, digest
from smlaas.receipts.digests import (
    bytes_digest,
    leaf_hash,
    merkle_path,
    merkle_root,
    row_slices,
    tensors_digest,
)

FORMAT = 2
"""Claims format; 2: the request and response digests are BLAKE3 (1: SHA-256)."""
IAT = 6


@dataclass(frozen=True)
class Leaf:
    """One request's part of a stage's batch receipt."""

    received: bytes
    sent: bytes


@dataclass(frozen=True)
class StageReceipt:
    """A stage's signed batch receipt, every request's digests and leaf hash (the gateway
    hands each request its own digests and Merkle path only)."""

    cose: bytes
    leaves: tuple[Leaf, ...]
    hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class StageSigner:
    key: ReceiptKey
    role: str
    replica: int
    manifest_digest: str
    release_version: int
    model_sha256: str

    def sign_batch(self, received: Mapping[str, np.ndarray] | Sequence[bytes],
                   sent: Mapping[str, np.ndarray], *, rows: Sequence[int],
                   salts: Sequence[bytes], prev: bytes | None) -> StageReceipt:
        """The receipt for a batch of ``len(rows)`` requests (``rows`` each, stacked in
        order). ``received`` is the tensors this stage received, or (after stage 0) each
        request's digest of them as the previous stage sent them: over the mutual-TLS hop
        between two attested enclaves they are the same bytes, and each activation is then
        hashed once, by the stage that sends it."""
        parts = row_slices(rows) if len(rows) > 1 else [None]
        if isinstance(received, Mapping):
            received = [tensors_digest(received, part) for part in parts]
        if len(received) != len(parts):
            raise ValueError(f"{len(received)} received digests for {len(parts)} requests")
        leaves = tuple(Leaf(digest_in, tensors_digest(sent, part))
                       for digest_in, part in zip(received, parts))
        hashes = tuple(leaf_hash(s, leaf.received, leaf.sent)
                       for s, leaf in zip(salts, leaves, strict=True))
        root = merkle_root(hashes)
        claims: dict[Any, Any] = {
            IAT: int(time.time()), "smlaas": FORMAT, "role": self.role, "replica": self.replica,
            "manifest": self.manifest_digest, "release": self.release_version,
            "model": self.model_sha256, "root": root, "leaves": len(leaves)}
        if prev is not None:
            claims["prev"] = prev
        return StageReceipt(self.key.sign(claims), leaves, hashes)


@dataclass(frozen=True)
class GatewaySigner:
    key: ReceiptKey
    manifest_digest: str
    release_version: int
    model_name: str

    def sign_request(self, *, request_id: str, request_digest: bytes,
                     response_bytes: bytes, received: bytes, sent: bytes, salt: bytes,
                     stages: Sequence[StageReceipt], index: int,
                     release_version: int | None = None) -> bytes:
        """The receipt of one request: ``request_digest`` is :func:`bytes_digest` of its bytes
        as received; its place ``index`` in each stage's batch, with the digests of its inputs
        (``received``) and outputs (``sent``)."""
        return self.key.sign({
            IAT: int(time.time()), "smlaas": FORMAT, "role": "gateway", "replica": 0,
            "manifest": self.manifest_digest,
            "release": self.release_version if release_version is None else release_version,
            "model": self.model_name, "request_id": request_id,
            "request": request_digest,
            "response": bytes_digest(response_bytes),
            "received": received, "sent": sent, "salt": salt,
            "stages": [stage_entry(stage, index) for stage in stages]})


def stage_entry(stage: StageReceipt, index: int) -> dict[str, Any]:
    """Request ``index``'s part of a stage's batch receipt."""
    leaf = stage.leaves[index]
    return {"receipt": stage.cose, "index": index, "received": leaf.received,
            "sent": leaf.sent, "path": [[left, sibling] for left, sibling in
                                        merkle_path(stage.hashes, index)]}


def chain_link(receipt: bytes) -> bytes:
    """What the next stage's ``prev`` claim holds for ``receipt``."""
    return digest(receipt)
