"""Receipt test vectors: a valid receipt chain of a simulated 3-stage deployment, and invalid
variants that each break a different check of ``smlaas receipt verify``.

No deployment runs. Each role replica is a :class:`SimBackend` (all on one simulation PKI)
whose receipt key is bound by a sim quote (:func:`key_evidence`, as a stage reports it at
start); the owner signs a release of the manifest; the signers of
:mod:`smlaas.receipts.claims` sign one batch of three requests through the three stages and
the gateway signs request 1's receipt, the way the stage workers and the gateway do. Every
vector is a directory as ``smlaas infer --receipt DIR`` writes it (``receipt.cose``,
``evidence.cbor``, ``request.bin``, ``response.bin``); :data:`VECTORS` says, per vector, who
could make it and which check must reject it (tests/data/receipts/README.md in prose).

Generated, not committed: a sim quote's collateral is issued a day before the quote, valid for
30 days from then, and the manifest's policy accepts collateral at most 7 days old
(``max_collateral_age_days``, checked as of the time of verification), so vectors in the
repository would stop verifying within a week, each for the same wrong reason. The tests
generate them into a temporary directory. Keys (owner, receipt keys, stage keys), tensors,
salts, requests and responses are fixed (seeded); quotes, collateral, the simulation PKI and
the times are fresh on every run. ``python -m tests.receipt_vectors DIR`` writes a set to
look at (``smlaas receipt verify DIR/valid --owner-key tests/data/receipts/owner.pub
--allow-simulation``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smlaas.coordinator.manifest import Manifest, StageCommitment, key_commitment, stage_role
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.release import Release, SignedRelease, sign_release
from smlaas.enclave.backends.sim import SimBackend
from smlaas.enclave.measurement import measure
from smlaas.receipts.claims import GatewaySigner, StageReceipt, StageSigner, chain_link
from smlaas.receipts.cose import COSE_SIGN1_TAG, ReceiptKey
from smlaas.receipts.digests import bytes_digest, row_slices, tensors_digest
from smlaas.receipts.evidence import EvidenceBundle, KeyEvidence, key_evidence

DATA_DIR = Path(__file__).resolve().parent / "data" / "receipts"
OWNER_PUB = DATA_DIR / "owner.pub"
"""The vectors' owner public key (hex SPKI DER), committed: derived from a fixed seed."""
RECEIPT_FILES = ("receipt.cose", "evidence.cbor", "request.bin", "response.bin")

MODEL = "receipt-vectors"
STAGES = 3
REPLICAS = {1: 2}
"""Stage 1 has two replicas (0 and 1) in the manifest; the batch goes through replica 1."""
BATCH_REPLICA = {0: 0, 1: 1, 2: 0}
REQUEST_ROWS = (1, 2, 1)
"""Three requests in the batch; the middle one has two rows."""
RECEIPT_INDEX = 1
"""The request of the batch whose receipt every vector holds."""
TENSORS = ("input", "act0", "act1", "output")
"""Stage k receives TENSORS[k] and sends TENSORS[k + 1] on."""
MEASURED_CONFIG: dict[str, Any] = {"test": "receipt vectors"}
_P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


@dataclass(frozen=True)
class Vector:
    """One test vector: what it models and which check rejects it."""

    attacker: str
    change: str
    rejected_by: str | None
    """A fragment of the error naming the first broken link (None: the vector is valid)."""


