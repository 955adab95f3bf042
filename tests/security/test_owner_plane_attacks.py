"""Attacks on the line between the owner plane and the operator plane (issue 17, items 1, 2
and 5): the host runs the operator (and its engines) and controls the disks, so it answers the
owner's process with whatever it likes, swaps plan.json while the owner reads it, re-seals a
stage under another key, and reads the environment of every process it started."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.deploy.operator import OperatorProcess
from smlaas.deploy.owner_plane import OwnerPlane
from smlaas.enclave.sealing import OwnerKeys, seal, unseal
from smlaas.errors import ConfigError, DeployError
from smlaas.export.sealed_build import sealed_directory, sealed_path
from tests.security.conftest import deploy_settings

HOSTILE_OPERATOR = r'''
import base64, json, os, pickle, sys

class Payload:
    """What a hostile Ray node returns: unpickling it runs code in whoever unpickles."""
    def __reduce__(self):
        return (exec, ("open(%r, 'w').write(str(__import__('os').getpid()))" % MARKER,))

MARKER = sys.argv[1]
blob = base64.b64encode(pickle.dumps(Payload())).decode()
for number, line in enumerate(sys.stdin):
    request = json.loads(line)
    if request["op"] == "hello":
        answer = {"ok": True, "result": {"pid": os.getpid()}}
    elif request["op"] == "reserve":
        # a pickle where an address belongs, then (if the owner asks again) a host:port with
        # a payload for a shell in place of a host name
        answer = {"ok": True, "result": blob} if number < 2 else \
            {"ok": True, "result": ["127.0.0.1; touch " + MARKER, 7443]}
    elif request["op"] == "problems":
        answer = {"ok": True, "result": []}
    else:
        answer = {"ok": True, "result": None}
    answer["id"] = request["id"]
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
'''


def _settings(tmp_path: Path, sealed_build, **overrides: object) -> DeploySettings:
    return deploy_settings(sealed_build, tmp_path / "state", **overrides)


def test_a_hostile_operator_cannot_run_code_in_the_owners_process(tmp_path: Path,
                                                                  sealed_build) -> None:
    """The operator (the host's: its Ray driver, its launcher) answers with a pickle whose
    unpickling runs code, then with an address carrying a shell command. The owner's process
    only parses JSON from it and checks every answer's shape: nothing runs, and the deploy
    stops with a clear error."""
    marker = tmp_path / "pwned"
    script = tmp_path / "hostile_operator.py"
    script.write_text(HOSTILE_OPERATOR)
    operator = OperatorProcess("local", tmp_path / "logs",
                               command=[sys.executable, str(script), str(marker)])
    deployment = Deployment(_settings(tmp_path, sealed_build), operator)
    with pytest.raises(DeployError, match="the operator's address for coordinator is "
                                          "malformed"), deployment:
        pass
    assert not marker.exists()
    # The same with an answer that is a valid shape but a shell command for a host name.
    operator = OperatorProcess("local", tmp_path / "logs2",
                               command=[sys.executable, str(script), str(marker)])
    operator._call("reserve", name="x")  # the pickle answer, read as a string, never loaded
    with pytest.raises(DeployError, match="malformed"):
        operator.reserve("coordinator")
    operator.stop()
    assert not marker.exists()


def test_the_operator_and_every_role_get_no_secret_from_the_owners_environment(
        tmp_path: Path, sealed_build, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the owner's shell holds (the owner key's path, a cloud credential) is not in
    the environment of the operator process or of any process it starts."""
    _, _, owner = sealed_build
    monkeypatch.setenv("SMLAAS_OWNER_KEY", str(owner))
    monkeypatch.setenv("OWNER_CLOUD_TOKEN", "canary-7f3a")
    operator = OperatorProcess("local", tmp_path / "logs")
    try:
        deployment = Deployment(_settings(tmp_path, sealed_build), operator)
    except BaseException:
        operator.stop()
        raise
    with deployment:
        pids = {"operator": operator.operator_pid, **operator.pids()}
        assert set(pids) >= {"operator", "coordinator", "gateway", "stage-0"}
        for name, pid in pids.items():
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"canary-7f3a" not in environ, name
            assert b"SMLAAS_OWNER_KEY" not in environ, name
            assert str(owner).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), name
        with deployment.client() as client:
            assert client.ready()


def test_plan_json_swapped_between_reads_changes_nothing_the_owner_signs(
        tmp_path: Path, sealed_build) -> None:
    """A renaming thread swaps plan.json between the owner's plan and one that claims a
    batching limit of 64 (seal recorded 8), as a racing host on a shared filesystem would.
    The owner reads the file once: it either refuses (the bytes are not what it sealed) or
    signs exactly the sealed plan's values, with the manifest binding those bytes."""
    build, keyfile, _ = sealed_build
    sealed = tmp_path / "sealed"
    shutil.copytree(sealed_directory(build), sealed)
    genuine = (sealed / "plan.json").read_bytes()
    data = json.loads(genuine)
    assert data["notes"]["serving"]["max_batch_size"] == 8
    data["notes"]["serving"]["max_batch_size"] = 64
    altered = json.dumps(data).encode()
    (tmp_path / "genuine.json").write_bytes(genuine)
    (tmp_path / "altered.json").write_bytes(altered)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            for source in ("altered.json", "genuine.json"):
                shutil.copy(tmp_path / source, tmp_path / "next.json")
                os.replace(tmp_path / "next.json", sealed / "plan.json")

    thread = threading.Thread(target=swap, daemon=True)
    thread.start()
    signed, refused = 0, 0
    keys = OwnerKeys.load(keyfile)
    try:
        deadline = time.monotonic() + 20
        while (signed < 10 or refused < 3) and time.monotonic() < deadline:
            try:
                plane = OwnerPlane(_settings(tmp_path, sealed_build, build_dir=sealed))
                plane.check_sealed_dir()
            except ConfigError as err:
                assert "belongs to another sealed build" in str(err) or "plan.json" in str(err)
                refused += 1
                continue
            signed += 1
            assert plane.plan_sha256 == keys.build_sha256
            assert plane.max_batch_size == 8 and plane.replicas == [1, 1, 1]
            plane.measurements = {role: "ab" * 32 for role in
                                  ("gateway", "stage-0", "stage-1", "stage-2", "coordinator")}
            manifest = plane.build_manifest()
            assert manifest.max_batch_size == 8 and manifest.replicas == {}
            assert manifest.plan_sha256 == keys.build_sha256
    finally:
        stop.set()
        thread.join(timeout=5)
    assert signed >= 10 and refused >= 1, (signed, refused)


def test_a_stage_resealed_under_another_key_is_refused_before_anything_starts(
        tmp_path: Path, sealed_build) -> None:
    """The host re-seals stage 1's very plaintext (same SHA-256 in the header) under its own
    key: deploy compares each header's key id with the keyfile's and starts nothing."""
    build, keyfile, _ = sealed_build
    tampered = tmp_path / "tampered"
    shutil.copytree(sealed_directory(build), tampered)
    keys = OwnerKeys.load(keyfile)
    plaintext = unseal(sealed_path(tampered, 1).read_bytes(), key=keys.stage_keys[1], stage=1)
    sealed_path(tampered, 1).write_bytes(seal(plaintext, key=b"\x44" * 32, stage=1))
    launcher = LocalLauncher(tmp_path / "logs")
    with pytest.raises(ConfigError, match="stage_1.sealed is sealed under another key"), \
            Deployment(_settings(tmp_path, sealed_build, build_dir=tampered), launcher):
        pass
    assert not (tmp_path / "logs" / "coordinator.log").exists()
