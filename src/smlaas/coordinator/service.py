"""The coordinator's request handling, independent of sockets.

Requests (JSON objects with an ``op``):

- ``ca``            -> the deployment CA certificate
- ``set_manifest``  -> sets the manifest once (owner); returns its digest
- ``manifest``      -> the manifest's digest and topology (no keys)
- ``nonce``         -> a fresh single-use nonce, valid for NONCE_TTL_S
- ``register``      -> {role, nonce, quote, collateral, public_key}: verifies the quote, checks
                       the manifest's rules for the role and that report_data is
                       SHA-256(public key DER || nonce); issues a role certificate and, for a
                       stage, releases that stage's key
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
import threading
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.ca import DeploymentCA
from smlaas.coordinator.manifest import Manifest, stage_index
from smlaas.coordinator.state import CoordinatorState, SealedStateStore
from smlaas.enclave.verification import TrustedRoot, load_collateral, select_root, verify_quote
from smlaas.errors import AttestationError, SmlaasError

logger = logging.getLogger(__name__)
NONCE_TTL_S = 60.0


class RequestError(SmlaasError):
    """A request the coordinator refuses; its message goes back to the caller."""


def registration_binding(public_key_der: bytes, nonce: bytes) -> bytes:
    """What a registering enclave puts in its quote's report_data."""
    return hashlib.sha256(public_key_der + nonce).digest()


class CoordinatorService:
    def __init__(self, store: SealedStateStore, roots: list[TrustedRoot]) -> None:
        self._store = store
        self._roots = roots
        self._lock = threading.Lock()
        self._nonces: dict[bytes, float] = {}
        state = store.load()
        if state is None:
            state = CoordinatorState(DeploymentCA.create())
            store.save(state)
            logger.info("created a new deployment CA")
        else:
            logger.info("restored sealed state (deployment CA and manifest)")
        self.state = state

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "ca":
                return {"ok": True, "ca": self.state.ca.cert_pem()}
            if op == "set_manifest":
                return self._set_manifest(request)
            if op == "manifest":
                manifest = self.state.manifest
                return {"ok": True, "digest": manifest.digest() if manifest else None,
                        "topology": manifest.topology if manifest else []}
            if op == "nonce":
                return {"ok": True, "nonce": self._new_nonce().hex()}
            if op == "register":
                return self._register(request)
            raise RequestError(f"unknown op {op!r}")
        except (RequestError, AttestationError) as err:
            logger.warning("refused %s request: %s", op, err)
            return {"ok": False, "error": str(err)}

    def _set_manifest(self, request: dict[str, Any]) -> dict[str, Any]:
        manifest = Manifest.from_json(str(request.get("manifest", "")))
        with self._lock:
            if self.state.manifest is not None:
                if self.state.manifest.digest() == manifest.digest():
                    return {"ok": True, "digest": manifest.digest()}
                raise RequestError("a different manifest is already set; a manifest can be "
                                   "set once")
            self.state.manifest = manifest
            self._store.save(self.state)
        logger.info("manifest set (digest %s)", manifest.digest()[:16])
        return {"ok": True, "digest": manifest.digest()}

    def _new_nonce(self) -> bytes:
        nonce = os.urandom(32)
        now = time.monotonic()
        with self._lock:
            self._nonces = {n: t for n, t in self._nonces.items() if now - t < NONCE_TTL_S}
            self._nonces[nonce] = now
        return nonce

    def _take_nonce(self, nonce: bytes) -> None:
        with self._lock:
            issued = self._nonces.pop(nonce, None)
        if issued is None or time.monotonic() - issued >= NONCE_TTL_S:
            raise RequestError("unknown, used or expired nonce (replayed registration?)")

    def _register(self, request: dict[str, Any]) -> dict[str, Any]:
        manifest = self.state.manifest
        if manifest is None:
            raise RequestError("no manifest is set yet")
        role = str(request.get("role", ""))
        if role not in manifest.topology:
            raise RequestError(f"role {role!r} is not in the manifest's topology")
        try:
            nonce = bytes.fromhex(str(request["nonce"]))
            quote = base64.b64decode(str(request["quote"]), validate=True)
            public_der = base64.b64decode(str(request["public_key"]), validate=True)
            public_key = serialization.load_der_public_key(public_der)
        except (KeyError, ValueError) as err:
            raise RequestError(f"malformed registration: {err}") from err
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise RequestError("the registering key must be an EC P-256 key")
        self._take_nonce(nonce)
        verdict = verify_quote(quote, load_collateral(str(request.get("collateral", "")),
                                                      source="registration"),
                               at=dt.datetime.now(dt.UTC), root=select_root(quote, self._roots))
        if not verdict.verified:
            raise AttestationError(f"quote of {role} does not verify: {verdict.error}")
        manifest.parsed_policy().check(verdict, role=role,
                                       expected_report_data=registration_binding(public_der,
                                                                                 nonce))
        certificate = self.state.ca.issue(role, public_key,
                                          hosts=list(request.get("hosts", [])))
        response: dict[str, Any] = {
            "ok": True, "certificate": certificate.public_bytes(
                serialization.Encoding.PEM).decode(),
            "ca": self.state.ca.cert_pem(), "simulated": verdict.simulated}
        if role.startswith("stage-") and stage_index(role) in manifest.stage_keys:
            response["stage_key"] = manifest.stage_keys[stage_index(role)]
        logger.info("registered %s (MRENCLAVE %s..., %s)", role, verdict.mrenclave[:16],
                    "SIMULATED" if verdict.simulated else "hardware")
        return response
