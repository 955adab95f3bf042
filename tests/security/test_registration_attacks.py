"""Attacks on registration: the host relays, records, replays or rewrites registrations, asks
for role names, or picks the collateral; it must learn no stage key and obtain no certificate
it could use."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.coordinator.protocol import Code, open_stage_key, registration_binding, spki_der
from smlaas.enclave.backends.sim import SimBackend
from smlaas.enclave.ratls import create_identity
from smlaas.errors import CoordinatorRefused
from smlaas.roles import StageSpec
from tests.coordinator_setup import Ceremony, refused
from tests.security.conftest import coordinator_process


def _captured_registration(ceremony: Ceremony, client, role: str = "stage-0"
                           ) -> tuple[dict, ec.EllipticCurvePrivateKey, bytes]:
    """A genuine enclave's registration request, as the host sees it on the wire."""
    nonce = bytes.fromhex(client.call({"op": "nonce"})["nonce"])
    key = ec.generate_private_key(ec.SECP256R1())
    der = spki_der(key.public_key())
    quote = ceremony.enclave(role).quote(registration_binding(role, der, nonce))
    return ({"op": "register", "role": role, "nonce": nonce.hex(),
             "quote": base64.b64encode(quote).decode(),
             "public_key": base64.b64encode(der).decode(), "hosts": []}, key, nonce)


def test_a_relayed_registration_yields_no_stage_key(tmp_path: Path, ceremony: Ceremony) -> None:
    """The host forwards a genuine enclave's registration and reads the answer: the stage
    key is HPKE-encrypted to the enclave's key, which the host does not have."""
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        digest = ceremony.set_manifest(client)
        request, enclave_key, nonce = _captured_registration(ceremony, client)
        reply = client.call(request)  # the host's own attested connection
        wire = json.dumps(reply)
        secret = ceremony.stage_keys[0]
        assert secret.hex() not in wire and base64.b64encode(secret).decode() not in wire
        sealed_key = base64.b64decode(reply["stage"]["sealed_key"])
        assert secret not in sealed_key
        with pytest.raises(CoordinatorRefused, match="not released to us"):
            open_stage_key(sealed_key, ec.generate_private_key(ec.SECP256R1()),
                           role="stage-0", manifest_digest=digest, nonce=nonce)
        with pytest.raises(CoordinatorRefused):  # not even for another context
            open_stage_key(sealed_key, enclave_key, role="stage-1", manifest_digest=digest,
                           nonce=nonce)
        # Only the enclave that made the key can read it:
        assert open_stage_key(sealed_key, enclave_key, role="stage-0", manifest_digest=digest,
                              nonce=nonce) == secret
        with refused(Code.BAD_NONCE):  # and the recording cannot be played again
            client.call(request)


def test_a_rewritten_registration_is_refused(tmp_path: Path, ceremony: Ceremony) -> None:
    """The host swaps in its own public key (to receive the key itself) or another role."""
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        ceremony.set_manifest(client)
        for field, value in (("public_key", base64.b64encode(spki_der(
                ec.generate_private_key(ec.SECP256R1()).public_key())).decode()),
                ("role", "gateway")):
            request, _, _ = _captured_registration(ceremony, client)
            request[field] = value
            with refused(Code.NOT_ACCEPTED) as refusal:
                client.call(request)
            assert "report_data" in str(refusal.error) or "measurement" in str(refusal.error)


class _Relay:
    """A TLS server posing as the coordinator: its own RA-TLS certificate from an enclave of
    other code (what a relay can have); it records whatever a client sends it."""

    def __init__(self, tmp_path: Path) -> None:
        impostor = SimBackend("coordinator", config={"relay": True})
        identity = create_identity("coordinator", impostor.quote, impostor.collateral_json())
        self.context = identity.server_context()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(30)
        self.port = self.server.getsockname()[1]
        self.received = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            connection.settimeout(10)
            try:
                with self.context.wrap_socket(connection, server_side=True) as tls:
                    while chunk := tls.recv(65536):
                        self.received += chunk
            except (OSError, ssl.SSLError):
                continue

    def close(self) -> None:
        self.server.close()


