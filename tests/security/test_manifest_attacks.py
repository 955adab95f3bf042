"""Attacks on the owner's decisions: the host pre-seeds, forges, alters, replays or rolls back
the manifest of a real coordinator process; it must never get a manifest of its own in, and
nothing it sends may drop the connection instead of being refused with a code."""

from __future__ import annotations

import base64
import json
import select
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import Code
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.enclave.ratls import connect_attested
from smlaas.enclave.sealing import OwnerKeys
from smlaas.errors import DeployError
from smlaas.transport.framing import recv_message
from tests.coordinator_setup import Ceremony, refused
from tests.security.conftest import coordinator_process


def _settings(tmp_path: Path, build: Path, keys: Path, owner: Path, state: Path,
              **overrides: object) -> DeploySettings:
    from smlaas.coordinator.server import free_port

    return DeploySettings(build_dir=build, keys_path=keys, state_dir=state, owner_key_path=owner,
                          port=free_port(), threads=1, ready_timeout_s=60,
                          **overrides)  # type: ignore[arg-type]


def _host_manifest_request(ceremony: Ceremony, signer: OwnerKey | None, instance: bytes,
                           *, host_keys: dict[int, bytes]) -> dict:
    """The owner's public policy and topology, but the host's own stage keys."""
    host = Ceremony(ceremony.pki_dir, owner=signer or OwnerKey.create(), stage_keys=host_keys,
                    stage_sha256={k: "00" * 32 for k in host_keys})
    manifest = host.manifest()
    request = {"op": "set_manifest", "manifest": manifest.to_json(),
               "stage_keys": {str(k): base64.b64encode(v).decode() for k, v in host_keys.items()}}
    if signer is not None:
        request["signature"] = base64.b64encode(
            signer.sign_manifest(manifest.digest(), instance)).decode()
    return request


@pytest.mark.parametrize("signer", ["unsigned", "host key"])
def test_host_cannot_set_a_manifest_the_owner_did_not_sign(tmp_path: Path, ceremony: Ceremony,
                                                           signer: str) -> None:
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        host_keys = {0: b"\x11" * 32}
        with refused(Code.BAD_SIGNATURE) as refusal:
            client.exchange(lambda instance: _host_manifest_request(
                ceremony, None if signer == "unsigned" else OwnerKey.create(), instance,
                host_keys=host_keys))
        assert "owner" in str(refusal.error)
        assert client.status().manifest_digest is None


def test_an_altered_signed_manifest_is_refused(tmp_path: Path, ceremony: Ceremony) -> None:
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()

        def altered(instance: bytes) -> dict:
            manifest = ceremony.manifest()
            signature = ceremony.owner.sign_manifest(manifest.digest(), instance)
            data = json.loads(manifest.to_json())
            data["policy"]["allow_debug_insecure"] = True  # after signing
            return {"op": "set_manifest", "manifest": json.dumps(data),
                    "signature": base64.b64encode(signature).decode(),
                    "stage_keys": {"0": base64.b64encode(ceremony.stage_keys[0]).decode()}}

        with refused(Code.BAD_SIGNATURE):
            client.exchange(altered)
        assert client.status().manifest_digest is None


def test_a_signed_manifest_replayed_to_another_coordinator_is_refused(
        tmp_path: Path, ceremony: Ceremony) -> None:
    """The owner's request to coordinator A, recorded by the host and sent verbatim to B
    (same code, same owner key): the signature names A's instance key."""
    with coordinator_process(ceremony, tmp_path / "a.sealed") as first, \
            coordinator_process(ceremony, tmp_path / "b.sealed") as second:
        recorded: list[dict] = []

        def owner_request(instance: bytes) -> dict:
            manifest = ceremony.manifest()
            request = {"op": "set_manifest", "manifest": manifest.to_json(),
                       "signature": base64.b64encode(ceremony.owner.sign_manifest(
                           manifest.digest(), instance)).decode(),
                       "stage_keys": {"0": base64.b64encode(ceremony.stage_keys[0]).decode()}}
            recorded.append(request)
            return request

        digest = first.client().exchange(owner_request)["digest"]
        assert first.client().status().manifest_digest == digest
        with refused(Code.BAD_SIGNATURE):
            second.client().call(recorded[0])
        assert second.client().status().manifest_digest is None


