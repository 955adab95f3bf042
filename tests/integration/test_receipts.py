"""Receipts from a real deployment: resnet18 in 3 stages, batching on, 8 clients at once asking
for receipts (sim backend, real processes on 127.0.0.1). Every receipt verifies offline
against its own request and response, none against another client's; `smlaas infer
--receipt DIR` writes a directory that checks on its own."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from smlaas.client import AsyncInferenceClient
from smlaas.client.inference import InferResult
from smlaas.coordinator.owner import parse_public_key
from smlaas.coordinator.server import free_port
from smlaas.errors import ReceiptError
from smlaas.receipts.cose import unverified
from smlaas.receipts.evidence import EvidenceBundle
from smlaas.receipts.verify import verify_receipt
from smlaas.serving.grpc_codec import without_receipt
from tests.integration.serving_setup import cache_env, deployment, random_image, sealed_build

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

CLIENTS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("receipts")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root, machines=3)
        with deployment(root, build, keys, max_batch_size=8,
                        grpc_port=free_port()) as running:
            running.test_cache = root / "cache"  # type: ignore[attr-defined]
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


def test_a_grpc_receipt_covers_the_message_bytes(served) -> None:
    """Over gRPC the receipt is the response parameter ``receipt``; it covers the request
    message as sent and the response message without that parameter; the evidence comes
    from ``/smlaas.Receipts/Evidence``."""
    running = served
    x = random_image(11)
    message = service_pb2.ModelInferRequest(model_name=running.model_name,
                                            raw_input_contents=[x.tobytes()])
    message.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    message.parameters["receipt"].bool_param = True
    request = bytes(message.SerializeToString())
    credentials = grpc.ssl_channel_credentials(Path(running.ca_path).read_bytes())
    with grpc.secure_channel(running.grpc_address, credentials, options=[
            ("grpc.max_receive_message_length", -1)]) as channel:
        response = channel.unary_unary(MODEL_INFER)(request, timeout=30)
        evidence = EvidenceBundle.decode(
            channel.unary_unary("/smlaas.Receipts/Evidence")(b"", timeout=30))
    answer = service_pb2.ModelInferResponse.FromString(response)
    receipt = base64.b64decode(answer.parameters["receipt"].string_param)
    verdict = verify_receipt(receipt, evidence, owner_public_key=parse_public_key(
        Path(running.owner_public_key_path).read_text().strip()), request=request,
        response=without_receipt(response, receipt), allow_simulation=True)
    assert verdict.stages == 3
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).shape == (1000,)


def test_smlaas_infer_writes_a_directory_that_checks_on_its_own(served, tmp_path: Path) -> None:
    running = served
    np.save(tmp_path / "x.npy", random_image(12))
    receipt_dir = tmp_path / "receipt"
    env = {**os.environ, "SMLAAS_CACHE_DIR": str(running.test_cache)}
    infer = subprocess.run(
        [sys.executable, "-m", "smlaas", "infer", "--url", running.url, "--ca",
         str(running.ca_path), "--input", str(tmp_path / "x.npy"), "--receipt",
         str(receipt_dir)], capture_output=True, text=True, timeout=120, env=env)
    assert infer.returncode == 0, infer.stderr
    assert sorted(p.name for p in receipt_dir.iterdir()) == [
        "evidence.cbor", "receipt.cose", "request.bin", "response.bin"]
    command = [sys.executable, "-m", "smlaas", "receipt", "verify", str(receipt_dir),
               "--owner-key", str(running.owner_public_key_path)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "SIMULATED" in refused.stdout + refused.stderr
    checked = subprocess.run([*command, "--allow-simulation"], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SIMULATED" in checked.stdout
    (receipt_dir / "response.bin").write_bytes(b"x" + (receipt_dir / "response.bin")
                                               .read_bytes()[1:])
    tampered = subprocess.run([*command, "--allow-simulation"], capture_output=True,
                              text=True, timeout=60)
    assert tampered.returncode == 1 and "response" in tampered.stdout + tampered.stderr
