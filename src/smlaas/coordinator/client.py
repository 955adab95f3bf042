"""Talking to the coordinator: the owner sets the manifest, enclaves register, clients pin
the deployment CA. Every call attests the coordinator first (RA-TLS) and sends nothing before
its evidence passed; a refusal raises :class:`~smlaas.errors.CoordinatorRefused` with the
coordinator's code.

One client talks to one coordinator *instance*: the first exchange pins the instance key it
attested, and a later exchange that reaches another instance (another deployment of the same
code, routed there by the host) raises AttestationError instead of mixing their answers.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import (
    COORDINATOR_ROLE,
    Code,
    Op,
    open_stage_key,
    refusal,
    registration_binding,
    spki_der,
)
from smlaas.coordinator.release import SignedRelease
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.policy import Policy, RolePolicy
from smlaas.enclave.ratls import connect_attested, public_key_hash
from smlaas.enclave.verification import TrustedRoot
from smlaas.errors import (
    AttestationError,
    ConfigError,
    CoordinatorRefused,
    ProtocolError,
    ReleaseError,
)
from smlaas.transport.framing import recv_message, send_message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRelease:
    """A stage's key, decrypted inside the registrant, and the plaintext SHA-256 the manifest
    commits to (the worker checks the unsealed sub-model against it)."""

    index: int
    key: bytes
    sha256: str


@dataclass(frozen=True)
class Registration:
    """What an enclave gets for registering: its key, role certificate, the CA, and (for a
    stage) its stage's key."""

    key: ec.EllipticCurvePrivateKey
    certificate_pem: str
    ca_pem: str
    manifest_digest: str
    topology: tuple[str, ...]
    max_batch_size: int
    labels_sha256: str
    stage: StageRelease | None
    replicas: dict[int, int] = field(default_factory=dict)
    """The manifest's replicas per stage (absent: 1)."""
    plan_sha256: str = ""
    """SHA-256 of the plan.json the owner's manifest binds ('' = none named)."""
    release: SignedRelease | None = None
    """The owner's latest release the coordinator held (not verified here)."""
    lease: LeaseSession | None = None
    """A stage's slot lease: the registration connection, kept open (None: not held)."""
    manifest_json: str = ""
    """The owner's manifest in canonical form (its digest checked against manifest_digest):
    what receipts' evidence carries."""

    def replicas_of(self, index: int) -> int:
        return self.replicas.get(index, 1)


class LeaseSession:
    """A stage's lease on its replica slot: the TLS connection it registered on, kept open
    with a heartbeat every ``heartbeat_s`` (:mod:`smlaas.coordinator.slots`). When the lease
    ends (revoked, refused, connection lost, no answer) ``on_lost`` is called once with the
    reason: genuine worker code then stops serving."""

    def __init__(self, tls: ssl.SSLSocket, *, slot: int, heartbeat_s: float,
                 lease_s: float) -> None:
        self.tls, self.slot = tls, slot
        self.heartbeat_s, self.lease_s = heartbeat_s, lease_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Heartbeats in a daemon thread until :meth:`close` or the lease is lost."""
        def run() -> None:
            reason = self._heartbeats()
            if not self._stop.is_set():
                on_lost(reason)

        self._thread = threading.Thread(target=run, daemon=True, name="slot-lease")
        self._thread.start()

    def _heartbeats(self) -> str:
        self.tls.settimeout(self.lease_s)
        try:
            while not self._stop.wait(self.heartbeat_s):
                send_message(self.tls, {"op": Op.HEARTBEAT.value})
                reply = recv_message(self.tls)
                if reply.get("ok") is not True:
                    return f"the coordinator ended the lease ({reply.get('code')}: " \
                           f"{reply.get('error')})"
            return "closed"
        except (OSError, ProtocolError) as err:
            return f"the lease connection failed: {str(err) or type(err).__name__}"

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.tls.shutdown(socket.SHUT_RDWR)
        self.tls.close()


@dataclass(frozen=True)
class CoordinatorStatus:
    instance: str
    """SHA-256 (hex) of the coordinator's RA-TLS key, which manifest signatures bind."""
    owner: str
    """Fingerprint of the owner key the coordinator obeys."""
    ca_pem: str
    manifest_digest: str | None
    manifest_version: int | None
    topology: tuple[str, ...]
    release: SignedRelease | None = None
    """The owner's latest release the coordinator holds (not verified here)."""
    slots: dict[str, list[int]] = field(default_factory=dict)
    """role -> replica slots held by live stages."""