def test_rolled_back_or_stale_manifest_versions_are_refused(tmp_path: Path,
                                                            ceremony: Ceremony) -> None:
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        current = ceremony.set_manifest(client, ceremony.manifest(version=5))
        older = ceremony.manifest(version=4, policy={
            "allow_simulation_insecure": True, "allow_debug_insecure": True,
            "roles": ceremony.manifest().policy["roles"]})
        with refused(Code.STALE_VERSION) as refusal:
            ceremony.set_manifest(client, older)  # even signed by the owner
        assert "version 5" in str(refusal.error)
        assert client.status().manifest_digest == current


def _raw_exchange(coordinator, payload: bytes) -> dict:
    """Sends ``payload`` as one frame on an attested connection; returns the reply."""
    tls, _ = connect_attested(*coordinator.address, coordinator._policy(),
                              roots=coordinator._roots(), role="coordinator")
    with tls:
        tls.sendall(len(payload).to_bytes(4, "big") + payload)
        return recv_message(tls)


def test_malformed_manifest_policy_and_collateral_get_a_coded_refusal(
        tmp_path: Path, ceremony: Ceremony) -> None:
    """Every malformed input is answered on its connection with a code; none drops it."""
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        client = coordinator.client()
        roles = ceremony.manifest().policy["roles"]

        def signed(policy: dict | None = None, collateral: dict | None = None) -> dict:
            def build(instance: bytes) -> dict:
                manifest = ceremony.manifest(policy=policy)
                data = json.loads(manifest.to_json())
                if collateral is not None:
                    data["collateral"] = collateral
                text = json.dumps(data)
                return {"op": "set_manifest", "manifest": text, "signature": "AAAA",
                        "stage_keys": {}}
            return build

        cases = {
            "not JSON": lambda _: {"op": "set_manifest", "manifest": "{not json",
                                   "signature": "AA"},
            "string boolean": signed({"allow_simulation_insecure": "false", "roles": roles}),
            "string 'no' for debug": signed({"allow_simulation_insecure": True,
                                             "allow_debug_insecure": "no", "roles": roles}),
            "empty role rule": signed({"allow_simulation_insecure": True,
                                       "roles": {**roles, "gateway": {}}}),
            "junk collateral": signed(collateral={"documents": ["{}"]}),
            "collateral of both kinds": signed(collateral={"documents": ["{}"],
                                                           "pccs_url": "https://x"}),
        }
        for name, build in cases.items():
            with refused(Code.MALFORMED) as refusal:
                client.exchange(build)
            assert str(refusal.error), name
        for payload in (b"\xff\xfe not json", b"[1, 2]", json.dumps({"op": 7}).encode()):
            reply = _raw_exchange(coordinator, payload)
            assert reply["ok"] is False and reply["code"] in ("malformed", "unknown_op"), reply
        assert client.status().manifest_digest is None  # and it still answers


def test_the_coordinator_stays_up_under_many_bad_connections(tmp_path: Path,
                                                             ceremony: Ceremony) -> None:
    """Connections that never finish a handshake, or send garbage, neither stop the
    coordinator nor hold it: the owner's request is served meanwhile."""
    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        idle = [socket.create_connection(coordinator.address, timeout=5) for _ in range(20)]
        for sock in idle[:10]:
            sock.sendall(b"\x16\x03\x01 not a TLS hello")
        try:
            client = coordinator.client()
            assert ceremony.set_manifest(client) == client.status().manifest_digest
        finally:
            for sock in idle:
                sock.close()
        assert coordinator.process.poll() is None


def test_connections_beyond_the_limit_are_closed_before_any_handshake(
        tmp_path: Path, ceremony: Ceremony) -> None:
    """Open connections are bounded from accept on: those past the limit are closed at once
    (the peer sees EOF, no TLS is spoken), and service resumes when the flood ends."""
    from smlaas.coordinator.server import MAX_CONNECTIONS

    with coordinator_process(ceremony, tmp_path / "state.sealed") as coordinator:
        flood = [socket.create_connection(coordinator.address, timeout=5)
                 for _ in range(MAX_CONNECTIONS + 16)]
        closed: set[socket.socket] = set()
        try:
            end = time.monotonic() + 5
            while len(closed) < 16 and time.monotonic() < end:
                readable, _, _ = select.select([s for s in flood if s not in closed], [], [],
                                               0.2)
                for sock in readable:  # the others are held open, waiting for a handshake
                    try:
                        if sock.recv(1) == b"":
                            closed.add(sock)
                    except OSError:
                        closed.add(sock)
        finally:
            for sock in flood:
                sock.close()
        assert len(closed) >= 16, len(closed)
        assert coordinator.process.poll() is None
        client = coordinator.client()
        assert ceremony.set_manifest(client) == client.status().manifest_digest


