"""Attacks through the launcher, which chooses every process's host options: it cuts the
chain short (so a stage's intermediate tensors come back as outputs) or turns on batching the
owner's seal found unsafe. Against a real deployment of the sealed chain model."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.roles import GatewaySpec, StageSpec
from tests.integration.serving_setup import cache_env
from tests.security.conftest import assert_port_closed, coordinator_address, vacated


@pytest.fixture(scope="module")
def deployed(sealed_build, tmp_path_factory: pytest.TempPathFactory):
    build, keyfile, owner = sealed_build
    state = tmp_path_factory.mktemp("launcher-attacks") / "state"
    settings = DeploySettings(build_dir=build, keys_path=keyfile, state_dir=state,
                              owner_key_path=owner, port=free_port(), threads=1,
                              max_batch_size=0, ready_timeout_s=60)
    # A module fixture runs before the per-test cache isolation: use the same cache here.
    with cache_env(tmp_path_factory.getbasetemp() / "smlaas-cache"), \
            Deployment(settings, LocalLauncher(state / "logs")) as deployment:
        yield deployment


def _run(spec_argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smlaas", *spec_argv], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def _stage(deployment: Deployment, index: int, **placement: object) -> StageSpec:
    values: dict = {"index": index, "backend": "sim",
                    "coordinator_mrenclave": deployment.measurements["coordinator"],
                    "coordinator": coordinator_address(deployment),
                    "listen": ("127.0.0.1", free_port()),
                    "sealed_dir": str(deployment.sealed_dir), **placement}
    return StageSpec(**values)


def test_a_stage_started_without_its_next_stage_refuses_to_answer(deployed) -> None:
    assert deployed.stage_count == 3
    first = _stage(deployed, 0)  # no --next: it would answer with its own activations
    with vacated(deployed, "stage-0"):
        result = _run(first.to_argv())
    assert result.returncode == 2, result.stderr[-1500:]
    assert "stage-0 of a 3-stage manifest must forward to the next stage" in result.stderr
    assert_port_closed(first.listen[1])
    last = _stage(deployed, 2, next_stages=(("127.0.0.1", 9),))
    with vacated(deployed, "stage-2"):
        result = _run(last.to_argv())
    assert result.returncode == 2 and "is the last stage" in result.stderr


def test_the_host_cannot_add_replicas_the_manifest_does_not_name(deployed) -> None:
    """The owner's manifest says how many replicas serve each stage; a host that hands a
    stage more next-stage addresses (or the gateway more first-stage ones) is refused."""
    assert deployed.manifest is not None and deployed.manifest.replicas_of(1) == 1
    first = _stage(deployed, 0, next_stages=(("127.0.0.1", 9), ("127.0.0.1", 10)))
    with vacated(deployed, "stage-0"):
        result = _run(first.to_argv())
    assert result.returncode == 2, result.stderr[-1500:]
    assert "the host gave 2 addresses for stage-1; the owner's manifest has 1" in result.stderr
    assert_port_closed(first.listen[1])
    gateway = GatewaySpec(backend="sim", coordinator_mrenclave=deployed.measurements[
        "coordinator"], coordinator=coordinator_address(deployed),
        first_stages=(_first_stage_address(deployed), ("127.0.0.1", 9)),
        listen=("127.0.0.1", free_port()), model_name=deployed.model_name)
    result = _run(gateway.to_argv())
    assert result.returncode == 2 and "2 addresses for stage-0" in result.stderr, \
        result.stderr[-1500:]


def test_the_host_cannot_turn_on_batching_the_manifest_forbids(deployed) -> None:
    assert deployed.manifest is not None and deployed.manifest.max_batch_size == 0
    port = free_port()
    spec = GatewaySpec(backend="sim", coordinator_mrenclave=deployed.measurements["coordinator"],
                       coordinator=coordinator_address(deployed),
                       first_stages=(_first_stage_address(deployed),), listen=("127.0.0.1", port),
                       model_name=deployed.model_name, max_batch_size=8)
    process = subprocess.Popen([sys.executable, "-m", "smlaas", *spec.to_argv()],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ))
    try:
        context = ssl.create_default_context(cafile=str(deployed.ca_path))
        config = _wait_for_config(f"https://127.0.0.1:{port}", deployed.model_name, context)
        assert config["max_batch_size"] == 0
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "--max-batch-size 8 lowered to the manifest's 0" in output


def _first_stage_address(deployment: Deployment) -> tuple[str, int]:
    argv = deployment.launcher._processes["stage-0"].spec.argv  # type: ignore[attr-defined]
    host, port = argv[argv.index("--listen") + 1].rsplit(":", 1)
    return host, int(port)


def _wait_for_config(url: str, model: str, context: ssl.SSLContext) -> dict:
    end = time.monotonic() + 60
    with httpx.Client(verify=context, timeout=2) as client:
        while time.monotonic() < end:
            try:
                response = client.get(f"{url}/v2/models/{model}/config")
                if response.status_code == 200:
                    return dict(response.json())
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise AssertionError("the extra gateway never answered")