VECTORS: dict[str, Vector] = {
    "valid": Vector(
        "-", "an honest chain: 3 requests batched through stage-0, stage-1 replica 1, "
        "stage-2; the receipt of request 1", None),
    "tampered-output": Vector(
        "whoever holds the directory (e.g. a client claiming another answer)",
        "response.bin differs by one byte", "the response file is not the response"),
    "request-off-by-one-byte": Vector(
        "whoever holds the directory", "request.bin differs by one byte",
        "the request file is not the request"),
    "tampered-receipt": Vector(
        "whoever holds the directory, without any enclave key",
        "the gateway's claims name another response (and response.bin is that response); "
        "the signature is the original one", "the gateway's receipt: the signature"),
    "older-format": Vector(
        "a gateway of an older smlaas (claims format 1: SHA-256 request and response digests)",
        "the gateway's claims say format 1", "this verifier reads format 2"),
    "gateway-forged-output": Vector(
        "the gateway key (a compromised gateway)",
        "the gateway returns an output the last stage never sent, and signs it",
        "the gateway's outputs are not the ones the last stage sent"),
    "activation-substituted": Vector(
        "the host between stage 1 and stage 2 (stage 2 signs what it got)",
        "stage 2 ran on other activations than stage 1 sent",
        "stage 2's receipt: the tensors it received are not the ones stage 1 sent"),
    "tampered-stage-digest": Vector(
        "the gateway key, covering up activation-substituted",
        "the gateway rewrites stage 1's sent digest to what stage 2 received",
        "stage 1's receipt: this request is not in the batch the stage signed"),
    "stages-swapped": Vector(
        "the gateway key", "stage 0's and stage 1's receipts swapped in the gateway's list, "
        "re-signed by the gateway", "stage 0's receipt is signed by stage-1's key"),
    "stages-from-two-batches": Vector(
        "the gateway key", "stage 0's receipt of this batch, stage 1's and 2's of another "
        "batch", "stage 1's receipt does not follow stage 0's receipt"),
    "another-deployment": Vector(
        "the host, routing stage 1's traffic to another deployment of the same code",
        "stage 1's receipt is signed by the other deployment's stage-1 key, which the "
        "evidence does not hold", "which the evidence does not hold"),
    "another-deployment-evidence": Vector(
        "the host, as in another-deployment, also adding that key's evidence to "
        "evidence.cbor (the evidence is not signed as a whole)",
        "the key's quote binds the other deployment's manifest",
        "stage 1's receipt: its key's quote: report_data"),
    "replica-not-in-manifest": Vector(
        "the host, running a third stage-1 replica of the pinned code",
        "stage 1 was replica 2 (the manifest has replicas 0 and 1); its key is in the "
        "evidence, bound by its quote", "stage-1 replica 2 is not in the manifest"),
    "modified-stage-code": Vector(
        "the host, running other code as stage-1 replica 1",
        "that replica's quote has another MRENCLAVE than the manifest's policy pins",
        "stage 1's receipt: its key's quote: measurement"),
    "expired-release": Vector(
        "the host, serving on after the owner's release expired (not renewed)",
        "the release in the evidence expired an hour before the gateway signed",
        "outside the owner's release"),
    "other-owner": Vector(
        "the host, releasing the deployment under an owner key of its own",
        "the release in the evidence is signed by another owner key",
        "the owner's release: the release is not signed by the owner key"),
}


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"smlaas receipt vectors|" + label.encode()).digest()


def seeded_owner(label: str = "owner") -> OwnerKey:
    scalar = int.from_bytes(_seed(label), "big") % (_P256_ORDER - 1) + 1
    return OwnerKey(ec.derive_private_key(scalar, ec.SECP256R1()))


def seeded_receipt_key(label: str) -> ReceiptKey:
    return ReceiptKey(Ed25519PrivateKey.from_private_bytes(_seed(label)))


def sub_model_sha256(index: int) -> str:
    return hashlib.sha256(f"receipt vectors sub-model {index}".encode()).hexdigest()


