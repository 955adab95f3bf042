"""Coordinator end to end on 127.0.0.1 with the sim backend."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.client import CoordinatorClient
from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.server import CoordinatorServer
from smlaas.coordinator.service import registration_binding
from smlaas.enclave import INTEL_ROOT, Policy
from smlaas.enclave.backends.sim import SimBackend
from smlaas.errors import AttestationError

STAGE_KEY = os.urandom(32)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    return tmp_path / "pki"


def owner_client(server: CoordinatorServer, pki_dir: Path) -> CoordinatorClient:
    coordinator = SimBackend("coordinator", pki_dir=pki_dir)
    policy = Policy.from_dict({"allow_simulation_insecure": True, "roles": {
        "coordinator": {"mrenclave": [coordinator.measurement.mrenclave.hex()]}}})
    host, port = server.address
    return CoordinatorClient(host, port, policy=policy,
                             roots=[INTEL_ROOT, coordinator.trusted_root])


def manifest(pki_dir: Path) -> Manifest:
    stage = SimBackend("stage-0", pki_dir=pki_dir).measurement
    gateway = SimBackend("gateway", pki_dir=pki_dir).measurement
    return Manifest(policy={"allow_simulation_insecure": True, "roles": {
        "stage-0": {"mrenclave": [stage.mrenclave.hex()]},
        "gateway": {"mrenclave": [gateway.mrenclave.hex()]}}},
        stage_keys={0: base64.b64encode(STAGE_KEY).decode()}, topology=["gateway", "stage-0"])


@pytest.fixture
def running(tmp_path: Path, pki_dir: Path):
    server = CoordinatorServer(SimBackend("coordinator", pki_dir=pki_dir),
                               tmp_path / "state.sealed").start()
    yield server
    server.stop()


def test_accepted_worker_gets_certificate_and_key(running, pki_dir: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    owner = owner_client(running, pki_dir)
    owner.set_manifest(manifest(pki_dir))
    registration = owner.register(SimBackend("stage-0", pki_dir=pki_dir), role="stage-0")
    assert registration.stage_key == STAGE_KEY
    cert = x509.load_pem_x509_certificate(registration.certificate_pem.encode())
    ca = x509.load_pem_x509_certificate(registration.ca_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "stage-0"
    assert registration.ca_pem == owner.deployment_ca()
    from smlaas.client import attest_coordinator
    assert attest_coordinator(*running.address, policy=owner.policy,
                              roots=owner.roots) == registration.ca_pem
    gateway = owner.register(SimBackend("gateway", pki_dir=pki_dir), role="gateway")
    assert gateway.stage_key is None
    # No key, nonce or private material in any log line.
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (base64.b64encode(STAGE_KEY).decode(), STAGE_KEY.hex(), "PRIVATE KEY"):
        assert secret not in text


def test_other_measurement_gets_neither_certificate_nor_key(running, pki_dir: Path) -> None:
    owner = owner_client(running, pki_dir)
    owner.set_manifest(manifest(pki_dir))
    impostor = SimBackend("stage-0", config={"patched": True}, pki_dir=pki_dir)
    with pytest.raises(AttestationError, match="measurement"):
        owner.register(impostor, role="stage-0")


def test_replayed_registration_is_refused(running, pki_dir: Path) -> None:
    owner = owner_client(running, pki_dir)
    owner.set_manifest(manifest(pki_dir))
    backend = SimBackend("stage-0", pki_dir=pki_dir)
    nonce = bytes.fromhex(owner.call({"op": "nonce"})["nonce"])
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    request = {"op": "register", "role": "stage-0", "nonce": nonce.hex(),
               "quote": base64.b64encode(backend.quote(registration_binding(der, nonce)))
               .decode(), "collateral": backend.collateral_json(),
               "public_key": base64.b64encode(der).decode()}
    assert owner.call(request)["stage_key"]
    with pytest.raises(AttestationError, match="replayed"):
        owner.call(request)


def test_quote_bound_to_another_key_is_refused(running, pki_dir: Path) -> None:
    owner = owner_client(running, pki_dir)
    owner.set_manifest(manifest(pki_dir))
    backend = SimBackend("stage-0", pki_dir=pki_dir)
    nonce = bytes.fromhex(owner.call({"op": "nonce"})["nonce"])
    mine, theirs = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    der = [k.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
           for k in (mine, theirs)]
    with pytest.raises(AttestationError, match="report_data"):
        owner.call({"op": "register", "role": "stage-0", "nonce": nonce.hex(),
                    "quote": base64.b64encode(backend.quote(registration_binding(der[0], nonce)))
                    .decode(), "collateral": backend.collateral_json(),
                    "public_key": base64.b64encode(der[1]).decode()})


def test_restart_keeps_ca_and_manifest(tmp_path: Path, pki_dir: Path) -> None:
    state = tmp_path / "state.sealed"
    first = CoordinatorServer(SimBackend("coordinator", pki_dir=pki_dir), state).start()
    try:
        owner = owner_client(first, pki_dir)
        digest = owner.set_manifest(manifest(pki_dir))
        ca = owner.deployment_ca()
    finally:
        first.stop()
    assert b"BEGIN" not in state.read_bytes()  # sealed, not plaintext
    second = CoordinatorServer(SimBackend("coordinator", pki_dir=pki_dir), state).start()
    try:
        owner = owner_client(second, pki_dir)
        assert owner.deployment_ca() == ca
        assert owner.call({"op": "manifest"})["digest"] == digest
        with pytest.raises(AttestationError, match="set once"):
            other = manifest(pki_dir)
            owner.set_manifest(Manifest(other.policy, {}, other.topology))
    finally:
        second.stop()


def test_coordinator_with_other_code_cannot_read_the_state(tmp_path: Path,
                                                          pki_dir: Path) -> None:
    state = tmp_path / "state.sealed"
    CoordinatorServer(SimBackend("coordinator", pki_dir=pki_dir), state)
    from smlaas.errors import SealError
    with pytest.raises(SealError, match="wrong key"):
        CoordinatorServer(SimBackend("coordinator", config={"patched": 1}, pki_dir=pki_dir),
                          state)
