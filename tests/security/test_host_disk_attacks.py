"""Attacks through the host's disks: an altered sub-model re-sealed under the host's key,
plaintext left where workers can read it, world-readable key files."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.enclave.sealing import seal
from smlaas.errors import ConfigError
from smlaas.export.sealed_build import sealed_directory, sealed_path
from smlaas.profile.cache import cache_dir
from smlaas.roles import StageSpec
from tests.conftest import cli_env
from tests.integration.test_cli import smlaas
from tests.security.conftest import (
    assert_port_closed,
    coordinator_address,
    deploy_settings,
    vacated,
)


def _altered_stage(build: Path, index: int) -> bytes:
    """The stage with its weights negated: the model the host would like served."""
    model = onnx.load(str(build / f"stage_{index}.onnx"))
    for initializer in model.graph.initializer:
        initializer.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(initializer),
                                                     initializer.name))
    return model.SerializeToString()


def _settings(tmp_path: Path, sealed_build, **overrides: object) -> DeploySettings:
    return deploy_settings(sealed_build, tmp_path / "state", **overrides)


def test_a_resealed_altered_stage_is_never_served(tmp_path: Path, sealed_build) -> None:
    """The host re-seals an altered stage 1 under its own key. The owner's deploy refuses the
    changed directory; a worker handed the altered file anyway (the host controls what it
    reads) refuses to unseal it, never listens, and the pipeline serves the owner's model."""
    build, _, _ = sealed_build
    tampered = tmp_path / "tampered"
    shutil.copytree(sealed_directory(build), tampered)
    sealed_path(tampered, 1).write_bytes(seal(_altered_stage(build, 1), key=b"\x33" * 32,
                                              stage=1))
    refused = _settings(tmp_path, sealed_build, build_dir=tampered)
    with pytest.raises(ConfigError, match="stage_1.sealed is not the stage this keyfile"), \
            Deployment(refused, LocalLauncher(tmp_path / "logs0")):
        pass

    with Deployment(_settings(tmp_path, sealed_build),
                    LocalLauncher(tmp_path / "logs")) as deployment:
        port = free_port()
        rogue = StageSpec(index=1, backend="sim",
                          coordinator_mrenclave=deployment.measurements["coordinator"],
                          coordinator=coordinator_address(deployment),
                          listen=("127.0.0.1", port), sealed_dir=str(tampered),
                          next_stages=(("127.0.0.1", free_port()),))
        with vacated(deployment, "stage-1"):
            result = subprocess.run([sys.executable, "-m", "smlaas", *rogue.to_argv()],
                                    capture_output=True, text=True, timeout=60,
                                    env=cli_env(cache_dir()))
        assert result.returncode == 1
        assert "wrong key for this sealed stage 1" in result.stderr, result.stderr[-1500:]
        assert_port_closed(port)
        from tests.security.test_manifest_attacks import _assert_serves_the_owners_model

        _assert_serves_the_owners_model(deployment, build)


def test_deploy_with_a_real_backend_refuses_a_directory_with_plaintext(
        tmp_path: Path, sealed_build) -> None:
    build, _, _ = sealed_build
    leaky = tmp_path / "leaky"
    shutil.copytree(sealed_directory(build), leaky)
    shutil.copy(build / "stage_0.onnx", leaky / "stage_0.onnx")
    settings = _settings(tmp_path, sealed_build, build_dir=leaky, backend="gramine",
                         measurements={"coordinator": "ab" * 32})
    with pytest.raises(ConfigError, match=r"plaintext sub-models \(stage_0.onnx\)"), \
            Deployment(settings, LocalLauncher(tmp_path / "logs")):
        pass
    assert not (tmp_path / "logs" / "coordinator.log").exists()


def test_seal_and_owner_init_make_a_world_readable_keyfile_private(tmp_path: Path,
                                                                    sealed_build) -> None:
    build, _, _ = sealed_build
    for name in ("keys.json", "owner.key"):
        (tmp_path / name).write_text("left here by the host")
        (tmp_path / name).chmod(0o644)
    sealed = smlaas("seal", str(build), "--keys", "keys.json", "--out", "deploy",
                    cwd=tmp_path)
    assert sealed.returncode == 0, sealed.stderr
    assert "(mode 0600)" in sealed.stdout
    owner = smlaas("owner", "init", "--key", "owner.key", "--force", cwd=tmp_path)
    assert owner.returncode == 0, owner.stderr
    assert "mode 0600" in owner.stdout
    for name in ("keys.json", "owner.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    refused = smlaas("owner", "init", "--key", "owner.key", cwd=tmp_path)
    assert refused.returncode == 2 and "never overwritten" in refused.stderr
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == sorted(
        ["plan.json", *(p.name for p in sealed_directory(build).glob("stage_*.sealed"))])
