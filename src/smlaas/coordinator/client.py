"""Talking to the coordinator: the owner sets the manifest, enclaves register, clients pin
the deployment CA. Every call attests the coordinator first (RA-TLS)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.service import registration_binding
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.policy import Policy
from smlaas.enclave.ratls import connect_attested
from smlaas.enclave.verification import TrustedRoot
from smlaas.errors import AttestationError
from smlaas.transport.framing import recv_message, send_message

COORDINATOR_ROLE = "coordinator"


@dataclass(frozen=True)
class Registration:
    """What an enclave gets for registering: its key, role certificate, the CA, and (for a
    stage) the key of its sealed sub-model."""

    key: ec.EllipticCurvePrivateKey
    certificate_pem: str
    ca_pem: str
    stage_key: bytes | None


class CoordinatorClient:
    def __init__(self, host: str, port: int, *, policy: Policy, roots: list[TrustedRoot],
                 timeout_s: float = 10.0) -> None:
        self.host, self.port = host, port
        self.policy, self.roots, self.timeout_s = policy, roots, timeout_s

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        tls, _ = connect_attested(self.host, self.port, self.policy, roots=self.roots,
                                  role=COORDINATOR_ROLE, timeout_s=self.timeout_s)
        with tls:
            send_message(tls, request)
            response = recv_message(tls)
        if not response.get("ok"):
            raise AttestationError(f"coordinator refused {request.get('op')}: "
                                   f"{response.get('error')}")
        return response

    def deployment_ca(self) -> str:
        """The deployment CA (PEM) to pin, from a coordinator that just passed attestation."""
        return str(self.call({"op": "ca"})["ca"])

    def set_manifest(self, manifest: Manifest) -> str:
        return str(self.call({"op": "set_manifest", "manifest": manifest.to_json()})["digest"])

    def register(self, backend: EnclaveBackend, *, role: str,
                 hosts: list[str] | None = None) -> Registration:
        nonce = bytes.fromhex(str(self.call({"op": "nonce"})["nonce"]))
        key = ec.generate_private_key(ec.SECP256R1())
        public_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        quote = backend.quote(registration_binding(public_der, nonce))
        response = self.call({
            "op": "register", "role": role, "nonce": nonce.hex(),
            "quote": base64.b64encode(quote).decode(),
            "collateral": backend.collateral_json(),
            "public_key": base64.b64encode(public_der).decode(), "hosts": hosts or []})
        stage_key = response.get("stage_key")
        return Registration(key=key, certificate_pem=str(response["certificate"]),
                            ca_pem=str(response["ca"]),
                            stage_key=base64.b64decode(stage_key) if stage_key else None)