class CoordinatorClient:
    def __init__(self, host: str, port: int, *, policy: Policy, roots: list[TrustedRoot],
                 timeout_s: float = 10.0, instance: bytes | None = None) -> None:
        self.host, self.port = host, port
        self.policy, self.roots, self.timeout_s = policy, roots, timeout_s
        self.instance = instance
        """SHA-256 of the coordinator instance's key, pinned by the first exchange."""

    def exchange(self, build: Callable[[bytes], dict[str, Any]]) -> dict[str, Any]:
        """Attests the coordinator, sends ``build(instance)`` (``instance``: SHA-256 of the
        attested coordinator's key) and returns the reply; CoordinatorRefused if refused."""
        return self._exchange(build, keep_open=False)[0]

    def _exchange(self, build: Callable[[bytes], dict[str, Any]], *, keep_open: bool
                  ) -> tuple[dict[str, Any], ssl.SSLSocket | None]:
        tls, _ = connect_attested(self.host, self.port, self.policy, roots=self.roots,
                                  role=COORDINATOR_ROLE, timeout_s=self.timeout_s)
        try:
            der = tls.getpeercert(binary_form=True)
            assert der is not None  # connect_attested verified it
            instance = public_key_hash(x509.load_der_x509_certificate(der))
            if self.instance is None:
                self.instance = instance
            elif instance != self.instance:
                raise AttestationError(
                    f"{self.host}:{self.port} is another coordinator instance "
                    f"({instance.hex()[:16]}...) than the one this client attested first "
                    f"({self.instance.hex()[:16]}...)")
            request = build(instance)
            send_message(tls, request)
            response = recv_message(tls)
        except BaseException:
            tls.close()
            raise
        if response.get("ok") is not True:
            tls.close()
            raise CoordinatorRefused(str(response.get("code", Code.INTERNAL.value)),
                                     f"coordinator refused {request.get('op')}: "
                                     f"{response.get('error')}")
        if not keep_open:
            tls.close()
            return response, None
        return response, tls

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.exchange(lambda _: request)

    def deployment_ca(self) -> str:
        """The deployment CA (PEM) to pin, from a coordinator that just passed attestation."""
        return str(self.call({"op": Op.CA.value})["ca"])

    def status(self) -> CoordinatorStatus:
        reply = self.call({"op": Op.STATUS.value})
        manifest = reply.get("manifest") or {}
        return CoordinatorStatus(
            instance=str(reply["instance"]), owner=str(reply["owner"]), ca_pem=str(reply["ca"]),
            manifest_digest=manifest.get("digest"), manifest_version=manifest.get("version"),
            topology=tuple(manifest.get("topology", ())),
            release=_release(reply.get("release")), slots=dict(reply.get("slots") or {}))

    def release(self) -> SignedRelease | None:
        """The owner's latest release the coordinator holds (the caller verifies it)."""
        return _release(self.call({"op": Op.RELEASE.value}).get("release"))

    def set_release(self, release: SignedRelease) -> None:
        self.call({"op": Op.SET_RELEASE.value, "release": release.to_dict()})

    def set_manifest(self, manifest: Manifest, *, owner: OwnerKey,
                     stage_keys: dict[int, bytes],
                     release: Callable[[bytes], SignedRelease] | None = None) -> str:
        """Signs ``manifest`` for the coordinator this very connection attested and sets it,
        handing over the stage keys on that connection (and ``release(instance)``, the
        owner's first release of it); returns the digest it holds."""
        def request(instance: bytes) -> dict[str, Any]:
            signature = owner.sign_manifest(manifest.digest(), instance)
            body = {"op": Op.SET_MANIFEST.value, "manifest": manifest.to_json(),
                    "signature": base64.b64encode(signature).decode(),
                    "stage_keys": {str(k): base64.b64encode(v).decode()
                                   for k, v in stage_keys.items()}}
            if release is not None:
                body["release"] = release(instance).to_dict()
            return body

        return str(self.exchange(request)["digest"])

    def register(self, backend: EnclaveBackend, *, role: str,
                 hosts: list[str] | None = None, slot: int = 0,
                 hold: bool = False) -> Registration:
        """Proves this enclave's measurement with a quote binding role, a fresh key and the
        coordinator's nonce; the stage key comes back encrypted to that key only. A stage
        claims replica slot ``slot``; with ``hold`` its registration connection is kept as
        the lease (``Registration.lease``; call ``lease.keep(on_lost)``), else it ends here
        and so does the lease."""
        nonce = bytes.fromhex(str(self.call({"op": Op.NONCE.value})["nonce"]))
        key = ec.generate_private_key(ec.SECP256R1())
        public_der = spki_der(key.public_key())
        quote = backend.quote(registration_binding(role, public_der, nonce))
        reply, tls = self._exchange(lambda _: {
            "op": Op.REGISTER.value, "role": role, "nonce": nonce.hex(),
            "quote": base64.b64encode(quote).decode(),
            "public_key": base64.b64encode(public_der).decode(), "hosts": hosts or [],
            "slot": slot}, keep_open=hold)
        try:
            return self._registration(reply, key, role=role, nonce=nonce, tls=tls)
        except BaseException:
            if tls is not None:
                tls.close()
            raise

    @staticmethod
    def _registration(reply: dict[str, Any], key: ec.EllipticCurvePrivateKey, *, role: str,
                      nonce: bytes, tls: ssl.SSLSocket | None) -> Registration:
        digest = str(reply["manifest_digest"])
        stage = reply.get("stage")
        release = None
        if stage is not None:
            try:
                sealed_key = base64.b64decode(str(stage["sealed_key"]), validate=True)
                release = StageRelease(int(stage["index"]), open_stage_key(
                    sealed_key, key, role=role, manifest_digest=digest, nonce=nonce),
                    str(stage["sha256"]))
            except (KeyError, TypeError, ValueError) as err:
                raise refusal(Code.MALFORMED, f"the coordinator's stage release is "
                              f"malformed: {err}") from err
        lease = None
        if tls is not None and "lease" in reply:
            try:
                terms = dict(reply["lease"])
                lease = LeaseSession(tls, slot=int(terms["slot"]),
                                     heartbeat_s=float(terms["heartbeat_s"]),
                                     lease_s=float(terms["lease_s"]))
            except (KeyError, TypeError, ValueError) as err:
                raise refusal(Code.MALFORMED, f"the coordinator's lease terms are "
                              f"malformed: {err}") from err
        elif tls is not None:
            tls.close()
        return Registration(key=key, certificate_pem=str(reply["certificate"]),
                            ca_pem=str(reply["ca"]), manifest_digest=digest,
                            topology=tuple(reply["topology"]),
                            max_batch_size=int(reply["max_batch_size"]),
                            labels_sha256=str(reply.get("labels_sha256", "")), stage=release,
                            replicas=_replicas(reply.get("replicas", {})),
                            plan_sha256=str(reply.get("plan_sha256", "")),
                            release=_release(reply.get("release")), lease=lease,
                            manifest_json=_manifest_json(reply.get("manifest"), digest))


