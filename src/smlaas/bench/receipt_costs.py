"""What receipts cost in CPU per request, timed in this process with the real signers on
tensors of a plan's sizes (batch 1): each stage's hashing and signature, and the gateway's
(:mod:`smlaas.bench.receipts` reports it beside its measurement)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from smlaas.bench.security import timed
from smlaas.receipts.claims import GatewaySigner, StageReceipt, StageSigner, chain_link
from smlaas.receipts.cose import ReceiptKey
from smlaas.receipts.digests import SALT_BYTES, bytes_digest, tensors_digest


def receipt_costs(stage_bytes: Sequence[tuple[int, int]], request_body: bytes,
                  response_body: bytes, inputs: dict[str, np.ndarray],
                  outputs: dict[str, np.ndarray], *, repeats: int = 15) -> dict[str, Any]:
    """Median ms per request (batch 1) of each stage's receipt, split into the digests of the
    tensors it received and sent (``stage_bytes``: their sizes) and the rest (claims, CBOR,
    Ed25519 and COSE), and of the gateway's (digests of the request and response bytes and
    tensors, then the signature over the chain)."""
    salt = secrets.token_bytes(SALT_BYTES)
    stages: list[dict[str, Any]] = []
    receipts: list[StageReceipt] = []
    for index, (received_bytes, sent_bytes) in enumerate(stage_bytes):
        entry, receipt = _stage_cost(index, received_bytes, sent_bytes, salt=salt,
                                     prev=receipts[-1] if receipts else None, repeats=repeats)
        stages.append(entry)
        receipts.append(receipt)
    gateway = GatewaySigner(ReceiptKey(), "00" * 32, 1, "model")

    def gateway_hashes() -> None:
        bytes_digest(request_body)
        bytes_digest(response_body)

    def gateway_receipt() -> bytes:
        # As the gateway does: the request's digest (hashed while the pipeline runs), the
        # response's, and the tensor digests of stage 0's and the last stage's leaves.
        return gateway.sign_request(
            request_id="", request_digest=bytes_digest(request_body),
            response_bytes=response_body, received=receipts[0].leaves[0].received,
            sent=receipts[-1].leaves[0].sent, salt=salt, stages=receipts, index=0)

    gateway_hash_ms = 1e3 * timed(gateway_hashes, repeats)
    gateway_total_ms = 1e3 * timed(gateway_receipt, repeats)
    hashed = len(request_body) + len(response_body)
    gateway_entry = {"hashed_bytes": hashed, "hash_ms": gateway_hash_ms,
                     "sign_ms": max(0.0, gateway_total_ms - gateway_hash_ms),
                     "total_ms": gateway_total_ms}
    total = sum(s["total_ms"] for s in stages) + gateway_total_ms
    return {"stages": stages, "gateway": gateway_entry, "total_ms": total,
            "hashed_bytes": sum(s["hashed_bytes"] for s in stages) + hashed,
            "hash_ms": sum(s["hash_ms"] for s in stages) + gateway_hash_ms,
            "receipt_bytes": len(gateway_receipt())}


def _stage_cost(index: int, received_bytes: int, sent_bytes: int, *, salt: bytes,
                prev: StageReceipt | None, repeats: int) -> tuple[dict[str, Any], StageReceipt]:
    # A stage after the first takes the digest of what it received from the previous
    # stage's receipt (each activation is hashed once, by its sender).
    received: dict[str, np.ndarray] | list[bytes] = \
        {"x": np.ones(received_bytes, np.uint8)} if prev is None else \
        [prev.leaves[0].sent]
    sent = {"y": np.ones(sent_bytes, np.uint8)}
    signer = StageSigner(ReceiptKey(), f"stage-{index}", 0, "00" * 32, 1, "00" * 32)
    link = chain_link(prev.cose) if prev is not None else None

    def receipt() -> StageReceipt:
        return signer.sign_batch(received, sent, rows=[1], salts=[salt], prev=link)

    def digests() -> None:
        if isinstance(received, dict):
            tensors_digest(received)
        tensors_digest(sent)

    hash_ms = 1e3 * timed(digests, repeats)
    total_ms = 1e3 * timed(receipt, repeats)
    hashed = sent_bytes + (received_bytes if prev is None else 0)
    return ({"stage": index, "hashed_bytes": hashed, "hash_ms": hash_ms,
             "sign_ms": max(0.0, total_ms - hash_ms), "total_ms": total_ms}, receipt())