@dataclass
class Deployment:
    """One simulated deployment: a manifest, the owner's release of it, and a receipt key
    bound by a quote for every role replica of the manifest."""

    label: str
    pki_dir: Path
    owner: OwnerKey
    now: int = field(default_factory=lambda: int(time.time()))
    enclaves: dict[tuple[str, int], tuple[KeyEvidence, ReceiptKey]] = field(
        init=False, default_factory=dict)

    def __post_init__(self) -> None:
        roles = ["gateway", *(stage_role(k) for k in range(STAGES))]
        self.manifest = Manifest(
            version=1,
            policy={"allow_simulation_insecure": True, "roles": {
                role: {"mrenclave": [measure(role, MEASURED_CONFIG).mrenclave.hex()]}
                for role in roles}},
            topology=tuple(roles),
            stages={k: StageCommitment(key_commitment(k, _seed(f"{self.label} stage key {k}")),
                                       sub_model_sha256(k)) for k in range(STAGES)},
            max_batch_size=sum(REQUEST_ROWS), replicas=dict(REPLICAS))
        self.digest = self.manifest.digest()
        self.release = self.signed_release()
        self.enclaves["gateway", 0] = self.enclave("gateway", 0)
        for index in range(STAGES):
            for replica in range(self.manifest.replicas_of(index)):
                self.enclaves[stage_role(index), replica] = self.enclave(stage_role(index),
                                                                         replica)

    def signed_release(self, *, owner: OwnerKey | None = None, issued_at: int | None = None,
                       validity_s: int = 3600) -> SignedRelease:
        signer = owner or self.owner
        issued = self.now - 60 if issued_at is None else issued_at
        return sign_release(signer.private_key, Release(
            owner=signer.fingerprint,
            coordinator_instance=_seed(f"{self.label} coordinator").hex(),
            coordinator_mrenclave=measure("coordinator", MEASURED_CONFIG).mrenclave.hex(),
            coordinator_address="", manifest_digest=self.digest, version=1,
            issued_at=issued, expires_at=issued + validity_s))

    def enclave(self, role: str, replica: int, *, config: Mapping[str, Any] | None = None
                ) -> tuple[KeyEvidence, ReceiptKey]:
        """A role replica's enclave (``config``: measured as other code), its receipt key
        and the evidence binding that key (as the replica reports it at start)."""
        measured = dict(config or MEASURED_CONFIG)
        backend = SimBackend(role, config=measured, pki_dir=self.pki_dir)
        key = seeded_receipt_key(f"{self.label} {role} {replica} "
                                 f"{json.dumps(measured, sort_keys=True)}")
        return key_evidence(backend, key, role=role, replica=replica,
                            manifest_digest=self.digest), key

    def stage_signer(self, index: int, replica: int, *, key: ReceiptKey | None = None
                     ) -> StageSigner:
        return StageSigner(key or self.enclaves[stage_role(index), replica][1],
                           stage_role(index), replica, self.digest, 1, sub_model_sha256(index))

    def gateway_signer(self) -> GatewaySigner:
        return GatewaySigner(self.enclaves["gateway", 0][1], self.digest, 1, MODEL)

    def evidence(self, *, extra: Sequence[KeyEvidence] = (),
                 instead: Mapping[tuple[str, int], KeyEvidence] | None = None,
                 release: SignedRelease | None = None) -> EvidenceBundle:
        """What ``GET /v2/smlaas/evidence`` serves: every role replica's key (``instead``
        replaces some, ``extra`` adds others) beside the manifest and the release."""
        keys = [(instead or {}).get(slot, evidence)
                for slot, (evidence, _) in sorted(self.enclaves.items())]
        return EvidenceBundle(self.manifest.to_json(), (release or self.release).to_dict(),
                              (*keys, *extra))


# -- the batch -----------------------------------------------------------------------------
def batch_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rows = sum(REQUEST_ROWS)
    values = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) / 8 + seed
    return {TENSORS[0]: values}


