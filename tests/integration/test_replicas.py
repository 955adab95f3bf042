"""Replicated stages on a real deployment: requests spread over the replicas, and SIGKILLing
one replica under load loses no request (its unanswered requests go to the other replica);
the launcher restarts it, it is attested again and serves again."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from smlaas.client import InferenceClient
from smlaas.deploy.launchers import LocalLauncher
from smlaas.deploy.topology import pin_cpu_sets
from smlaas.errors import SmlaasError
from smlaas.profile.session import create_session, run_session
from tests.builds import sealed_chain_build
from tests.integration.serving_setup import cache_env, deployment
from tests.models import chain_model

WIDTH = 64
LOAD_CLIENTS = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("replicas")
    with cache_env(root / "cache"):
        build, keys, _ = sealed_chain_build(root, width=WIDTH, machines=2)
        launcher = LocalLauncher(root / "logs")
        with deployment(root, build, keys, launcher=launcher, replicas={1: 2}) as running:
            assert running.replicas == [1, 2]
            yield running, launcher


def expected(x: np.ndarray) -> np.ndarray:
    session = create_session(chain_model(width=WIDTH, depth=6), threads=1)
    return run_session(session, {"x": x})[0]


def _by_replica(running, name: str) -> dict[tuple[str, str], float]:
    import ssl

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{running.url}/metrics", timeout=10,
                     verify=ssl.create_default_context(cafile=str(running.ca_path))).text
    return {(s.labels["stage"], s.labels["replica"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name}


def test_a_killed_replica_loses_no_request_and_rejoins(served) -> None:
    running, launcher = served
    x = np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)
    want = expected(x)
    outcomes: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with running.client(timeout_s=30.0) as client:
            while not stop.is_set():
                try:
                    got = client.infer({"x": x})["y"]
                    outcomes.append("ok" if np.allclose(got, want, rtol=1e-4, atol=1e-5)
                                    else "wrong")
                except SmlaasError as err:
                    outcomes.append(f"error: {err}")

    threads = [threading.Thread(target=load) for _ in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    victim = "stage-1.r1"
    restarts = launcher.restarts()[victim]
    os.kill(launcher.pid(victim), signal.SIGKILL)
    killed_at = time.monotonic()
    while launcher.restarts()[victim] == restarts and time.monotonic() - killed_at < 10:
        time.sleep(0.05)
    time.sleep(6.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=40)
    counts = Counter(o if o in ("ok", "wrong") else "error" for o in outcomes)
    assert counts["ok"] > 50 and counts["wrong"] == 0 and counts["error"] == 0, \
        ([o for o in outcomes if o.startswith("error")][:3], counts)
    assert launcher.restarts()[victim] == restarts + 1
    # The restarted replica was attested again and takes requests again.
    served_by = _by_replica(running, "smlaas_stage_requests_total")
    with running.client() as client:
        for _ in range(20):
            client.infer({"x": x})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = _by_replica(running, "smlaas_stage_requests_total")
        if now.get(("1", "1"), 0) > 0 and now.get(("1", "1"), 0) != served_by.get(("1", "1")) \
                and now.get(("1", "0"), 0) > 0:
            break
        with running.client() as client:
            client.infer({"x": x})
        time.sleep(0.5)
    assert now.get(("1", "1"), 0) > 0, now
    assert now.get(("1", "0"), 0) > 0, now


def test_both_replicas_take_requests(served) -> None:
    running, _ = served
    x = np.ones((1, WIDTH), np.float32)
    with InferenceClient(running.url, ca=running.ca_path, attest=False) as client:
        for _ in range(40):
            client.infer({"x": x})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        counts = _by_replica(running, "smlaas_stage_requests_total")
        if counts.get(("1", "0"), 0) > 0 and counts.get(("1", "1"), 0) > 0:
            break
        time.sleep(0.5)
    assert counts.get(("1", "0"), 0) > 0 and counts.get(("1", "1"), 0) > 0, counts


def test_pinned_sets_are_disjoint_and_equal() -> None:
    assert pin_cpu_sets(2, available=(0, 1)) == [(0,), (1,)]
    assert pin_cpu_sets(2, available=(0, 1, 2, 3, 4)) == [(0, 1), (2, 3)]
    assert pin_cpu_sets(3, available=(0, 1)) is None


def test_receipts_through_a_replicated_stage_verify(served) -> None:
    """Receipts over real mutual-TLS hops with stage 1 replicated: a stage's receipt that
    follows its batch reaches whichever replica ran it, and every chain verifies offline
    (after the kill above, the restarted replica's new key included)."""
    from smlaas.coordinator.owner import parse_public_key
    from smlaas.receipts.cose import unverified
    from smlaas.receipts.evidence import EvidenceBundle
    from smlaas.receipts.verify import verify_receipt

    running, _ = served
    results: list[object] = []

    def client_thread(seed: int) -> None:
        x = np.random.default_rng(seed).standard_normal((1, WIDTH)).astype(np.float32)
        with running.client(receipts=True) as client:
            for _ in range(6):
                results.append(client.infer({"x": x}))

    threads = [threading.Thread(target=client_thread, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 36
    with running.client(receipts=True) as client:
        evidence = EvidenceBundle.decode(client.evidence())
    owner = parse_public_key(Path(running.owner_public_key_path).read_text().strip())
    replicas = set()
    for result in results:
        receipt = result.receipt  # type: ignore[attr-defined]
        verdict = verify_receipt(receipt.cose, evidence, owner_public_key=owner,
                                 request=receipt.request, response=receipt.response,
                                 allow_simulation=True)
        assert verdict.stages == 2
        stage_1 = unverified(unverified(receipt.cose)[1]["stages"][1]["receipt"])[1]
        replicas.add(stage_1["replica"])
    assert replicas == {0, 1}