def test_a_worker_sends_nothing_to_a_relay_posing_as_the_coordinator(
        tmp_path: Path, ceremony: Ceremony) -> None:
    """A real worker process pointed at the relay attests it first, sees another
    measurement, and sends it nothing."""
    relay = _Relay(tmp_path)
    try:
        spec = StageSpec(index=0, backend="sim",
                         coordinator_mrenclave=ceremony.coordinator_backend()
                         .measurement.mrenclave.hex(), coordinator=("127.0.0.1", relay.port),
                         listen=("127.0.0.1", 1), sealed_dir=str(tmp_path))
        result = subprocess.run([sys.executable, "-m", "smlaas", *spec.to_argv()],
                                capture_output=True, text=True, timeout=60)
    finally:
        relay.close()
    assert result.returncode == 1
    assert "not accepted for role 'coordinator'" in result.stderr, result.stderr[-1500:]
    assert bytes(relay.received) == b""


@pytest.mark.parametrize("hosts", [["stage-1"], ["localhost", "gateway"], ["coordinator"]])
def test_a_registrant_cannot_ask_for_a_role_name_as_a_host_name(
        tmp_path: Path, ceremony: Ceremony, hosts: list[str]) -> None:
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        ceremony.set_manifest(client)
        with refused(Code.MALFORMED) as refusal:
            client.register(ceremony.enclave("gateway"), role="gateway", hosts=hosts)
        assert "role name" in str(refusal.error)
        with refused(Code.MALFORMED):  # nor a stage any host name at all
            client.register(ceremony.enclave("stage-0"), role="stage-0", hosts=["localhost"])
        gateway = client.register(ceremony.enclave("gateway"), role="gateway",
                                  hosts=["localhost"])
        assert gateway.stage is None


def test_collateral_sent_by_the_registrant_is_ignored(tmp_path: Path,
                                                      ceremony: Ceremony) -> None:
    """The host attaches the oldest collateral it has; the coordinator uses its own, and the
    policy's evaluation-number floor refuses collateral from before a TCB recovery."""
    stale = ceremony.coordinator_backend().pki.collateral(age_days=25,
                                                          tcb_evaluation_data_number=3)
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        ceremony.set_manifest(client)
        request, _, _ = _captured_registration(ceremony, client)
        request["collateral"] = stale.to_json()
        assert client.call(request)["stage"]  # verified against the coordinator's own
    with coordinator_process(ceremony, tmp_path / "floor.sealed") as coordinator:
        client = coordinator.client()
        policy = {**ceremony.manifest().policy, "min_tcb_evaluation_data_number": 18}
        ceremony.set_manifest(client, ceremony.manifest(policy=policy))
        with refused(Code.NOT_ACCEPTED) as refusal:
            client.register(ceremony.enclave("stage-0"), role="stage-0")
        assert "tcb_evaluation" in str(refusal.error)


def test_the_owners_collateral_documents_are_held_to_the_policys_age(
        tmp_path: Path, ceremony: Ceremony) -> None:
    pki = ceremony.coordinator_backend().pki
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        old = ceremony.manifest()
        manifest = type(old)(version=1, policy=old.policy, topology=old.topology,
                             stages=old.stages,
                             collateral={"documents": [pki.collateral(age_days=20).to_json()]})
        ceremony.set_manifest(client, manifest)
        with refused(Code.NOT_ACCEPTED) as refusal:
            client.register(ceremony.enclave("stage-0"), role="stage-0")
        assert "freshness" in str(refusal.error) and "20.0 days old" in str(refusal.error)


def test_an_enclave_of_other_code_gets_neither_certificate_nor_key(
        tmp_path: Path, ceremony: Ceremony) -> None:
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        ceremony.set_manifest(client)
        with refused(Code.NOT_ACCEPTED) as refusal:
            client.register(ceremony.enclave("stage-0", patched=True), role="stage-0")
        assert "not accepted for role 'stage-0'" in str(refusal.error)
        with refused(Code.UNKNOWN_ROLE):
            client.register(ceremony.enclave("stage-7"), role="stage-7")
