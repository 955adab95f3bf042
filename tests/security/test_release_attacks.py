"""Attacks with stale decisions (issue 17, item 3): after the owner replaced the manifest, the
host keeps a v1 gateway running, or restores the coordinator's earlier sealed state. Clients
configured with the owner's public key, with no manifest digest given, refuse both; the owner's
CLI notices the rollback and never signs a second, different version of one number."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smlaas.client import InferenceClient
from smlaas.client.release_check import ReleaseCheck
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.deploy.owner_plane import OwnerPlane
from smlaas.errors import DeployError, ReleaseError
from smlaas.version_memory import VersionMemory
from tests.security.conftest import coordinator_address, deploy_settings

DAY_S = 24 * 3600


def _settings(root: Path, sealed_build, state: str, **overrides: object) -> DeploySettings:
    return deploy_settings(sealed_build, root / state, **overrides)


def _client(deployment: Deployment, memory: Path, **options: object) -> InferenceClient:
    """A client as a user configures it: CA, gateway policy, owner key; no manifest digest."""
    return InferenceClient(deployment.url, ca=deployment.ca_path,
                           policy=deployment.role_policy("gateway"),
                           roots=deployment.trusted_roots,
                           owner_public_key=deployment.owner_public_key_path,
                           releases=VersionMemory(memory), **options)  # type: ignore[arg-type]


def _x() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)


def _replace(root: Path, sealed_build, deployment: Deployment, *, max_batch_size: int,
             state: str) -> int:
    """The owner replaces the manifest on the running coordinator (smlaas owner
    set-manifest --replace-manifest): another batching limit, so another manifest."""
    plane = OwnerPlane(_settings(root, sealed_build, state, replace_manifest=True,
                                 max_batch_size=max_batch_size))
    return plane.set_manifest_at(coordinator_address(deployment)).version


def _infer_cli(deployment: Deployment, cwd: Path) -> subprocess.CompletedProcess[str]:
    np.save(cwd / "x.npy", _x())
    return subprocess.run([sys.executable, "-m", "smlaas", "infer", "--url", deployment.url,
                           "--ca", str(deployment.ca_path), "--input", "x.npy"], cwd=cwd,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_a_v1_gateway_kept_running_after_a_replace_is_refused(tmp_path: Path,
                                                             sealed_build) -> None:
    with Deployment(_settings(tmp_path, sealed_build, "v1"),
                    LocalLauncher(tmp_path / "logs")) as v1:
        with _client(v1, tmp_path / "seen-a.json") as client:
            client.infer({"x": _x()})
            assert client.release is not None and client.release.version == 1
        ok = _infer_cli(v1, tmp_path)
        assert ok.returncode == 0 and "release v1" in ok.stdout, ok.stderr
        assert _replace(tmp_path, sealed_build, v1, max_batch_size=2, state="v2") == 2
        # The host keeps the v1 gateway serving. A new client (nothing seen yet) asks the
        # coordinator the gateway's release names for the current release first:
        with _client(v1, tmp_path / "seen-b.json") as client, \
                pytest.raises(ReleaseError, match="v2 is current"):
            client.infer({"x": _x()})
        refused = _infer_cli(v1, tmp_path)
        assert refused.returncode == 1 and "v2 is current" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        # And the stages of v1 lost their leases when v1 was replaced: none kept serving.
        _wait_until(lambda: all("lost its replica slot" in p.read_text() and "slot_revoked" in
                                p.read_text() for p in (tmp_path / "logs").glob("stage-*.log")),
                    30)


def test_a_gateway_whose_release_expired_is_refused(tmp_path: Path, sealed_build) -> None:
    """The host keeps a deployment the owner stopped renewing (and hides the coordinator, or
    restores it: it holds the same old release). Once the release expires, no client takes
    it, even one that has never seen anything newer."""
    with Deployment(_settings(tmp_path, sealed_build, "v1", release_validity_s=3600),
                    LocalLauncher(tmp_path / "logs")) as v1:
        with _client(v1, tmp_path / "seen.json") as client:
            client.infer({"x": _x()})
        later = _client(v1, tmp_path / "seen-later.json")
        assert later.release_check is not None
        later.release_check = ReleaseCheck(later.release_check.owner_public_key,
                                           roots=v1.trusted_roots,
                                           memory=VersionMemory(tmp_path / "seen-later.json"),
                                           clock=lambda: time.time() + 3601)
        with later, pytest.raises(ReleaseError, match="expired"):
            later.infer({"x": _x()})


def test_a_restored_coordinator_state_is_refused_and_never_makes_the_owner_sign_twice(
        tmp_path: Path, sealed_build) -> None:
    _, _, owner_key = sealed_build
    launcher = LocalLauncher(tmp_path / "logs")
    with Deployment(_settings(tmp_path, sealed_build, "v1"), launcher) as v1:
        state = v1.settings.state_dir / "coordinator.sealed"
        saved_v1 = tmp_path / "coordinator-v1.sealed"
        shutil.copy(state, saved_v1)
        assert _replace(tmp_path, sealed_build, v1, max_batch_size=2, state="v2") == 2
        seen = tmp_path / "seen.json"
        with _client(v1, seen) as client, pytest.raises(ReleaseError, match="v2 is current"):
            client.ready()
        instance = v1.owner_plane.release.release.coordinator_instance  # type: ignore[union-attr]
        assert VersionMemory(seen).highest(f"{v1.owner_plane.owner.fingerprint}/{instance}") == 2
        # The host rolls the coordinator back: the v1 sealed state, and a restart.
        shutil.copy(saved_v1, state)
        before = launcher.pids()["coordinator"]
        os.kill(before, signal.SIGKILL)
        address = coordinator_address(v1)
        _wait_until(lambda: _held_version(owner_key, address, tmp_path) == 1, 30)
        # A client that has seen v2 never goes back, whatever the coordinator now says.
        with _client(v1, seen) as client, pytest.raises(ReleaseError, match="v2 is current"):
            client.ready()
        # The owner sees the rollback, refuses to renew its release, and signs v3 next.
        status = _owner(owner_key, tmp_path, "status", "--coordinator", _text(address))
        assert status.returncode == 1 and "rolled back" in status.stdout, status.stdout
        renew = _owner(owner_key, tmp_path, "release", "--refresh", "--coordinator",
                       _text(address))
        assert renew.returncode == 1 and "rolled back by the host" in renew.stderr, renew.stderr
        with pytest.raises(DeployError, match="rolled back by the host"):
            OwnerPlane(_settings(tmp_path, sealed_build, "v1-again")).set_manifest_at(address)
        assert _replace(tmp_path, sealed_build, v1, max_batch_size=4, state="v3") == 3


def _text(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _owner(key: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smlaas", "owner", *args, "--key", str(key)],
                          cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def _held_version(key: Path, address: tuple[str, int], cwd: Path) -> int | None:
    result = _owner(key, cwd, "status", "--coordinator", _text(address), "--json")
    if result.returncode not in (0, 1) or not result.stdout.strip():
        return None
    import json

    return json.loads(result.stdout).get("manifest_version")


def _wait_until(condition, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError("timed out")
