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
- ``register``      -> {role, nonce, quote, public_key, hosts}: verifies the quote against
                       collateral the coordinator obtains itself, the manifest's rules for the
                       role and the binding of role, key and nonce in report_data; issues a
                       certificate naming the role and the manifest digest in its extensions,
                       the topology and the batching limit, and, for a stage, its key
                       HPKE-encrypted to the attested public key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
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
from smlaas.coordinator.state import CoordinatorState, SealedStateStore
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.verification import TrustedRoot, select_root, verify_quote
from smlaas.errors import AttestationError, CoordinatorRefused, InputError, SmlaasError

logger = logging.getLogger(__name__)
NONCE_TTL_S = 60.0
MAX_NONCES = 4096


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
                Op.REGISTER: self._register}

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
                    "topology": list(manifest.topology)}}

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
        with self._lock:
            held = self.state.manifest
            if held is not None and held.digest() == manifest.digest():
                return {"digest": manifest.digest(), "version": manifest.version}
            if held is not None and manifest.version <= held.version:
                raise refusal(Code.STALE_VERSION, f"this coordinator holds manifest version "
                              f"{held.version} ({held.digest()[:16]}); only a signed manifest "
                              f"with a higher version replaces it, got {manifest.version}")
            updated = replace(self.state, manifest=manifest, manifest_signature=signature,
                              stage_keys=keys)
            self._store.save(updated)  # saved first: a failed save changes nothing
            self.state = updated
        logger.info("%s set by the owner (%s)", manifest.describe(), self._owner_fingerprint)
        return {"digest": manifest.digest(), "version": manifest.version}

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
        hosts = validated_hosts(role, request.get("hosts", []))
        self.nonces.take(nonce)
        collateral = collateral_for(quote, manifest.collateral, self._backend)
        verdict = verify_quote(quote, collateral, at=dt.datetime.now(dt.UTC),
                               root=select_root(quote, self._roots))
        if not verdict.verified:
            raise AttestationError(f"quote of {role} does not verify: {verdict.error}")
        manifest.parsed_policy().check(verdict, role=role, expected_report_data=(
            registration_binding(role, public_der, nonce)))
        certificate = state.ca.issue(role, public_key, manifest_digest=manifest.digest(),
                                     hosts=hosts)
        response: dict[str, Any] = {
            "certificate": certificate.public_bytes(serialization.Encoding.PEM).decode(),
            "ca": state.ca.cert_pem(), "manifest_digest": manifest.digest(),
            "topology": list(manifest.topology), "max_batch_size": manifest.max_batch_size,
            "labels_sha256": manifest.labels_sha256,
            "replicas": {str(k): n for k, n in manifest.replicas.items()},
            "simulated": verdict.simulated}
        if role != GATEWAY_ROLE:
            index = stage_index(role)
            sealed_key = seal_stage_key(state.stage_keys[index], public_key, role=role,
                                        manifest_digest=manifest.digest(), nonce=nonce)
            response["stage"] = {"index": index, "sha256": manifest.stages[index].sha256,
                                 "sealed_key": base64.b64encode(sealed_key).decode()}
        logger.info("registered %s (MRENCLAVE %s..., %s)", role, verdict.mrenclave[:16],
                    "SIMULATED" if verdict.simulated else "hardware")
        return response


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