def coordinator_policy(coordinator_mrenclave: str, *, simulated: bool) -> Policy:
    """What a role accepts as its coordinator: the one MRENCLAVE it was built to trust."""
    return Policy(allow_simulation_insecure=simulated,
                  roles={COORDINATOR_ROLE: RolePolicy(mrenclave=(coordinator_mrenclave,))})


def _manifest_json(value: Any, digest: str) -> str:
    """The manifest the coordinator sent, if it is the one whose digest it named."""
    if not isinstance(value, str):
        return ""
    try:
        if Manifest.from_json(value).digest() != digest:
            raise refusal(Code.MALFORMED, "the coordinator sent another manifest than the "
                          "one it named")
    except ConfigError as err:
        raise refusal(Code.MALFORMED, f"the coordinator's manifest is malformed: {err}") \
            from err
    return value


def _release(value: Any) -> SignedRelease | None:
    """A release as the coordinator sent it (None when it has none or sent garbage: the
    verifier decides, and an unparsable release is as good as none)."""
    if value is None:
        return None
    try:
        return SignedRelease.from_dict(value)
    except ReleaseError as err:
        logger.warning("the coordinator sent a malformed release: %s", err)
        return None


def _replicas(value: Any) -> dict[int, int]:
    try:
        return {int(k): int(n) for k, n in dict(value).items()}
    except (TypeError, ValueError) as err:
        raise refusal(Code.MALFORMED, f"the coordinator's replicas are malformed: {err}") from err
