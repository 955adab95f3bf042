"""The client SDK and `smlaas infer` against a deployed pipeline: attestation by default,
the async client, per-call timeouts, and one typed error (one CLI line) for every failure."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from smlaas.client import AsyncInferenceClient, InferenceClient
from smlaas.coordinator.ca import DeploymentCA
from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment
from smlaas.enclave.policy import Policy, RolePolicy
from smlaas.errors import (
    ConfigError,
    PolicyError,
    RequestTimeout,
    TlsError,
    TransportError,
)
from tests.integration.serving_setup import (
    cache_env,
    deployment,
    random_image,
    sealed_build,
    whole_model_outputs,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("client")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root, machines=2)
        with deployment(root, build, keys) as running:
            yield running, root / "cache"


def test_the_client_attests_before_its_first_request(served) -> None:
    running, _ = served
    x = random_image(2)
    with running.client() as client:
        assert client.verdict is None
        outputs = client.infer({"input": x})
        assert client.verdict is not None and client.verdict.simulated
    np.testing.assert_allclose(outputs["fc"], whole_model_outputs(x), rtol=1e-4, atol=1e-5)
    wrong = Policy(allow_simulation_insecure=True,
                   roles={"gateway": RolePolicy(mrenclave=("00" * 32,))})
    with InferenceClient(running.url, ca=running.ca_path, policy=wrong,
                         roots=running.trusted_roots,
                         owner_public_key=running.owner_public_key_path) as client, \
            pytest.raises(PolicyError, match="measurement"):
        client.infer({"input": x})
    with pytest.raises(ConfigError, match="needs a policy"):
        InferenceClient(running.url, ca=running.ca_path)
    with pytest.raises(ConfigError, match="needs the owner's public key"):
        InferenceClient(running.url, ca=running.ca_path, policy=running.role_policy("gateway"))
    with InferenceClient(running.url, ca=running.ca_path, attest=False) as client:
        assert client.ready() and client.verdict is None


def test_the_async_client_has_the_same_surface(served) -> None:
    running, _ = served
    x = random_image(3)

    async def main() -> tuple[dict, bool]:
        async with AsyncInferenceClient(
                running.url, ca=running.ca_path, policy=running.role_policy("gateway"),
                roots=running.trusted_roots, manifest_digest=running.manifest.digest(),
                owner_public_key=running.owner_public_key_path) as client:
            results = await asyncio.gather(*(client.infer({"input": x}) for _ in range(4)))
            return results[0], await client.ready()

    first, ready = asyncio.run(main())
    assert ready
    np.testing.assert_allclose(first["fc"], whole_model_outputs(x), rtol=1e-4, atol=1e-5)


def test_failures_are_typed_errors(served, tmp_path: Path) -> None:
    running, _ = served
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text(DeploymentCA.create().cert_pem())
    with InferenceClient(running.url, ca=other_ca, attest=False) as client, \
            pytest.raises(TlsError, match="deployment CA"):
        client.ready()
    with InferenceClient(f"https://127.0.0.1:{free_port()}", ca=running.ca_path,
                         attest=False) as client, pytest.raises(TransportError,
                                                                match="cannot connect"):
        client.ready()
    with pytest.raises(ConfigError, match="must be https"):
        InferenceClient(running.url.replace("https", "http"), ca=running.ca_path, attest=False)
    with running.client() as client, pytest.raises(RequestTimeout):
        client.infer({"input": random_image(4)}, timeout_s=0.0005)
    assert not issubclass(TransportError, httpx.HTTPError)


def _infer_cli(cache: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SMLAAS_CACHE_DIR": str(cache), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "smlaas", "infer", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _requests_seen(running: Deployment) -> float:
    context = ssl.create_default_context(cafile=str(running.ca_path))
    text = httpx.get(f"{running.url}/metrics", verify=context, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("smlaas_requests_total{"))


def test_smlaas_infer_attests_by_default_and_fails_in_one_line(served, tmp_path: Path) -> None:
    running, cache = served
    np.save(tmp_path / "x.npy", random_image(6))
    common = ["--url", running.url, "--input", "x.npy"]
    ok = _infer_cli(cache, tmp_path, *common, "--ca", str(running.ca_path))
    assert ok.returncode == 0, ok.stderr
    assert "gateway attested" in ok.stdout and "SIMULATED" in ok.stdout
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_text(DeploymentCA.create().cert_pem())
    (tmp_path / "gateway-policy.toml").write_text(running.gateway_policy_path.read_text())
    (tmp_path / "owner.pub").write_text(running.owner_public_key_path.read_text())
    wrong_ca = _infer_cli(cache, tmp_path, *common, "--ca", str(other_ca))
    assert wrong_ca.returncode == 1
    assert "Traceback" not in wrong_ca.stderr and len(wrong_ca.stderr.strip().splitlines()) == 1
    assert "TLS" in wrong_ca.stderr
    before = _requests_seen(running)
    (tmp_path / "wrong.toml").write_text(Policy(
        allow_simulation_insecure=True,
        roles={"gateway": RolePolicy(mrenclave=("00" * 32,))}).to_toml())
    refused = _infer_cli(cache, tmp_path, *common, "--ca", str(running.ca_path), "--policy",
                         "wrong.toml")
    assert refused.returncode == 1 and "not accepted for role 'gateway'" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _requests_seen(running) == before  # refused before the input was sent
    no_attest = _infer_cli(cache, tmp_path, *common, "--ca", str(running.ca_path),
                           "--no-attest")
    assert no_attest.returncode == 0 and "NOT checked" in no_attest.stderr
    plain = _infer_cli(cache, tmp_path, "--url", running.url.replace("https", "http"),
                       "--input", "x.npy", "--ca", str(running.ca_path), "--no-attest")
    assert plain.returncode == 2 and "must be https" in plain.stderr


