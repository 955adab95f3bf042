"""Attacks on receipts, driven against a real deployment's receipts and evidence (sim backend,
real processes on 127.0.0.1). The host holds no enclave key; what it can do is hand a
verifier other evidence, build a whole chain with enclaves it runs itself, or mix receipts and
evidence of two deployments. Each must fail, naming what broke."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from pathlib import Path

import numpy as np
import pytest

from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.owner import parse_public_key
from smlaas.enclave.backends import create_backend
from smlaas.errors import ReceiptError
from smlaas.receipts.claims import GatewaySigner, StageSigner, chain_link
from smlaas.receipts.cose import ReceiptKey
from smlaas.receipts.digests import bytes_digest, tensors_digest
from smlaas.receipts.evidence import EvidenceBundle, key_evidence
from smlaas.receipts.verify import verify_receipt
from tests.integration.serving_setup import cache_env, deployment, random_image, sealed_build


@pytest.fixture(scope="module")
def two_deployments(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("receipt-attacks")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root, machines=2)
        with deployment(root, build, keys) as first, deployment(root, build, keys) as second:
            yield first, second


def _receipt(running):
    with running.client(receipts=True) as client:
        result = client.infer({"input": random_image(3)})
        evidence = client.evidence()
    assert result.receipt is not None
    return result.receipt, EvidenceBundle.decode(evidence)


def _owner(running):
    return parse_public_key(Path(running.owner_public_key_path).read_text().strip())


def test_a_genuine_receipt_verifies(two_deployments) -> None:
    first, _ = two_deployments
    receipt, evidence = _receipt(first)
    verdict = verify_receipt(receipt.cose, evidence, owner_public_key=_owner(first),
                             request=receipt.request, response=receipt.response,
                             allow_simulation=True)
    assert verdict.simulated and "SIMULATED" in verdict.summary()


def test_a_manifest_swapped_into_the_evidence_is_not_the_owners(two_deployments) -> None:
    """The host hands over evidence whose manifest accepts any measurement."""
    first, _ = two_deployments
    receipt, evidence = _receipt(first)
    manifest = json.loads(evidence.manifest_json)
    for rule in manifest["policy"]["roles"].values():  # any measurement of the host's
        rule["mrenclave"] = ["ff" * 32]
    swapped = Manifest.from_json(json.dumps(manifest)).to_json()
    forged = dataclasses.replace(evidence, manifest_json=swapped)
    with pytest.raises(ReceiptError, match="release is for manifest"):
        verify_receipt(receipt.cose, forged, owner_public_key=_owner(first),
                       allow_simulation=True)


def test_a_chain_signed_by_enclaves_the_host_runs_is_refused(two_deployments) -> None:
    """The host runs its own (unpinned) gateway and stages, which sign a whole chain for an
    output of its choosing, and puts their quotes beside the owner's manifest and release."""
    first, _ = two_deployments
    receipt, evidence = _receipt(first)
    manifest = Manifest.from_json(evidence.manifest_json)
    digest, version = manifest.digest(), 1
    if evidence.release is not None:
        version = json.loads(evidence.release["release"])["version"]
    roles = [f"stage-{k}" for k in range(len(manifest.topology) - 1)]
    keys, signers = [], []
    for role in roles:
        key = ReceiptKey()
        backend = create_backend("sim", role, {"argv": ["worker", "--evil"]})
        keys.append(key_evidence(backend, key, role=role, replica=0, manifest_digest=digest))
        signers.append(StageSigner(key, role, 0, digest, version,
                                   manifest.stages[int(role.split("-")[1])].sha256))
    gateway_key = ReceiptKey()
    keys.append(key_evidence(create_backend("sim", "gateway", {"argv": ["gateway", "--evil"]}),
                             gateway_key, role="gateway", replica=0, manifest_digest=digest))
    x = {"input": random_image(4)}
    y = {"fc": np.zeros((1, 1000), np.float32)}  # the host's answer
    salt, stages, prev = secrets.token_bytes(16), [], None
    for signer in signers:
        stage = signer.sign_batch(x, y, rows=[1], salts=[salt], prev=prev)
        stages.append(stage)
        prev, x = chain_link(stage.cose), y
    forged = GatewaySigner(gateway_key, digest, version, "resnet18").sign_request(
        request_id="", request_digest=bytes_digest(b"q"), response_bytes=b"r",
        received=tensors_digest({"input": random_image(4)}), sent=tensors_digest(y),
        salt=salt, stages=stages, index=0)
    bundle = dataclasses.replace(evidence, keys=tuple(keys))
    with pytest.raises(ReceiptError, match="(?i)measurement|mrenclave"):
        verify_receipt(forged, bundle, owner_public_key=_owner(first), allow_simulation=True)
    assert hashlib.sha256(receipt.cose).digest() != hashlib.sha256(forged).digest()


def test_a_receipt_does_not_verify_with_another_deployments_evidence(two_deployments) -> None:
    first, second = two_deployments
    receipt, _ = _receipt(first)
    _, other = _receipt(second)
    with pytest.raises(ReceiptError, match="does not hold"):
        verify_receipt(receipt.cose, other, owner_public_key=_owner(first),
                       allow_simulation=True)


def test_the_host_cannot_slip_a_stage_a_receipt_to_chain_on(two_deployments) -> None:
    """A stage takes the previous stage's receipt (a ``Signed`` message, which it chains its
    own onto) only on the mutual-TLS connection from that stage's attested replica. The host,
    holding no deployment certificate, cannot open one to slip in a receipt of its making;
    the stage goes on signing genuine chains."""
    import socket
    import ssl

    from smlaas.receipts.claims import Leaf, StageReceipt
    from smlaas.serving.protocol import Signed, to_frame
    from smlaas.transport.tensors import encode_message

    first, _ = two_deployments
    argv = first.launcher._processes["stage-1"].spec.argv  # type: ignore[attr-defined]
    host, port = argv[argv.index("--listen") + 1].rsplit(":", 1)
    forged = to_frame("stage-0-0", Signed(StageReceipt(
        b"made by the host", (Leaf(bytes(32), bytes(32)),), (bytes(32),))))
    wire = b"".join(bytes(memoryview(part).cast("B"))
                    for part in encode_message(forged.request_id, forged.tensors, forged.meta))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    answered = b""
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="stage-1") as tls:
                tls.sendall(wire)
                answered = tls.recv(1)
        except (ssl.SSLError, ConnectionError, OSError):
            pass  # refused during or right after the handshake
    assert answered == b""  # never read as a message: the connection ended
    receipt, evidence = _receipt(first)
    verify_receipt(receipt.cose, evidence, owner_public_key=_owner(first),
                   request=receipt.request, response=receipt.response, allow_simulation=True)
