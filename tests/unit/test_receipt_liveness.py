"""Receipts stay checkable and the gateway stays well behaved: a receipt key's quote is remade
as it ages, an impossible time is bad input (not a crash), and a request id a receipt cannot
carry is refused before anything runs."""

from __future__ import annotations

import json

import cbor2
import pytest

from smlaas.enclave.backends.sim import SimBackend
from smlaas.errors import BadRequest, ReceiptError
from smlaas.receipts.cose import ReceiptKey
from smlaas.receipts.evidence import KeyEvidenceSource
from smlaas.receipts.verify import verify_receipt
from smlaas.transport.tensors import TensorSpec
from smlaas.transport.v2 import parse_infer_request
from tests.receipt_vectors import Deployment, seeded_owner


def test_a_receipt_keys_quote_is_remade_once_it_is_old(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SMLAAS_CACHE_DIR", str(tmp_path))
    now = [0.0]
    source = KeyEvidenceSource(SimBackend("stage-0"), ReceiptKey(), role="stage-0", replica=0,
                               manifest_digest="ab" * 32, clock=lambda: now[0])
    first = source()
    now[0] = KeyEvidenceSource.REFRESH_S - 1
    assert source() is first
    now[0] = KeyEvidenceSource.REFRESH_S + 1
    fresh = source()
    assert fresh is not first and fresh.public_key == first.public_key


@pytest.mark.parametrize("issued", [10 ** 30, -10 ** 13, 2 ** 64 - 1])
def test_an_impossible_signing_time_is_a_receipt_error(issued: int, tmp_path) -> None:
    """Read before any signature is checked (quotes are checked as of it): refused in words,
    not an OverflowError."""
    deployment = Deployment("liveness", tmp_path, seeded_owner())
    header = cbor2.dumps({1: -8, 4: b"k" * 16})
    forged = cbor2.dumps(cbor2.CBORTag(18, [header, {}, cbor2.dumps({6: issued}), b"s"]))
    with pytest.raises(ReceiptError, match="impossible time"):
        verify_receipt(forged, deployment.evidence(),
                       owner_public_key=deployment.owner.private_key.public_key())


@pytest.mark.parametrize("request_id", ["\ud800", "line\nbreak", "\x1b[31mred"])
def test_a_request_id_a_receipt_cannot_carry_is_refused(request_id: str) -> None:
    body = json.dumps({"id": request_id, "inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode()
    with pytest.raises(BadRequest, match="printable"):
        parse_infer_request(body, None, [TensorSpec("x", "float32", [1])], [], max_batch_size=0)
