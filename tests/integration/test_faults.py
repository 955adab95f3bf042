"""Faults on a real deployment: a worker killed with SIGKILL under load, and a worker whose
measurement differs from the manifest's."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from smlaas.coordinator.server import free_port
from smlaas.deploy.deployment import Deployment
from smlaas.deploy.launchers import LocalLauncher
from tests.integration.serving_setup import (
    MODEL,
    cache_env,
    deployment,
    random_image,
    sealed_build,
    stage_metrics,
    wait_for_stage_metrics,
    whole_model_outputs,
)

CLIENT_TIMEOUT_S = 40.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("faults")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root)
        launcher = LocalLauncher(root / "logs")
        with deployment(root, build, keys, launcher=launcher) as running:
            yield running, launcher, build, root / "cache"


def infer_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = (f'{{"inputs":[{{"name":"input","datatype":"FP32","shape":{list(x.shape)},'
            f'"parameters":{{"binary_data_size":{x.nbytes}}}}}],'
            f'"parameters":{{"binary_data_output":true}}}}').encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def load(url: str, ca: Path, stop: threading.Event, results: list, errors: list) -> None:
    body, headers = infer_request(random_image(7))
    context = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(verify=context, timeout=CLIENT_TIMEOUT_S) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = client.post(f"{url}/v2/models/{MODEL}/infer", content=body,
                                       headers=headers)
                results.append((response.status_code, time.monotonic() - started,
                                response.text[:200] if response.status_code != 200 else ""))
            except httpx.HTTPError as err:  # a hang or a dropped connection fails the test
                errors.append(repr(err))


@pytest.mark.parametrize("victim", ["stage-1", "stage-0"])
def test_killed_worker_is_restarted_and_no_request_hangs(served, victim: str) -> None:
    running, launcher, _, _ = served
    results: list = []
    errors: list = []
    stop = threading.Event()
    clients = [threading.Thread(target=load, args=(running.url, running.ca_path, stop,
                                                   results, errors)) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(2.0)
    restarts_before = launcher.restarts()[victim]
    os.kill(launcher.pid(victim), signal.SIGKILL)
    killed_at = time.monotonic()
    ready_after = running.wait_ready(timeout_s=10.0) if _wait_restart(
        launcher, victim, restarts_before) else None
    recovered_in = time.monotonic() - killed_at
    time.sleep(2.0)
    stop.set()
    for thread in clients:
        thread.join(timeout=CLIENT_TIMEOUT_S + 5)
    assert ready_after is not None and recovered_in < 10.0, f"ready after {recovered_in:.1f} s"
    assert not errors, errors[:3]
    statuses = Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 503, 504}, [r for r in results if r[0] not in (200, 503)][:3]
    assert statuses[200] > 0
    explained = [text for status, _, text in results if status == 503]
    assert all("unavailable" in text for text in explained), explained[:3]
    assert max(seconds for _, seconds, _ in results) < 30.0
    # After recovery the answers are right again.
    body, headers = infer_request(random_image(3))
    response = httpx.post(f"{running.url}/v2/models/{MODEL}/infer", content=body,
                          headers=headers, timeout=30,
                          verify=ssl.create_default_context(cafile=str(running.ca_path)))
    assert response.status_code == 200
    # The gateway saw the new incarnation (attested again, so its attestation is younger).
    index = victim.removeprefix("stage-")
    restarts = wait_for_stage_metrics(running.url, running.ca_path,
                                      "smlaas_stage_restarts_total",
                                      lambda v: v.get(index, 0) >= 1)
    assert restarts.get(index, 0) >= 1, restarts
    ages = stage_metrics(running.url, running.ca_path, "smlaas_attestation_age_seconds")
    assert ages[victim] < ages["gateway"], ages


def _wait_restart(launcher: LocalLauncher, name: str, before: int) -> bool:
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        if launcher.restarts()[name] > before:
            return True
        time.sleep(0.05)
    return False


IMPOSTOR = """
import sys
from smlaas.roles import StageSpec
import smlaas.serving.worker_process as worker
# Different code: a patched configuration changes the measurement, as a changed binary would.
StageSpec.measured_config = lambda self: {"argv": self.measured_argv(), "patched": True}
worker.run_worker(StageSpec(index=1, backend="sim", coordinator_mrenclave=sys.argv[4],
                            coordinator=("127.0.0.1", int(sys.argv[1])),
                            listen=("127.0.0.1", int(sys.argv[3])), sealed_dir=sys.argv[2]))
"""


def test_worker_with_another_measurement_gets_no_key_and_no_traffic(served) -> None:
    running, launcher, build, cache = served
    coordinator_log = launcher.log_dir / "coordinator.log"
    coordinator_port = _coordinator_port(running)
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-c", IMPOSTOR, str(coordinator_port), str(running.sealed_dir),
         str(port), running.measurements["coordinator"]], capture_output=True, text=True,
        timeout=60,
        env={**os.environ, "SMLAAS_CACHE_DIR": str(cache)})
    assert result.returncode != 0
    assert "not accepted for role 'stage-1'" in result.stderr, result.stderr[-2000:]
    assert "refused register request (not_accepted)" in coordinator_log.read_text()
    with pytest.raises(OSError):  # it never listened: no traffic can reach it
        __import__("socket").create_connection(("127.0.0.1", port), timeout=1).close()
    x = random_image(5)
    with httpx.Client(verify=ssl.create_default_context(cafile=str(running.ca_path)),
                      timeout=30) as client:
        body, headers = infer_request(x)
        response = client.post(f"{running.url}/v2/models/{MODEL}/infer", content=body,
                               headers=headers)
    assert response.status_code == 200
    length = int(response.headers["Inference-Header-Content-Length"])
    got = np.frombuffer(response.content[length:], np.float32).reshape(1, 1000)
    np.testing.assert_allclose(got, whole_model_outputs(x), rtol=1e-4, atol=1e-5)


def _coordinator_port(running: Deployment) -> int:
    argv = running.launcher._processes["coordinator"].spec.argv  # type: ignore[attr-defined]
    return int(argv[argv.index("--port") + 1])


_ = cache_env