def test_pre_seeded_state_cannot_make_the_owner_serve_the_hosts_model(
        tmp_path: Path, ceremony: Ceremony, sealed_build) -> None:
    """The host runs the genuine coordinator on the state path deploy will use and tries to
    set its own manifest (the owner's public policy, its own keys): refused. The owner's
    deploy then sets its own manifest and serves the owner's model."""
    build, keyfile, owner_path = sealed_build
    owner = OwnerKey.load(owner_path)
    ceremony = Ceremony(ceremony.pki_dir, owner=owner)
    state = tmp_path / "state"
    state.mkdir()
    with coordinator_process(ceremony, state / "coordinator.sealed") as seeded:
        for signer in (None, OwnerKey.create()):
            with refused(Code.BAD_SIGNATURE):
                seeded.client().exchange(lambda instance, s=signer: _host_manifest_request(
                    ceremony, s, instance, host_keys={0: b"\x22" * 32}))
    settings = _settings(tmp_path, build, keyfile, owner_path, state)
    with Deployment(settings, LocalLauncher(state / "logs")) as deployment:
        assert deployment.manifest is not None
        keys = OwnerKeys.load(keyfile)
        assert {k: s.sha256 for k, s in deployment.manifest.stages.items()} == keys.stage_sha256
        _assert_serves_the_owners_model(deployment, build)


def test_deploy_refuses_a_coordinator_holding_another_manifest(
        tmp_path: Path, ceremony: Ceremony, sealed_build) -> None:
    """A coordinator state that already holds another manifest (an earlier deployment, or a
    rolled-back state) is refused with both digests; replacing it needs the owner's explicit
    --replace-manifest and a higher version."""
    build, keyfile, owner_path = sealed_build
    ceremony = Ceremony(ceremony.pki_dir, owner=OwnerKey.load(owner_path))
    state = tmp_path / "state"
    state.mkdir()
    with coordinator_process(ceremony, state / "coordinator.sealed") as earlier:
        held = ceremony.set_manifest(earlier.client())
    settings = _settings(tmp_path, build, keyfile, owner_path, state)
    refused_deployment = Deployment(settings, LocalLauncher(state / "logs"))
    try:
        with pytest.raises(DeployError, match="already holds another manifest") as caught:
            refused_deployment.start()
    finally:
        refused_deployment.stop()
    message = str(caught.value)
    assert held in message and "--replace-manifest" in message
    assert not (state / "logs" / "gateway.log").exists()  # nothing was started to serve
    replacing = _settings(tmp_path, build, keyfile, owner_path, state, replace_manifest=True)
    with Deployment(replacing, LocalLauncher(state / "logs")) as deployment:
        assert deployment.manifest is not None and deployment.manifest.version == 2
        _assert_serves_the_owners_model(deployment, build)


def _assert_serves_the_owners_model(deployment: Deployment, build: Path) -> None:
    import onnx

    from smlaas.profile.session import create_session

    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    expected = create_session(onnx.load(str(build.parent / "m.onnx")), threads=1).run(
        None, {"x": x})[0]
    with deployment.client() as client:
        got = client.infer({"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)



def test_a_rolled_back_state_shows_in_the_owners_status(tmp_path: Path,
                                                        ceremony: Ceremony) -> None:
    """Without a monotonic counter the host can put back an earlier sealed state; the owner
    sees the earlier version in `smlaas owner status` (docs/SECURITY.md)."""
    import os
    import shutil
    import subprocess
    import sys

    state = tmp_path / "state.sealed"
    owner_key = tmp_path / "owner.key"
    ceremony.owner.save(owner_key)
    with coordinator_process(ceremony, state) as coordinator:
        ceremony.set_manifest(coordinator.client(), ceremony.manifest(version=1))
        shutil.copy(state, tmp_path / "v1.sealed")  # the host keeps a copy
        v2 = ceremony.set_manifest(coordinator.client(), ceremony.manifest(
            version=2, policy={**ceremony.manifest().policy, "max_collateral_age_days": 3}))
    shutil.copy(tmp_path / "v1.sealed", state)  # ... and puts it back
    with coordinator_process(ceremony, state) as coordinator:
        result = subprocess.run(
            [sys.executable, "-m", "smlaas", "owner", "status", "--key", str(owner_key),
             "--coordinator", f"127.0.0.1:{coordinator.port}", "--json"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["manifest_version"] == 1 and status["manifest_digest"] != v2
