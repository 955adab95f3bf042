"""The ray launcher on a local Ray cluster: actors on `sgx` nodes start the same processes,
the pipeline serves correct answers, and a killed worker is restarted by its actor."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from tests.integration.serving_setup import (
    cache_env,
    deployment,
    random_image,
    sealed_build,
    whole_model_outputs,
)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture
def loopback_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """The local cluster RayLauncher starts, on 127.0.0.1 only and without a token file.

    Ray advertises a local cluster on the machine's routable address unless it believes
    multi-node clusters are off (as on macOS), and the ``ray.init()`` of Ray 2.60 turns
    token authentication on and writes ``~/.ray/auth_token``, which then turns it on for every
    later ``ray start --head`` of this user. Neither belongs in a test."""
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


def test_ray_launcher_serves_and_restarts(tmp_path, loopback_ray) -> None:
    from smlaas.deploy.ray_launcher import RayLauncher

    with cache_env(tmp_path / "cache"):
        build, keys = sealed_build(tmp_path)
        launcher = RayLauncher(tmp_path / "ray-logs")
        try:
            assert ray.cluster_resources().get("sgx", 0) >= 1
            assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
            with deployment(tmp_path, build, keys, launcher=launcher) as running:
                x = random_image(11)
                with running.client() as client:
                    got = client.infer({"input": x})["fc"]
                np.testing.assert_allclose(got, whole_model_outputs(x), rtol=1e-4, atol=1e-5)
                assert all(launcher.node_of(name) for name in ("stage-0", "gateway"))
                os.kill(launcher.pid("stage-1"), signal.SIGKILL)
                end = time.monotonic() + 10
                while launcher.restarts()["stage-1"] == 0 and time.monotonic() < end:
                    time.sleep(0.1)
                assert launcher.restarts()["stage-1"] == 1
                running.wait_ready(timeout_s=10)
        finally:
            if ray.is_initialized():
                ray.shutdown()
