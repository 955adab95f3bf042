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
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.policy import Policy
from smlaas.enclave.ratls import connect_attested, public_key_hash
from smlaas.enclave.verification import TrustedRoot
from smlaas.errors import AttestationError, CoordinatorRefused
from smlaas.transport.framing import recv_message, send_message


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

    def replicas_of(self, index: int) -> int:
        return self.replicas.get(index, 1)


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
        tls, _ = connect_attested(self.host, self.port, self.policy, roots=self.roots,
                                  role=COORDINATOR_ROLE, timeout_s=self.timeout_s)
        with tls:
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
        if response.get("ok") is not True:
            raise CoordinatorRefused(str(response.get("code", Code.INTERNAL.value)),
                                     f"coordinator refused {request.get('op')}: "
                                     f"{response.get('error')}")
        return response

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
            topology=tuple(manifest.get("topology", ())))

    def set_manifest(self, manifest: Manifest, *, owner: OwnerKey,
                     stage_keys: dict[int, bytes]) -> str:
        """Signs ``manifest`` for the coordinator this very connection attested and sets it,
        handing over the stage keys on that connection; returns the digest it holds."""
        def request(instance: bytes) -> dict[str, Any]:
            signature = owner.sign_manifest(manifest.digest(), instance)
            return {"op": Op.SET_MANIFEST.value, "manifest": manifest.to_json(),
                    "signature": base64.b64encode(signature).decode(),
                    "stage_keys": {str(k): base64.b64encode(v).decode()
                                   for k, v in stage_keys.items()}}

        return str(self.exchange(request)["digest"])

    def register(self, backend: EnclaveBackend, *, role: str,
                 hosts: list[str] | None = None) -> Registration:
        """Proves this enclave's measurement with a quote binding role, a fresh key and the
        coordinator's nonce; the stage key comes back encrypted to that key only."""
        nonce = bytes.fromhex(str(self.call({"op": Op.NONCE.value})["nonce"]))
        key = ec.generate_private_key(ec.SECP256R1())
        public_der = spki_der(key.public_key())
        quote = backend.quote(registration_binding(role, public_der, nonce))
        reply = self.call({
            "op": Op.REGISTER.value, "role": role, "nonce": nonce.hex(),
            "quote": base64.b64encode(quote).decode(),
            "public_key": base64.b64encode(public_der).decode(), "hosts": hosts or []})
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
        return Registration(key=key, certificate_pem=str(reply["certificate"]),
                            ca_pem=str(reply["ca"]), manifest_digest=digest,
                            topology=tuple(reply["topology"]),
                            max_batch_size=int(reply["max_batch_size"]),
                            labels_sha256=str(reply.get("labels_sha256", "")), stage=release,
                            replicas=_replicas(reply.get("replicas", {})))


def _replicas(value: Any) -> dict[int, int]:
    try:
        return {int(k): int(n) for k, n in dict(value).items()}
    except (TypeError, ValueError) as err:
        raise refusal(Code.MALFORMED, f"the coordinator's replicas are malformed: {err}") from err
