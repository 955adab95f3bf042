"""Receipts from a real deployment: resnet18 in 3 stages, batching on, 8 clients at once asking
for receipts (sim backend, real processes on 127.0.0.1). Every receipt verifies offline
against its own request and response, none against another client's; `smlaas infer
--receipt DIR` writes a directory that checks on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from smlaas.client import AsyncInferenceClient
from smlaas.client.inference import InferResult
from smlaas.coordinator.owner import parse_public_key
from smlaas.errors import ReceiptError
from smlaas.receipts.cose import unverified
from smlaas.receipts.evidence import EvidenceBundle
from smlaas.receipts.verify import verify_receipt
from tests.integration.serving_setup import cache_env, deployment, random_image, sealed_build

CLIENTS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("receipts")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root, machines=3)
        with deployment(root, build, keys, max_batch_size=8) as running:
            yield running


def test_every_clients_receipt_verifies_against_its_own_request_only(served) -> None:
    running = served
    assert running.stage_count == 3

    async def one(seed: int) -> InferResult:
        client = AsyncInferenceClient(
            running.url, ca=running.ca_path, policy=running.role_policy("gateway"),
            roots=running.trusted_roots, owner_public_key=running.owner_public_key_path,
            receipts=True)
        async with client:
            return await client.infer({"input": random_image(seed)})

    async def all_clients() -> list[InferResult]:
        return list(await asyncio.gather(*(one(seed) for seed in range(CLIENTS))))

    results = asyncio.run(all_clients())
    with running.client(receipts=True) as client:
        evidence = EvidenceBundle.decode(client.evidence())
    owner = parse_public_key(Path(running.owner_public_key_path).read_text().strip())
    receipts = [r.receipt for r in results]
    assert all(r is not None for r in receipts)
    for receipt in receipts:
        assert receipt is not None
        verdict = verify_receipt(receipt.cose, evidence, owner_public_key=owner,
                                 request=receipt.request, response=receipt.response,
                                 allow_simulation=True)
        assert verdict.simulated and verdict.stages == 3
    batched = [entry["path"] for r in receipts if r is not None
               for entry in unverified(r.cose)[1]["stages"]]
    assert any(batched), "no two requests shared a batch: the Merkle paths were not tried"
    first, second = receipts[0], receipts[1]
    assert first is not None and second is not None
    with pytest.raises(ReceiptError, match="request file"):
        verify_receipt(first.cose, evidence, owner_public_key=owner, request=second.request,
                       allow_simulation=True)
    with pytest.raises(ReceiptError, match="response file"):
        verify_receipt(first.cose, evidence, owner_public_key=owner,
                       response=second.response, allow_simulation=True)
    with pytest.raises(ReceiptError, match="SIMULATED"):
        verify_receipt(first.cose, evidence, owner_public_key=owner)
