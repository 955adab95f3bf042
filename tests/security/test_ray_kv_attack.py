"""The host rewrites what Ray keeps to restart an actor. The ray launcher's actor
(``_ProcessHost``) keeps the command of its process in Ray's key-value store
(``smlaas/{owner}/{name}`` -> name, argv, env) and, restarted by Ray, starts that command
again. The store is the host's, like all of Ray: here the host rewrites stage-0's entry
(measured arguments: another coordinator to trust, another role; host options: a replica the
manifest does not have) and kills the actor, so that Ray restarts it and it runs the rewritten
command. The rewritten process is refused (by the coordinator, or itself refuses the genuine
coordinator: its sim MRENCLAVE follows its measured arguments) with a clear error in its log;
nothing is served through it; the genuine entry brings the stage back."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from smlaas.coordinator.owner import OwnerKey
from smlaas.errors import DeployError, ServingError
from smlaas.profile.session import create_session, run_session
from smlaas.roles import CoordinatorSpec
from tests.builds import sealed_chain_build
from tests.integration.serving_setup import cache_env, deployment
from tests.models import chain_model

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
internal_kv = pytest.importorskip("ray.experimental.internal_kv")
pytestmark = pytest.mark.ray
WIDTH = 32
NODE_IP = "127.0.0.2"  # loopback; Ray would replace 127.0.0.1 by the routable address
STAGE = "stage-0"
RESTART_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    node = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "resources": {"sgx": 4}, "node_ip_address": NODE_IP})
    try:
        ray.init(address=node.address, log_to_driver=False)
        yield node
    finally:
        ray.shutdown()
        node.shutdown()


@pytest.fixture(scope="module")
def deployed(cluster, tmp_path_factory: pytest.TempPathFactory):
    from smlaas.deploy.ray_launcher import RayLauncher

    root = tmp_path_factory.mktemp("ray-kv")
    # A module fixture runs before the per-test cache isolation: use the same cache here.
    with cache_env(tmp_path_factory.getbasetemp() / "smlaas-cache"):
        build, keys, _ = sealed_chain_build(root, width=WIDTH, machines=2)
        launcher = RayLauncher(root / "ray-logs", placement="pack")
        with deployment(root, build, keys, launcher=launcher) as running:
            assert running.stage_count == 2
            yield running, launcher


def _x() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(9).standard_normal((1, WIDTH)).astype(np.float32)
    return x, run_session(create_session(chain_model(width=WIDTH, depth=6), threads=1),
                          {"x": x})[0]


def _entry(launcher: Any) -> dict[str, Any]:
    saved = internal_kv._internal_kv_get(launcher.kv_key(STAGE))
    assert saved is not None, "the actor keeps no command in Ray's key-value store"
    return dict(json.loads(saved))


def _restart_from_store(launcher: Any, entry: dict[str, Any]) -> None:
    """As the host: write ``entry`` as the stage's command, kill its actor, and wait until
    Ray has restarted the actor, which starts the command it finds. (The actor counts its
    restarts in the same entry, host-kept like the rest: the count written here tells the
    restarted actor from the one killed.)"""
    actor = launcher.actor(STAGE)
    count = ray.get(actor.actor_restarts.remote(), timeout=30) + 1
    internal_kv._internal_kv_put(launcher.kv_key(STAGE), json.dumps(
        {**entry, "incarnations": count}), overwrite=True)
    ray.kill(actor, no_restart=False)
    end = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < end:
        try:
            if ray.get(actor.actor_restarts.remote(), timeout=10) == count:
                return
        except Exception:  # the actor is being restarted
            pass
        time.sleep(0.5)
    raise AssertionError(f"Ray did not restart the actor of {STAGE} within "
                         f"{RESTART_TIMEOUT_S:.0f} s")


def _replaced(argv: list[str], flag: str, value: str) -> list[str]:
    changed = list(argv)
    changed[changed.index(flag) + 1] = value
    return changed


def _forged_coordinator(argv: list[str]) -> list[str]:
    """Trust the host's own coordinator (the same code, configured with the host's key)."""
    forged = CoordinatorSpec(backend="sim", owner_public_key=OwnerKey.create().public_key_hex)
    return _replaced(argv, "--coordinator-mrenclave", forged.sim_mrenclave())


ATTACKS: dict[str, tuple[Callable[[list[str]], list[str]], str, str]] = {
    # measured: the stage would obey another coordinator; its own MRENCLAVE changes with it,
    # and it refuses the genuine coordinator, whose measurement is not the one it now trusts
    "another coordinator": (_forged_coordinator, "stage",
                            "not accepted for role 'coordinator'"),
    # measured: a role the owner's manifest does not have
    "another role": (lambda argv: _replaced(argv, "--role", "stage-7"), "coordinator",
                     "refused register request (unknown_role): role 'stage-7' is not in the "
                     "manifest's topology"),
    # a host option: a second replica of stage-0, to get its key released twice
    "a replica the manifest lacks": (lambda argv: [*argv, "--replica", "1"], "coordinator",
                                     "refused register request (no_slot): the owner's manifest "
                                     "has 1 replica(s) of stage-0 (slots 0..0); slot 1 does "
                                     "not exist"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_rewritten_restart_command_is_refused_and_never_serves(deployed, attack: str
                                                                ) -> None:
    running, launcher = deployed
    rewrite, refused_by, refusal = ATTACKS[attack]
    x, want = _x()
    genuine = _entry(launcher)
    assert genuine["argv"][:3] == ["worker", "--role", STAGE]
    stage_log = launcher.log_dir / f"{STAGE}.log"
    coordinator_log = launcher.log_dir / "coordinator.log"
    seen_stage, seen_coordinator = stage_log.stat().st_size, coordinator_log.stat().st_size

    _restart_from_store(launcher, {**genuine, "argv": rewrite(genuine["argv"])})
    log = stage_log if refused_by == "stage" else coordinator_log
    start = seen_stage if refused_by == "stage" else seen_coordinator
    end, text = time.monotonic() + RESTART_TIMEOUT_S, ""
    while time.monotonic() < end and refusal not in text:
        time.sleep(0.5)
        text = log.read_bytes()[start:].decode(errors="replace")
    assert refusal in text, f"{attack}: no refusal in {log.name}:\n{text[-3000:]}"
    if attack == "another coordinator":  # it met the genuine coordinator and refused it
        assert f"MRENCLAVE {running.measurements['coordinator'][:16]}" in text
    stage_text = stage_log.read_bytes()[seen_stage:].decode(errors="replace")
    assert "serving on" not in stage_text, f"{attack}: the rewritten stage served"
    with running.client() as client, pytest.raises(ServingError, match="503|unavailable"):
        client.infer({"x": x})  # the gateway attests fine; stage 0 is not there
    with pytest.raises(DeployError):
        running.wait_ready(timeout_s=3)

    _restart_from_store(launcher, genuine)  # the host puts the genuine command back
    running.wait_ready(timeout_s=RESTART_TIMEOUT_S)
    with running.client() as client:
        np.testing.assert_allclose(client.infer({"x": x})["y"], want, rtol=1e-4, atol=1e-5)
