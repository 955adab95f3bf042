"""The coordinator's request handling, independent of sockets.

Requests are JSON objects with an ``op`` (:class:`~smlaas.coordinator.protocol.Op`); every
answer is ``{"ok": true, ...}`` or ``{"ok": false, "code": CODE, "error": MESSAGE}``, whatever
the request held (:meth:`CoordinatorService.handle` never raises):

- ``ca``            -> the deployment CA certificate
- ``status``        -> this instance's id (SHA-256 of its RA-TLS key), the owner key's
                       fingerprint, the deployment CA, and the manifest's digest, version and
                       topology (or null)
- ``set_manifest``  -> {manifest, signature, stage_keys}: the owner's manifest, signed for this
                       instance by the owner key this coordinator was configured (and measured)
                       with; the stage keys must match the manifest's commitments. Replaces a
                       held manifest only with a higher version.
- ``nonce``         -> a fresh single-use nonce, valid for NONCE_TTL_S
- ``register``      -> {role, nonce, quote, public_key, hosts, slot}: verifies the quote
                       against collateral the coordinator obtains itself, the manifest's rules
                       for the role and the binding of role, key and nonce in report_data;
                       issues a certificate naming the role and the manifest digest in its
                       extensions (and, for the gateway, the host names the manifest names),
                       the topology and the batching limit, and, for a stage, claims one of
                       the manifest's replica slots (:mod:`slots`) and releases its key
                       HPKE-encrypted to the attested public key.
- ``release``       -> the owner's latest signed release of the held manifest (or null)
- ``set_release``   -> {release}: a newer release of the held manifest, signed by the owner
                       for this instance (``set_manifest`` may carry the first one too)
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.ca import validated_hosts
from smlaas.coordinator.collateral import collateral_for
from smlaas.coordinator.manifest import GATEWAY_ROLE, Manifest, key_commitment, stage_index
from smlaas.coordinator.owner import (
    parse_public_key,
    public_key_fingerprint,
    verify_manifest_signature,
)
from smlaas.coordinator.protocol import (
    Code,
    Op,
    refusal,
    registration_binding,
    seal_stage_key,
)
from smlaas.coordinator.release import SignedRelease
from smlaas.coordinator.slots import HEARTBEAT_S, LEASE_S, SlotTable
from smlaas.coordinator.state import CoordinatorState, SealedStateStore
from smlaas.enclave.attestation import attest
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.verification import TrustedRoot
from smlaas.errors import (
    AttestationError,
    CoordinatorRefused,
    InputError,
    ReleaseError,
    SmlaasError,
)

logger = logging.getLogger(__name__)
NONCE_TTL_S = 60.0
MAX_NONCES = 4096
LEASE_FIELD = "_lease"
"""The key under which a register answer hands its Lease to the server (never sent)."""


class NonceTable:
    """Single-use nonces, at most ``capacity`` outstanding (the oldest is evicted), each valid
    for ``ttl_s``; O(1) per request."""

    def __init__(self, *, ttl_s: float = NONCE_TTL_S, capacity: int = MAX_NONCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s, self._capacity, self._clock = ttl_s, capacity, clock
        self._issued: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._issued)

    def issue(self) -> bytes:
        nonce = os.urandom(32)
        now = self._clock()
        with self._lock:
            while self._issued:  # insertion order is time order: expired ones are in front
                _, issued = next(iter(self._issued.items()))
                if now - issued < self._ttl_s and len(self._issued) < self._capacity:
                    break
                self._issued.popitem(last=False)
            self._issued[nonce] = now
        return nonce

    def take(self, nonce: bytes) -> None:
        with self._lock:
            issued = self._issued.pop(nonce, None)
        if issued is None or self._clock() - issued >= self._ttl_s:
            raise refusal(Code.BAD_NONCE, "unknown, used or expired nonce (a replayed "
                          "registration, or one slower than its nonce)")


class CoordinatorService:
    def __init__(self, store: SealedStateStore, roots: list[TrustedRoot], *,
                 backend: EnclaveBackend, owner_public_key: str) -> None:
        self._store, self._roots, self._backend = store, roots, backend
        self._owner_key = parse_public_key(owner_public_key)
        self._owner_fingerprint = public_key_fingerprint(owner_public_key)
        self._lock = threading.Lock()
        self.nonces = NonceTable()
        self.slots = SlotTable()
        state = store.load()
        if state is None:
            state = CoordinatorState.create()
            store.save(state)
            logger.info("created a new deployment CA and instance key")
        else:
            logger.info("restored sealed state (%s)", state.manifest.describe()
                        if state.manifest else "no manifest yet")
        self.state = state

    @property
    def instance_key(self) -> ec.EllipticCurvePrivateKey:
        return self.state.instance_key

    def handle(self, request: Any) -> dict[str, Any]:
        """The answer to ``request``; every failure is a refusal with a code."""
        op = request.get("op") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict):
                raise refusal(Code.MALFORMED, "a request is a JSON object")
            handler = self._handlers().get(str(op))
            if handler is None:
                raise refusal(Code.UNKNOWN_OP, f"unknown op {op!r} (known: "
                              f"{', '.join(o.value for o in Op)})")
            return {"ok": True, **handler(request)}
        except CoordinatorRefused as err:
            return self._refused(op, err.code, str(err))
        except InputError as err:
            return self._refused(op, Code.MALFORMED, str(err))
        except AttestationError as err:
            return self._refused(op, Code.NOT_ACCEPTED, str(err))
        except SmlaasError as err:
            logger.error("%s request failed: %s", op, err)
            return self._refused(op, Code.INTERNAL, str(err))
        except Exception:
            logger.exception("%s request failed unexpectedly", op)
            return self._refused(op, Code.INTERNAL, "internal error (see the coordinator's "
                                 "log)")

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        return {Op.CA: lambda _: {"ca": self.state.ca.cert_pem()},
                Op.STATUS: lambda _: self._status(),
                Op.SET_MANIFEST: self._set_manifest,
                Op.NONCE: lambda _: {"nonce": self.nonces.issue().hex()},
                Op.REGISTER: self._register,
                Op.RELEASE: lambda _: {"release": self._release_dict()},
                Op.SET_RELEASE: self._set_release,
                Op.HEARTBEAT: self._stray_heartbeat}

    @staticmethod
    def _refused(op: Any, code: str, message: str) -> dict[str, Any]:
        logger.warning("refused %s request (%s): %s", op, code, message)
        return {"ok": False, "code": str(code), "error": message}

    def _status(self) -> dict[str, Any]:
        state = self.state
        manifest = state.manifest
        return {"instance": state.instance_id.hex(), "owner": self._owner_fingerprint,
                "ca": state.ca.cert_pem(), "manifest": None if manifest is None else {
                    "digest": manifest.digest(), "version": manifest.version,
                    "topology": list(manifest.topology)},
                "release": self._release_dict(), "slots": self.slots.held()}

    def _release_dict(self) -> dict[str, str] | None:
        release = self.state.release
        return release.to_dict() if release is not None else None

    @staticmethod
    def _stray_heartbeat(_: dict[str, Any]) -> dict[str, Any]:
        raise refusal(Code.MALFORMED, "a heartbeat is sent only on the connection a stage "
                      "registered on (its lease)")

    # -- the owner's manifest ------------------------------------------------------------
    def _set_manifest(self, request: dict[str, Any]) -> dict[str, Any]:
        text = request.get("manifest")
        if not isinstance(text, str):
            raise refusal(Code.MALFORMED, "set_manifest needs the manifest's canonical JSON "
                          "text")
        manifest = Manifest.from_json(text)
        if not request.get("signature"):
            raise refusal(Code.BAD_SIGNATURE, "the manifest is unsigned; the coordinator "
                          "accepts only manifests its owner signed for it")
        signature = _base64(request, "signature")
        verify_manifest_signature(self._owner_key, signature, manifest_digest=manifest.digest(),
                                  coordinator_key_sha256=self.state.instance_id)
        keys = _stage_keys(request.get("stage_keys"), manifest)
        release = self._checked_release(request.get("release"), manifest) \
            if request.get("release") is not None else None
        with self._lock:
            held = self.state.manifest
            if held is not None and held.digest() == manifest.digest():
                if release is not None and self._newer(release):
                    self._save(replace(self.state, release=release))
                return {"digest": manifest.digest(), "version": manifest.version}
            if held is not None and manifest.version <= held.version:
                raise refusal(Code.STALE_VERSION, f"this coordinator holds manifest version "
                              f"{held.version} ({held.digest()[:16]}); only a signed manifest "
                              f"with a higher version replaces it, got {manifest.version}")
            self._save(replace(self.state, manifest=manifest, manifest_signature=signature,
                               stage_keys=keys, release=release))
            # Under the lock: a registration claims its slot under the lock too, after
            # checking its manifest is still the one held, so none can slip in under the
            # old manifest once this has run.
            revoked = self.slots.revoke_all_but(manifest.digest())
        logger.info("%s set by the owner (%s)%s", manifest.describe(), self._owner_fingerprint,
                    f"; {revoked} lease(s) of the previous manifest revoked" if revoked else "")
        return {"digest": manifest.digest(), "version": manifest.version}

    def _save(self, updated: CoordinatorState) -> None:
        """Saves first, then uses: a failed save changes nothing (call under the lock)."""
        self._store.save(updated)
        self.state = updated

    # -- the owner's release -------------------------------------------------------------
    def _checked_release(self, raw: Any, manifest: Manifest) -> SignedRelease:
        """The owner's release of ``manifest`` for this instance, or a bad_release refusal."""
        try:
            signed = SignedRelease.from_dict(raw)
            release = signed.verify(self._owner_key)
        except ReleaseError as err:
            raise refusal(Code.BAD_RELEASE, str(err)) from err
        expected = {"owner": self._owner_fingerprint,
                    "coordinator_instance": self.state.instance_id.hex(),
                    "manifest_digest": manifest.digest(), "version": manifest.version}
        for name, value in expected.items():
            if getattr(release, name) != value:
                raise refusal(Code.BAD_RELEASE, f"the release's {name} is "
                              f"{getattr(release, name)!r}, this coordinator's is {value!r}")
        if release.expired(time.time()):
            raise refusal(Code.BAD_RELEASE, f"the release expired at {release.expires_at}")
        return signed

    def _newer(self, signed: SignedRelease) -> bool:
        """Not older than the release held (a refresh within the same second is taken)."""
        held = self.state.release
        return held is None or (signed.release.issued_at, signed.release.expires_at) >= (
            held.release.issued_at, held.release.expires_at)

    def _set_release(self, request: dict[str, Any]) -> dict[str, Any]:
        manifest = self.state.manifest
        if manifest is None:
            raise refusal(Code.NO_MANIFEST, "no manifest is set, so there is nothing to "
                          "release")
        signed = self._checked_release(request.get("release"), manifest)
        with self._lock:
            if self.state.manifest is not manifest:
                raise refusal(Code.BAD_RELEASE, "the manifest changed while the release was "
                              "checked; sign a release of the current one")
            if not self._newer(signed):
                raise refusal(Code.BAD_RELEASE, "this coordinator holds a later release")
            self._save(replace(self.state, release=signed))
        logger.info("%s set by the owner", signed.release.describe())
        return {"release": signed.to_dict()}

    # -- registration --------------------------------------------------------------------
    def _register(self, request: dict[str, Any]) -> dict[str, Any]:
        state = self.state  # one snapshot: this manifest with its own keys
        manifest = state.manifest
        if manifest is None:
            raise refusal(Code.NO_MANIFEST, "no manifest is set yet")
        role = request.get("role")
        if not isinstance(role, str):
            raise refusal(Code.MALFORMED, "register needs a role")
        nonce, quote = _hex(request, "nonce"), _base64(request, "quote")
        public_der = _base64(request, "public_key")
        try:
            public_key = serialization.load_der_public_key(public_der)
        except ValueError as err:
            raise refusal(Code.MALFORMED, f"public_key is not a DER public key: {err}") from err
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or \
                not isinstance(public_key.curve, ec.SECP256R1):
            raise refusal(Code.MALFORMED, "the registering key must be an EC P-256 key")
        if role not in manifest.topology:
            raise refusal(Code.UNKNOWN_ROLE, f"role {role!r} is not in the manifest's "
                          f"topology ({', '.join(manifest.topology)})")
        hosts = owner_named_hosts(role, validated_hosts(role, request.get("hosts", [])),
                                  manifest)
        self.nonces.take(nonce)
        collateral = collateral_for(quote, manifest.collateral, self._backend)
        verdict = attest(quote, collateral, policy=manifest.parsed_policy(), roots=self._roots,
                         role=role, expected_report_data=registration_binding(
                             role, public_der, nonce), whose=f"{role}'s")
        lease = None
        if role != GATEWAY_ROLE:  # a slot before a key: at most the manifest's replicas
            index = stage_index(role)
            with self._lock:
                if self.state.manifest is not manifest:
                    raise refusal(Code.MANIFEST_CHANGED, "the owner replaced the manifest "
                                  "while this registration was checked; register again")
                lease = self.slots.claim(role, request.get("slot", 0),
                                         capacity=manifest.replicas_of(index),
                                         manifest_digest=manifest.digest())
        try:
            certificate = state.ca.issue(role, public_key, manifest_digest=manifest.digest(),
                                         hosts=hosts)
            response: dict[str, Any] = {
                "certificate": certificate.public_bytes(serialization.Encoding.PEM).decode(),
                "ca": state.ca.cert_pem(), "manifest_digest": manifest.digest(),
                "topology": list(manifest.topology), "max_batch_size": manifest.max_batch_size,
                "labels_sha256": manifest.labels_sha256,
                "replicas": {str(k): n for k, n in manifest.replicas.items()},
                "plan_sha256": manifest.plan_sha256, "simulated": verdict.simulated,
                "manifest": manifest.to_json(),
                "release": None if state.release is None else state.release.to_dict()}
            if role != GATEWAY_ROLE:
                index = stage_index(role)
                sealed_key = seal_stage_key(state.stage_keys[index], public_key, role=role,
                                            manifest_digest=manifest.digest(), nonce=nonce)
                response["stage"] = {"index": index, "sha256": manifest.stages[index].sha256,
                                     "sealed_key": base64.b64encode(sealed_key).decode()}
                response["lease"] = {"slot": lease.slot if lease else 0, "lease_s": LEASE_S,
                                     "heartbeat_s": HEARTBEAT_S}
                response[LEASE_FIELD] = lease  # the server keeps this connection as the lease
        except BaseException:
            if lease is not None:
                self.slots.free(lease)
            raise
        logger.info("registered %s (MRENCLAVE %s..., %s)", role, verdict.mrenclave[:16],
                    "SIMULATED" if verdict.simulated else "hardware")
        return response


