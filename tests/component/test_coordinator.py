"""The coordinator in process on 127.0.0.1 with the sim backend: the owner's signed manifest,
registration, HPKE key release, sealed state, and an answer with a code for any request."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import Code, registration_binding, spki_der
from smlaas.coordinator.service import NonceTable
from smlaas.errors import AttestationError, SealError
from smlaas.transport.tls import certificate_manifest, certificate_role
from tests.coordinator_setup import Ceremony, refused


@pytest.fixture
def ceremony(tmp_path: Path) -> Ceremony:
    return Ceremony(tmp_path / "pki")


@pytest.fixture
def running(tmp_path: Path, ceremony: Ceremony):
    server = ceremony.start(tmp_path / "state.sealed")
    yield server
    server.stop()


def test_accepted_worker_gets_certificate_and_its_key(running, ceremony: Ceremony,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    owner = ceremony.client(running)
    digest = ceremony.set_manifest(owner)
    registration = owner.register(ceremony.enclave("stage-0"), role="stage-0")
    assert registration.stage is not None
    assert registration.stage.key == ceremony.stage_keys[0]
    assert registration.stage.sha256 == ceremony.stage_sha256[0]
    assert registration.manifest_digest == digest
    assert registration.topology == ("gateway", "stage-0") and registration.max_batch_size == 0
    cert = x509.load_pem_x509_certificate(registration.certificate_pem.encode())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(registration.ca_pem.encode()))
    assert certificate_role(cert) == "stage-0" and certificate_manifest(cert) == digest
    assert registration.ca_pem == owner.deployment_ca()
    gateway = owner.register(ceremony.enclave("gateway"), role="gateway", hosts=["localhost"])
    assert gateway.stage is None
    text = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (base64.b64encode(ceremony.stage_keys[0]).decode(),
                   ceremony.stage_keys[0].hex(), "PRIVATE KEY"):
        assert secret not in text


def test_status_names_instance_owner_and_manifest(running, ceremony: Ceremony) -> None:
    owner = ceremony.client(running)
    assert owner.status().manifest_digest is None
    digest = ceremony.set_manifest(owner)
    status = owner.status()
    assert (status.manifest_digest, status.manifest_version) == (digest, 1)
    assert status.owner == ceremony.owner.fingerprint
    assert status.topology == ("gateway", "stage-0")


def test_other_measurement_gets_neither_certificate_nor_key(running, ceremony: Ceremony) -> None:
    owner = ceremony.client(running)
    ceremony.set_manifest(owner)
    with refused(Code.NOT_ACCEPTED):
        owner.register(ceremony.enclave("stage-0", patched=True), role="stage-0")


def test_replayed_registration_is_refused(running, ceremony: Ceremony) -> None:
    owner = ceremony.client(running)
    ceremony.set_manifest(owner)
    backend = ceremony.enclave("stage-0")
    nonce = bytes.fromhex(owner.call({"op": "nonce"})["nonce"])
    der = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    request = {"op": "register", "role": "stage-0", "nonce": nonce.hex(),
               "quote": base64.b64encode(backend.quote(registration_binding("stage-0", der,
                                                                            nonce))).decode(),
               "public_key": base64.b64encode(der).decode()}
    assert owner.call(request)["stage"]["sealed_key"]
    with refused(Code.BAD_NONCE):
        owner.call(request)


@pytest.mark.parametrize("swap", ["key", "role"])
def test_quote_binds_role_and_key(running, ceremony: Ceremony, swap: str) -> None:
    owner = ceremony.client(running)
    ceremony.set_manifest(owner)
    backend = ceremony.enclave("stage-0")
    nonce = bytes.fromhex(owner.call({"op": "nonce"})["nonce"])
    mine, theirs = (spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
                    for _ in range(2))
    bound_role = "gateway" if swap == "role" else "stage-0"
    quote = backend.quote(registration_binding(bound_role, mine, nonce))
    with refused(Code.NOT_ACCEPTED):
        owner.call({"op": "register", "role": "stage-0", "nonce": nonce.hex(),
                    "quote": base64.b64encode(quote).decode(),
                    "public_key": base64.b64encode(theirs if swap == "key" else mine).decode()})


def test_stage_keys_must_match_the_commitments(running, ceremony: Ceremony) -> None:
    owner = ceremony.client(running)
    with refused(Code.KEY_MISMATCH):
        owner.set_manifest(ceremony.manifest(), owner=ceremony.owner,
                           stage_keys={0: bytes(32)})
    assert owner.status().manifest_digest is None


def test_versions_only_go_up(running, ceremony: Ceremony) -> None:
    owner = ceremony.client(running)
    first = ceremony.set_manifest(owner, ceremony.manifest(version=2))
    assert ceremony.set_manifest(owner, ceremony.manifest(version=2)) == first  # idempotent
    for stale in (1, 2):
        other = ceremony.manifest(version=stale, policy={
            "allow_simulation_insecure": True, "max_collateral_age_days": 1,
            "roles": ceremony.manifest().policy["roles"]})
        with refused(Code.STALE_VERSION):
            ceremony.set_manifest(owner, other)
    third = ceremony.set_manifest(owner, ceremony.manifest(version=3))
    assert owner.status().manifest_digest == third != first


def test_restart_keeps_ca_instance_and_manifest(tmp_path: Path, ceremony: Ceremony) -> None:
    state = tmp_path / "state.sealed"
    first = ceremony.start(state)
    try:
        owner = ceremony.client(first)
        digest = ceremony.set_manifest(owner)
        ca, instance = owner.deployment_ca(), owner.status().instance
    finally:
        first.stop()
    assert b"BEGIN" not in state.read_bytes()  # sealed, not plaintext
    second = ceremony.start(state)
    try:
        owner = ceremony.client(second)
        status = owner.status()
        assert owner.deployment_ca() == ca and status.instance == instance
        assert status.manifest_digest == digest
        assert owner.register(ceremony.enclave("stage-0"), role="stage-0").stage is not None
    finally:
        second.stop()


def test_coordinator_with_other_code_cannot_read_the_state(tmp_path: Path,
                                                          ceremony: Ceremony) -> None:
    state = tmp_path / "state.sealed"
    ceremony.start(state).stop()
    with pytest.raises(SealError, match="wrong key"):  # another owner key: another measurement
        ceremony.start(state, owner=OwnerKey.create())


def test_nonce_table_is_bounded_and_single_use() -> None:
    now = [0.0]
    table = NonceTable(ttl_s=10, capacity=3, clock=lambda: now[0])
    first = table.issue()
    others = [table.issue() for _ in range(3)]
    assert len(table) == 3  # the oldest was evicted
    with refused(Code.BAD_NONCE):
        table.take(first)
    table.take(others[0])
    with refused(Code.BAD_NONCE):
        table.take(others[0])  # used
    now[0] = 11.0
    with refused(Code.BAD_NONCE):
        table.take(others[1])  # expired
    table.issue()
    assert len(table) == 1  # expired ones are dropped as new ones are issued


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
OPS = st.sampled_from(["ca", "status", "set_manifest", "nonce", "register", "bogus", 7, None])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(request=st.one_of(JSON, st.builds(lambda op, rest: {**rest, "op": op}, OPS,
                                         st.dictionaries(st.sampled_from(
                                             ["manifest", "signature", "stage_keys", "role",
                                              "nonce", "quote", "public_key", "hosts"]),
                                             JSON, max_size=6))))
def test_any_request_gets_an_answer_with_a_code(running, request) -> None:
    answer = running.service.handle(json.loads(json.dumps(request)))
    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool)
    if not answer["ok"]:
        assert answer["code"] in {c.value for c in Code} and answer["code"] != "internal", answer


def test_a_client_stays_with_the_instance_it_attested(tmp_path: Path, ceremony: Ceremony) -> None:
    """Two coordinators of the same code and owner look alike; the host routing a client's
    later call to the other one is caught, not answered with the other's CA or manifest."""
    first, second = ceremony.start(tmp_path / "a.sealed"), ceremony.start(tmp_path / "b.sealed")
    try:
        client = ceremony.client(first)
        client.status()
        client.port = second.address[1]  # the host reroutes the connection
        with pytest.raises(AttestationError, match="another coordinator instance"):
            client.deployment_ca()
    finally:
        first.stop()
        second.stop()
