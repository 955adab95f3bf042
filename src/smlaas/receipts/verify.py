"""Checking a receipt offline: every signature, every key's quote under the owner's manifest,
the chain complete and in order, the owner's release, and the request and response bytes.

The owner's public key is the one thing trusted from outside: it must have signed the release,
the release names the manifest's digest, the manifest's policy says which measurement each
role must have (``--policy`` replaces it), and each receipt key must be bound by a quote that
policy accepts for the role and replica the receipt claims. A simulated deployment's quotes
chain to the simulation's root, which is trusted only with ``allow_simulation``: its receipts
prove nothing (the verdict says SIMULATED).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.manifest import Manifest, stage_role
from smlaas.coordinator.release import MAX_VALIDITY_S, Release, SignedRelease
from smlaas.enclave.attestation import attest
from smlaas.enclave.policy import Policy
from smlaas.enclave.sim_pki import SIM_TCB_SIGNER
from smlaas.enclave.verification import INTEL_ROOT, TrustedRoot, load_collateral
from smlaas.errors import (
    AttestationError,
    ConfigError,
    InputError,
    ReceiptError,
    ReleaseError,
)
from smlaas.receipts.claims import FORMAT, IAT, chain_link
from smlaas.receipts.cose import unverified, verified
from smlaas.receipts.digests import bytes_digest, leaf_hash, root_from_path
from smlaas.receipts.evidence import EvidenceBundle, KeyEvidence, receipt_binding


@dataclass(frozen=True)
class ReceiptVerdict:
    """A receipt that verified: what it proves (on hardware)."""

    model: str
    request_id: str
    manifest_digest: str
    release_version: int
    stages: int
    simulated: bool
    issued_at: int

    def summary(self) -> str:
        kind = "SIMULATED (insecure: proves nothing about enclaves)" if self.simulated else \
            "hardware"
        return (f"valid receipt: request id {self.request_id!r} through the manifest's "
                f"{self.stages} sub-model(s) (manifest {self.manifest_digest[:16]}, owner's "
                f"release v{self.release_version}; served as {self.model!r}, a name the host "
                f"chooses), {kind}")


def verify_receipt(receipt: bytes, evidence: EvidenceBundle, *,
                   owner_public_key: ec.EllipticCurvePublicKey,
                   request: bytes | None = None, response: bytes | None = None,
                   policy: Policy | None = None, allow_simulation: bool = False,
                   sim_root: bytes | None = None) -> ReceiptVerdict:
    """The verdict on ``receipt``; ReceiptError (or an AttestationError) naming the first
    broken link otherwise. Simulated quotes count only with ``allow_simulation`` or a
    ``policy`` that allows them (never because the evidence's own manifest does)."""
    try:
        manifest = Manifest.from_json(evidence.manifest_json)
    except ConfigError as err:
        raise ReceiptError(f"the evidence's manifest is not valid: {err}") from err
    manifest_digest = manifest.digest()
    release = _release(evidence, owner_public_key, manifest_digest)
    # Quotes are checked as of when the gateway signed (its time, verified with its
    # signature below, lies in the owner's release window): a receipt stays checkable after
    # the collateral it was made under has aged.
    try:
        signed_at = _int(unverified(receipt)[1], IAT, "the gateway's receipt")
    except ReceiptError as err:
        raise ReceiptError(f"the gateway's receipt: {err}") from err
    if not 0 <= signed_at < 1 << 40:
        raise ReceiptError(f"the gateway's receipt has an impossible time {signed_at}")
    checker = _KeyChecker(evidence, manifest, policy, allow_simulation=allow_simulation,
                          sim_root=sim_root, at=signed_at)
    claims = checker.verified(receipt, role="gateway", what="the gateway's receipt")
    _expect(claims, "manifest", manifest_digest, "the gateway's receipt")
    _expect(claims, "release", release.version, "the gateway's receipt")
    issued = _int(claims, IAT, "the gateway's receipt")
    # The release in the evidence may be a renewal (same version, later window) of the one
    # the gateway served under: it must not have expired when the gateway signed, and a
    # release of this version was valid then (at most MAX_VALIDITY_S before this one).
    if not release.issued_at - MAX_VALIDITY_S <= issued < release.expires_at:
        raise ReceiptError(f"the gateway signed at {issued}, outside the owner's release "
                           f"v{release.version} ({release.issued_at} to {release.expires_at})")
    if claims.get("smlaas") != FORMAT:
        raise ReceiptError(f"the gateway's receipt is in format {claims.get('smlaas')!r}; "
                           f"this verifier reads format {FORMAT}")
    for name, data in (("request", request), ("response", response)):
        if data is not None and bytes_digest(data) != claims.get(name):
            raise ReceiptError(f"the {name} file is not the {name} the receipt covers "
                               f"(BLAKE3 differs)")
    salt = _bytes(claims, "salt", "the gateway's receipt")
    entries = claims.get("stages")
    count = len(manifest.topology) - 1
    if not isinstance(entries, list) or len(entries) != count:
        raise ReceiptError(f"the chain has {len(entries) if isinstance(entries, list) else 0}"
                           f" stage receipt(s); the manifest has {count} stages")
    expected_in = _bytes(claims, "received", "the gateway's receipt")
    previous: bytes | None = None
    for index, entry in enumerate(entries):
        what = f"stage {index}'s receipt"
        if not isinstance(entry, dict):
            raise ReceiptError(f"{what} is malformed")
        cose = _bytes(entry, "receipt", what)
        stage = checker.verified(cose, role=stage_role(index), what=what)
        _expect(stage, "manifest", manifest_digest, what)
        stage_release = _int(stage, "release", what)
        if not 0 <= stage_release <= release.version:  # a stage signs under the release it
            raise ReceiptError(f"{what} names release {stage_release}, after the gateway's "
                               f"v{release.version}")  # registered with (same manifest)
        committed = manifest.stages.get(index)
        if committed is None or stage.get("model") != committed.sha256:
            raise ReceiptError(f"{what} names another sub-model than the manifest's stage "
                               f"{index}")
        if index == 0:
            if "prev" in stage:
                raise ReceiptError(f"{what} claims a previous stage")
        elif stage.get("prev") != chain_link(previous or b""):
            raise ReceiptError(f"{what} does not follow stage {index - 1}'s receipt (the "
                               f"stages are out of order, or from different batches)")
        received, sent = _bytes(entry, "received", what), _bytes(entry, "sent", what)
        if received != expected_in:
            raise ReceiptError(f"{what}: the tensors it received are not the ones "
                               + ("the gateway received" if index == 0 else
                                  f"stage {index - 1} sent"))
        leaf = leaf_hash(salt, received, sent)
        path = entry.get("path")
        if not isinstance(path, list) or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], bool)
                and isinstance(p[1], bytes) for p in path):
            raise ReceiptError(f"{what}: the Merkle path is malformed")
        if root_from_path(leaf, [(p[0], p[1]) for p in path]) != stage.get("root"):
            raise ReceiptError(f"{what}: this request is not in the batch the stage signed")
        expected_in, previous = sent, cose
    if expected_in != claims.get("sent"):
        raise ReceiptError("the gateway's outputs are not the ones the last stage sent")
    return ReceiptVerdict(str(claims.get("model")), str(claims.get("request_id")),
                          manifest_digest, release.version, count, checker.simulated, issued)


