"""The ray launcher on a local multi-node Ray cluster (several raylets on this machine, each
with its own `sgx` resource): the stages are booked in a STRICT_SPREAD placement group and land
on distinct nodes, and killing the actor that hosts a stage (as a lost raylet would) restarts
it in its bundle, with its process, and the pipeline serves again."""

from __future__ import annotations

import time

import numpy as np
import pytest

from smlaas.errors import DeployError
from smlaas.profile.session import create_session, run_session
from tests.builds import sealed_chain_build
from tests.integration.serving_setup import cache_env, deployment
from tests.models import chain_model

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.ray
WIDTH = 32


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    nodes = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"sgx": 2}})  # the coordinator and the gateway
    for _ in range(2):
        nodes.add_node(num_cpus=1, resources={"sgx": 1})  # one stage machine each
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_stages_spread_over_nodes_and_survive_their_actor_being_killed(cluster, tmp_path
                                                                     ) -> None:
    from smlaas.deploy.ray_launcher import RayLauncher

    x = np.random.default_rng(3).standard_normal((1, WIDTH)).astype(np.float32)
    want = run_session(create_session(chain_model(width=WIDTH, depth=6), threads=1),
                       {"x": x})[0]
    with cache_env(tmp_path / "cache"):
        build, keys, _ = sealed_chain_build(tmp_path, width=WIDTH, machines=2)
        launcher = RayLauncher(tmp_path / "ray-logs", placement="spread")
        with deployment(tmp_path, build, keys, launcher=launcher) as running:
            assert running.stage_count == 2
            nodes = {launcher.node_of(name) for name in ("stage-0", "stage-1")}
            assert len(nodes) == 2, "STRICT_SPREAD put two stages on one node"
            with running.client() as client:
                np.testing.assert_allclose(client.infer({"x": x})["y"], want, rtol=1e-4,
                                           atol=1e-5)
            before = launcher.node_of("stage-1")
            ray.kill(launcher.actor("stage-1"), no_restart=False)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                try:
                    if launcher.restarts().get("stage-1", 0) >= 1:
                        break
                except Exception:  # the actor is restarting
                    pass
                time.sleep(0.5)
            assert launcher.restarts()["stage-1"] >= 1
            assert launcher.node_of("stage-1") == before  # in its bundle
            running.wait_ready(timeout_s=60)
            with running.client() as client:
                np.testing.assert_allclose(client.infer({"x": x})["y"], want, rtol=1e-4,
                                           atol=1e-5)


def test_a_cluster_too_small_for_one_enclave_per_node_is_refused(cluster, tmp_path) -> None:
    from smlaas.deploy.ray_launcher import RayLauncher

    launcher = RayLauncher(tmp_path / "ray-logs", placement="spread", placement_timeout_s=5)
    with pytest.raises(DeployError, match="cannot place 4 enclave"):
        launcher.prepare([(f"stage-{k}", 1) for k in range(4)])
    launcher.stop()