def stage_compute(index: int, received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stage ``index``'s stand-in sub-model."""
    value = received[TENSORS[index]]
    return {TENSORS[index + 1]: (value * (index + 2) + 1).astype(np.float32)}


SALTS = tuple(_seed(f"salt {i}")[:16] for i in range(len(REQUEST_ROWS)))


@dataclass(frozen=True)
class Batch:
    """A batch through the stages: what each stage received and sent, and its receipt."""

    received: tuple[dict[str, np.ndarray], ...]
    sent: tuple[dict[str, np.ndarray], ...]
    receipts: tuple[StageReceipt, ...]

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return self.received[0]

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        return self.sent[-1]


Substitute = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


def run_batch(signers: Sequence[StageSigner], inputs: Mapping[str, np.ndarray], *,
              substitute: Substitute | None = None) -> Batch:
    """The stages sign the batch in turn, each naming the previous one's receipt;
    ``substitute(k, tensors)`` replaces what stage k receives (an attack in transit)."""
    received, sent, receipts = [], [], []
    tensors, prev = dict(inputs), None
    for index, signer in enumerate(signers):
        if substitute is not None:
            tensors = substitute(index, tensors)
        outputs = stage_compute(index, tensors)
        receipt = signer.sign_batch(tensors, outputs, rows=REQUEST_ROWS, salts=SALTS,
                                    prev=prev)
        received.append(tensors)
        sent.append(outputs)
        receipts.append(receipt)
        tensors, prev = outputs, chain_link(receipt.cose)
    return Batch(tuple(received), tuple(sent), tuple(receipts))


def _rows(tensors: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    part = row_slices(REQUEST_ROWS)[index]
    return {name: value[part] for name, value in tensors.items()}


def v2_body(tensors: Mapping[str, np.ndarray], *, request_id: str, key: str) -> bytes:
    """A KServe V2 JSON body (the exact bytes the receipt covers)."""
    return json.dumps({"id": request_id, key: [
        {"name": name, "datatype": "FP32", "shape": list(value.shape),
         "data": value.reshape(-1).tolist()} for name, value in sorted(tensors.items())],
        **({"parameters": {"receipt": True}} if key == "inputs" else {})},
        sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Exchange:
    """One request's exact request and response bytes and its input and output rows."""

    request_id: str
    request: bytes
    response: bytes
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def exchange(batch: Batch, index: int) -> Exchange:
    request_id = f"req-{index}"
    inputs, outputs = _rows(batch.inputs, index), _rows(batch.outputs, index)
    return Exchange(request_id, v2_body(inputs, request_id=request_id, key="inputs"),
                    v2_body(outputs, request_id=request_id, key="outputs"), inputs, outputs)


def gateway_receipt(signer: GatewaySigner, batch: Batch, index: int, *,
                    stages: Sequence[StageReceipt] | None = None,
                    edit: Callable[[list[dict[str, Any]]], None] | None = None,
                    served: Exchange | None = None) -> bytes:
    """Request ``index``'s receipt (``stages``: another list than the batch's; ``edit``
    changes the stage entries before signing; ``served``: what the gateway answered)."""
    served = served or exchange(batch, index)
    if edit is None:
        return signer.sign_request(
            request_id=served.request_id,
            request_digest=bytes_digest(served.request),
            response_bytes=served.response, received=tensors_digest(served.inputs),
            sent=tensors_digest(served.outputs), salt=SALTS[index],
            stages=stages or batch.receipts, index=index)
    # Re-signing edited entries takes the gateway's key: decode, edit, sign again.
    honest = gateway_receipt(signer, batch, index, stages=stages, served=served)
    claims = _claims(honest)
    edit(claims["stages"])
    return signer.key.sign(claims)


def _claims(cose: bytes) -> dict[Any, Any]:
    claims = cbor2.loads(cbor2.loads(cose).value[2])
    assert isinstance(claims, dict)
    return claims


def with_payload(cose: bytes, claims: dict[Any, Any]) -> bytes:
    """``cose`` with its payload replaced and its signature kept (no key needed)."""
    protected, unprotected, _, signature = cbor2.loads(cose).value
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [
        protected, unprotected, cbor2.dumps(claims, canonical=True), signature]))


def one_byte_changed(data: bytes, position: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


# -- writing -------------------------------------------------------------------------------
def write_vector(directory: Path, receipt: bytes, evidence: EvidenceBundle, request: bytes,
                 response: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in zip(RECEIPT_FILES, (receipt, evidence.encode(), request, response),
                          strict=True):
        (directory / name).write_bytes(data)
    return directory


def generate(out_dir: Path, *, pki_dir: Path) -> dict[str, Path]:
    """Writes every vector of :data:`VECTORS` into ``out_dir/NAME`` (and ``owner.pub``),
    with the simulation PKI in ``pki_dir``; returns NAME -> directory."""
    owner = seeded_owner()
    ours = Deployment("deployment A", pki_dir, owner)
    theirs = Deployment("deployment B", pki_dir, seeded_owner("owner B"))
    gateway = ours.gateway_signer()
    signers = [ours.stage_signer(k, BATCH_REPLICA[k]) for k in range(STAGES)]
    batch = run_batch(signers, batch_inputs())
    served = exchange(batch, RECEIPT_INDEX)
    evidence = ours.evidence()
    receipt = gateway_receipt(gateway, batch, RECEIPT_INDEX)
    out: dict[str, tuple[bytes, EvidenceBundle, bytes, bytes]] = {}

    out["valid"] = receipt, evidence, served.request, served.response
    out["tampered-output"] = (receipt, evidence, served.request,
                              one_byte_changed(served.response, len(served.response) // 2))
    out["request-off-by-one-byte"] = (receipt, evidence,
                                      one_byte_changed(served.request, len(served.request) // 2),
                                      served.response)

    claimed = one_byte_changed(served.response, len(served.response) // 2)
    claims = _claims(receipt)
    claims["response"] = bytes_digest(claimed)
    out["tampered-receipt"] = with_payload(receipt, claims), evidence, served.request, claimed

    older = _claims(receipt)
    older["smlaas"] = 1
    out["older-format"] = (gateway.key.sign(older), evidence, served.request, served.response)

    forged_outputs = {name: value + 1 for name, value in served.outputs.items()}
    forged = replace(served, outputs=forged_outputs, response=v2_body(
        forged_outputs, request_id=served.request_id, key="outputs"))
    out["gateway-forged-output"] = (gateway_receipt(gateway, batch, RECEIPT_INDEX,
                                                    served=forged),
                                    evidence, served.request, forged.response)

    def substitute(index: int, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if index != 2:
            return tensors
        changed = {name: value.copy() for name, value in tensors.items()}
        changed[TENSORS[2]][row_slices(REQUEST_ROWS)[RECEIPT_INDEX]] += 0.5
        return changed

    substituted = run_batch(signers, batch_inputs(), substitute=substitute)
    sub_served = exchange(substituted, RECEIPT_INDEX)
    out["activation-substituted"] = (gateway_receipt(gateway, substituted, RECEIPT_INDEX),
                                     evidence, sub_served.request, sub_served.response)

    def cover_up(entries: list[dict[str, Any]]) -> None:
        entries[1]["sent"] = entries[2]["received"]

    out["tampered-stage-digest"] = (gateway_receipt(gateway, substituted, RECEIPT_INDEX,
                                                    edit=cover_up),
                                    evidence, sub_served.request, sub_served.response)

    swapped = (batch.receipts[1], batch.receipts[0], *batch.receipts[2:])
    out["stages-swapped"] = (gateway_receipt(gateway, batch, RECEIPT_INDEX, stages=swapped),
                             evidence, served.request, served.response)

    other_batch = run_batch(signers, batch_inputs(seed=1))
    spliced = (batch.receipts[0], *other_batch.receipts[1:])
    out["stages-from-two-batches"] = (gateway_receipt(gateway, batch, RECEIPT_INDEX,
                                                      stages=spliced),
                                      evidence, served.request, served.response)

    foreign = run_batch([signers[0], theirs.stage_signer(1, 0), signers[2]], batch_inputs())
    foreign_receipt = gateway_receipt(gateway, foreign, RECEIPT_INDEX)
    out["another-deployment"] = foreign_receipt, evidence, served.request, served.response
    out["another-deployment-evidence"] = (
        foreign_receipt, ours.evidence(extra=[theirs.enclaves["stage-1", 0][0]]), served.request,
        served.response)

    extra_replica, extra_key = ours.enclave("stage-1", 2)
    third = run_batch([signers[0], ours.stage_signer(1, 2, key=extra_key), signers[2]],
                      batch_inputs())
    out["replica-not-in-manifest"] = (gateway_receipt(gateway, third, RECEIPT_INDEX),
                                      ours.evidence(extra=[extra_replica]), served.request,
                                      served.response)

    patched_evidence, patched_key = ours.enclave(
        "stage-1", 1, config={**MEASURED_CONFIG, "patched": True})
    patched = run_batch([signers[0], ours.stage_signer(1, 1, key=patched_key), signers[2]],
                        batch_inputs())
    out["modified-stage-code"] = (gateway_receipt(gateway, patched, RECEIPT_INDEX),
                                  ours.evidence(instead={("stage-1", 1): patched_evidence}),
                                  served.request, served.response)

    expired = ours.signed_release(issued_at=ours.now - 3 * 3600, validity_s=2 * 3600)
    out["expired-release"] = (receipt, ours.evidence(release=expired), served.request,
                              served.response)
    out["other-owner"] = (receipt, ours.evidence(
        release=ours.signed_release(owner=seeded_owner("someone else"))), served.request,
        served.response)

    assert set(out) == set(VECTORS), "every vector is generated and documented"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "owner.pub").write_text(owner.public_key_hex + "\n")
    return {name: write_vector(out_dir / name, *files) for name, files in out.items()}


def request_receipts(out_dir: Path, *, pki_dir: Path) -> dict[int, Path]:
    """The valid receipt of every request of one batch (``out_dir/request-K``), to check
    that none verifies against another request's bytes."""
    ours = Deployment("deployment A", pki_dir, seeded_owner())
    batch = run_batch([ours.stage_signer(k, BATCH_REPLICA[k]) for k in range(STAGES)],
                      batch_inputs())
    evidence = ours.evidence()
    written = {}
    for index in range(len(REQUEST_ROWS)):
        served = exchange(batch, index)
        written[index] = write_vector(
            out_dir / f"request-{index}", gateway_receipt(ours.gateway_signer(), batch, index),
            evidence, served.request, served.response)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.receipt_vectors OUT_DIR")
    target = Path(sys.argv[1])
    for name, path in generate(target, pki_dir=target / "sim-pki").items():
        print(f"{name:<28} {path}")