def _release(evidence: EvidenceBundle, owner: ec.EllipticCurvePublicKey,
             manifest_digest: str) -> Release:
    if evidence.release is None:
        raise ReceiptError("the evidence holds no owner release")
    try:
        release = SignedRelease.from_dict(dict(evidence.release)).verify(owner)
    except ReleaseError as err:
        raise ReceiptError(f"the owner's release: {err}") from err
    if release.manifest_digest != manifest_digest:
        raise ReceiptError(f"the owner's release is for manifest "
                           f"{release.manifest_digest[:16]}, not the evidence's "
                           f"{manifest_digest[:16]}")
    return release


class _KeyChecker:
    """Verifies receipts by key id, each key's quote once."""

    def __init__(self, evidence: EvidenceBundle, manifest: Manifest, policy: Policy | None,
                 *, allow_simulation: bool, sim_root: bytes | None, at: int) -> None:
        self.evidence, self.manifest = evidence, manifest
        self.at = dt.datetime.fromtimestamp(at, dt.UTC)
        # Simulation is the verifier's decision: the flag, or a policy the verifier gave.
        # The manifest's own policy allows it for every sim deployment, so it never counts.
        allow = allow_simulation or (policy is not None and policy.allow_simulation_insecure)
        self.policy = replace(policy or manifest.parsed_policy(), allow_simulation_insecure=allow)
        self.allow_simulation, self.sim_root = allow, sim_root
        self.simulated = False
        self._checked: set[bytes] = set()

    def verified(self, cose: bytes, *, role: str, what: str) -> dict[Any, Any]:
        try:
            kid, _ = unverified(cose)
        except ReceiptError as err:
            raise ReceiptError(f"{what}: {err}") from err
        key = self.evidence.key(kid)
        if key is None:
            raise ReceiptError(f"{what} is signed by key {kid.hex()}, which the evidence "
                               f"does not hold (another deployment's?)")
        if key.role != role:
            raise ReceiptError(f"{what} is signed by {key.role}'s key, not {role}'s")
        try:
            claims = verified(cose, key.public_key)
        except ReceiptError as err:
            raise ReceiptError(f"{what}: {err}") from err
        if claims.get("role") != role or claims.get("replica") != key.replica:
            raise ReceiptError(f"{what} claims {claims.get('role')} replica "
                               f"{claims.get('replica')}; its key is {key.role} replica "
                               f"{key.replica}'s")
        self._check_key(key, what)
        return claims

    def _check_key(self, key: KeyEvidence, what: str) -> None:
        if key.kid in self._checked:
            return
        if key.role != "gateway":
            index = int(key.role.split("-")[1])
            if not 0 <= key.replica < self.manifest.replicas_of(index):
                raise ReceiptError(f"{what}: {key.role} replica {key.replica} is not in the "
                                   f"manifest ({self.manifest.replicas_of(index)} replica(s))")
        roots: list[TrustedRoot] = [INTEL_ROOT]
        if key.simulated:
            if not self.allow_simulation:
                raise ReceiptError(f"{what} comes from a SIMULATED enclave; verify with "
                                   f"--allow-simulation (it then proves nothing)")
            root = self.sim_root or key.sim_root
            if root is None:
                raise ReceiptError(f"{what}: simulated evidence without its root")
            roots.append(TrustedRoot("smlaas SIMULATION root (INSECURE)", root,
                                     simulated=True, tcb_signer=SIM_TCB_SIGNER))
        try:
            collateral = load_collateral(key.collateral, source=f"{key.role}'s evidence")
            verdict = attest(key.quote, collateral, policy=self.policy, roots=roots,
                             role=key.role, expected_report_data=receipt_binding(
                                 key.role, key.replica, key.public_key, self.manifest.digest()),
                             whose=f"{key.role} replica {key.replica}'s",
                             at=self.at)
        except (AttestationError, InputError) as err:
            raise ReceiptError(f"{what}: its key's quote: {err}") from err
        self.simulated = self.simulated or verdict.simulated
        self._checked.add(key.kid)


def _expect(claims: dict[Any, Any], name: str, value: Any, what: str) -> None:
    if claims.get(name) != value:
        raise ReceiptError(f"{what} names {name} {claims.get(name)!r}, expected {value!r}")


def _bytes(claims: dict[Any, Any], name: str, what: str) -> bytes:
    value = claims.get(name)
    if not isinstance(value, bytes):
        raise ReceiptError(f"{what} has no {name}")
    return value


def _int(claims: dict[Any, Any], name: Any, what: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReceiptError(f"{what} has no {name}")
    return value
