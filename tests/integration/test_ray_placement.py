"""The ray launcher on a local multi-node Ray cluster (several raylets on this machine, each
with its own loopback address and `sgx` resource): the coordinator and the gateway share one
bundle and every stage has a node of its own (STRICT_SPREAD); killing the actor that hosts a
stage (as a lost raylet would) restarts it in its bundle, with its process, and the pipeline
serves again; a cluster that cannot hold the deployment is refused at once, naming what is
missing. The check behind that refusal is pure and tested here without a cluster too."""

from __future__ import annotations

import time

import numpy as np
import pytest

from smlaas.deploy.ray_placement import Bundle, NodeCapacity, placement_problem
from smlaas.errors import DeployError
from smlaas.profile.session import create_session, run_session
from tests.builds import sealed_chain_build
from tests.integration.serving_setup import cache_env, deployment
from tests.models import chain_model

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.ray
WIDTH = 32
HEAD_IP = "127.0.0.2"
"""Loopback, but not 127.0.0.1, which Ray replaces by the machine's routable address."""
CONTROL = Bundle("coordinator+gateway", 2, 2)


def stages(count: int, cpus: int = 1) -> list[Bundle]:
    return [Bundle(f"stage-{k}", 1, cpus) for k in range(count)]


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    nodes = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"sgx": 2},  # the coordinator and the gateway
        "node_ip_address": HEAD_IP})
    try:
        for k in range(2):  # one stage machine each
            nodes.add_node(num_cpus=1, resources={"sgx": 1}, node_ip_address=f"127.0.0.{3 + k}")
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, log_to_driver=False)
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
            control = launcher.node_of("coordinator")
            assert launcher.node_of("gateway") == control and control not in nodes
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


def test_prepare_books_the_coordinator_and_gateway_in_the_stages_group(cluster, tmp_path
                                                                      ) -> None:
    from ray.util.placement_group import placement_group_table

    from smlaas.deploy.ray_launcher import RayLauncher

    launcher = RayLauncher(tmp_path / "ray-logs", placement="spread")
    try:
        launcher.prepare([("stage-0", 1), ("stage-1", 1)])  # before any reserve
        (group,) = launcher._groups
        table = placement_group_table(group)
        assert table["strategy"] == "STRICT_SPREAD"
        assert sorted(b["sgx"] for b in table["bundles"].values()) == [1, 1, 2]
        assert len(set(table["bundles_to_node_id"].values())) == 3
        for name in ("coordinator", "gateway", "stage-0"):
            launcher.reserve(name)
        assert launcher.node_of("coordinator") == launcher.node_of("gateway") != \
            launcher.node_of("stage-0")
        assert len(launcher._groups) == 1  # nothing booked outside the group
    finally:
        launcher.stop()


def test_a_cluster_too_small_is_refused_at_once_naming_what_is_missing(cluster, tmp_path
                                                                      ) -> None:
    from smlaas.deploy.ray_launcher import RayLauncher

    launcher = RayLauncher(tmp_path / "ray-logs", placement="spread", placement_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(DeployError, match=r"5 nodes in all.* for 3 of them: 2 more node"):
        launcher.prepare([(f"stage-{k}", 1) for k in range(4)])
    packed = RayLauncher(tmp_path / "ray-logs", placement="pack", placement_timeout_s=30)
    with pytest.raises(DeployError, match=r"it needs 6 CPU more \(10 needed in all, 4 in "
                                          r"the cluster\)") as refused:
        packed.prepare([("stage-0", 8)])
    assert "Placement 'pack' would fit" not in str(refused.value)
    assert time.monotonic() - started < 10, "refused only after waiting for Ray"
    assert not launcher._groups and not packed._groups
    launcher.stop()
    packed.stop()


# -- the check itself, without a cluster ------------------------------------------------------
def test_spread_counts_nodes_and_says_when_pack_would_fit() -> None:
    nodes = [NodeCapacity("head", 2, 2), NodeCapacity("a", 1, 1), NodeCapacity("b", 1, 1)]
    assert placement_problem([CONTROL, *stages(2)], nodes, placement="spread") is None
    problem = placement_problem([CONTROL, *stages(3)], nodes, placement="spread")
    assert problem is not None
    assert "4 nodes in all" in problem and "1 more node(s) needed" in problem
    assert "head: 2 sgx, 2 CPU; a: 1 sgx, 1 CPU; b: 1 sgx, 1 CPU" in problem
    assert "Placement 'pack' would fit" not in problem  # 5 sgx asked, 4 in the cluster
    big = [NodeCapacity("one", 8, 8)]
    problem = placement_problem([CONTROL, *stages(2)], big, placement="spread")
    assert problem is not None and "Placement 'pack' would fit" in problem
    # A node too small for any bundle is no node for spread.
    assert placement_problem([CONTROL, *stages(2, cpus=2)], nodes, placement="spread") \
        is not None


def test_pack_names_the_missing_resource() -> None:
    """The 2-CPU node of issue 17: pack is refused for CPUs, not told to use pack."""
    node = [NodeCapacity("node", 64, 2)]
    problem = placement_problem([CONTROL, *stages(2)], node, placement="pack")
    assert problem is not None
    assert "it needs 2 CPU more (4 needed in all, 2 in the cluster)" in problem
    assert "sgx more" not in problem
    problem = placement_problem([CONTROL, *stages(3)], [NodeCapacity("n", 4, 16)],
                                placement="pack")
    assert problem is not None and "it needs 1 sgx more (5 needed in all, 4 in" in problem
    assert placement_problem([CONTROL, *stages(2)], [NodeCapacity("n", 4, 4)],
                             placement="pack") is None


def test_pack_checks_node_sizes_not_only_totals() -> None:
    nodes = [NodeCapacity("a", 4, 3), NodeCapacity("b", 4, 3)]
    problem = placement_problem([CONTROL, *stages(1, cpus=4)], nodes, placement="pack")
    assert problem is not None and "no node can hold the bundle stage-0 (1 sgx, 4 CPU)" in problem
    problem = placement_problem(stages(3, cpus=2), nodes, placement="pack")  # 6 of 6 CPUs
    assert problem is not None and "nodes' sizes do not fit" in problem
    assert placement_problem(stages(2, cpus=2) + stages(2), nodes, placement="pack") is None


def test_auth_refusal_says_what_to_set(tmp_path) -> None:
    from smlaas.deploy.ray_auth import auth_refusal_message, token_source

    unset = auth_refusal_message("127.0.0.2:6379", auth_mode=None, token=None)
    assert "RAY_AUTH_MODE is not set here" in unset and "Set RAY_AUTH_MODE=token" in unset
    assert "RAY_AUTH_TOKEN" in unset and "ray get-auth-token" in unset
    missing = auth_refusal_message("h:1", auth_mode="token", token=None)
    assert "no token was found" in missing
    wrong = auth_refusal_message("h:1", auth_mode="token", token="RAY_AUTH_TOKEN")
    assert "the token from RAY_AUTH_TOKEN is not this cluster's" in wrong
    assert token_source({}, home=tmp_path) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x")
    assert token_source({}, home=tmp_path) == str(tmp_path / ".ray" / "auth_token")
    assert token_source({"RAY_AUTH_TOKEN": "t"}, home=tmp_path) == "RAY_AUTH_TOKEN"