def owner_named_hosts(role: str, asked: list[str], manifest: Manifest) -> list[str]:
    """The host names a certificate carries: for the gateway exactly those the owner's
    manifest names (whatever it asked for; a name the host made up is logged and left out),
    for any other role none."""
    if role != GATEWAY_ROLE:
        return []
    named = validated_hosts(role, list(manifest.gateway_hosts))
    known = {host.lower().rstrip(".") for host in named}
    dropped = sorted(host for host in asked if host.lower().rstrip(".") not in known)
    if dropped:
        logger.warning("gateway asked for host name(s) %s that the owner's manifest does not "
                       "name; left out of its certificate", ", ".join(dropped))
    return named


def _base64(request: dict[str, Any], field: str) -> bytes:
    value = request.get(field)
    try:
        if not isinstance(value, str):
            raise TypeError(f"got {type(value).__name__}")
        return base64.b64decode(value, validate=True)
    except (TypeError, binascii.Error) as err:
        raise refusal(Code.MALFORMED, f"{field} must be base64: {err}") from err


def _hex(request: dict[str, Any], field: str) -> bytes:
    value = request.get(field)
    try:
        if not isinstance(value, str):
            raise TypeError(f"got {type(value).__name__}")
        return bytes.fromhex(value)
    except (TypeError, ValueError) as err:
        raise refusal(Code.MALFORMED, f"{field} must be hex: {err}") from err


def _stage_keys(raw: Any, manifest: Manifest) -> dict[int, bytes]:
    """The owner's stage keys, each checked against the manifest's commitment."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k.isdigit() for k in raw):
        raise refusal(Code.MALFORMED, "stage_keys must map stage numbers to base64 keys")
    keys = {int(k): _base64(raw, k) for k in raw}
    if set(keys) != set(manifest.stages):
        raise refusal(Code.KEY_MISMATCH, f"stage keys are given for {sorted(keys)}, the "
                      f"manifest commits to {sorted(manifest.stages)}")
    for index, key in keys.items():
        if key_commitment(index, key) != manifest.stages[index].key_commitment:
            raise refusal(Code.KEY_MISMATCH, f"the key for stage {index} does not match the "
                          f"manifest's commitment")
    return keys
