"""`smlaas demo`, `deploy` and `infer` as a user runs them: real processes, Ctrl-C, files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from smlaas.coordinator.server import free_port
from tests.conftest import cli_env
from tests.integration.serving_setup import random_image, whole_model_outputs
from tests.integration.test_cli import smlaas

DEPLOY_TIMEOUT_S = 120


def test_demo_serves_and_matches_the_whole_model(tmp_path: Path) -> None:
    result = smlaas("demo", "--model", "resnet18", "--machines", "3", "--requests", "2",
                    "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the pipeline's output equals the whole model's output" in result.stdout
    assert "SIMULATED" in result.stdout and "stopped the deployment" in result.stdout


def test_deploy_infer_and_ctrl_c(tmp_path: Path) -> None:
    smlaas("partition", "--model", "resnet18", "--build-dir", "B", "--planner",
           "dp-throughput", "--machines", "3", "--runs", "1", "--no-verify", cwd=tmp_path,
           check=True)
    smlaas("seal", "B", "--keys", "keys.json", cwd=tmp_path, check=True)
    smlaas("owner", "init", "--key", "owner.key", cwd=tmp_path, check=True)
    port = free_port()
    deploy = subprocess.Popen(
        [sys.executable, "-m", "smlaas", "deploy", "B/sealed", "--keys", "keys.json",
         "--owner-key", "owner.key", "--port", str(port), "--state-dir", "state",
         "--threads", "1"], cwd=tmp_path,
        env=cli_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        banner = read_until(deploy, "Ctrl-C to stop")
        assert f"https://127.0.0.1:{port}" in banner and "state/ca.pem" in banner
        x = random_image(4)
        np.save(tmp_path / "x.npy", x)
        result = smlaas("infer", "--url", f"https://127.0.0.1:{port}", "--ca", "state/ca.pem",
                        "--input", "x.npy", "--output", "y.npy", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), whole_model_outputs(x),
                                   rtol=1e-4, atol=1e-5)
        bad = smlaas("infer", "--url", f"https://127.0.0.1:{port}", "--ca", "state/ca.pem",
                     "--input", "x.npy", "--json", "--model", "nope", cwd=tmp_path)
        assert bad.returncode != 0 and "unknown model 'nope'" in bad.stderr
    finally:
        deploy.send_signal(signal.SIGINT)
        out, err = deploy.communicate(timeout=60)
    assert deploy.returncode == 0, err
    assert "stopped" in out
    # Every process of the deployment is gone: nothing answers on the gateway's port.
    assert subprocess.run(["curl", "-sk", f"https://127.0.0.1:{port}/v2/health/live"],
                          capture_output=True).returncode != 0


def test_deploy_refuses_keys_of_another_build(tmp_path: Path) -> None:
    from tests.builds import chain_build

    chain_build(tmp_path / "chain").rename(tmp_path / "B")  # any plaintext build
    smlaas("seal", "B", "--keys", "keys.json", cwd=tmp_path, check=True)
    smlaas("owner", "init", "--key", "owner.key", cwd=tmp_path, check=True)
    plan = tmp_path / "B" / "sealed" / "plan.json"
    plan.write_text(plan.read_text().replace('"planner"', '"planner" ', 1))
    result = smlaas("deploy", "B", "--keys", "keys.json", "--owner-key", "owner.key",
                    cwd=tmp_path)
    assert result.returncode == 2 and "belongs to another sealed build" in result.stderr
    no_owner = smlaas("deploy", "B", "--keys", "keys.json", "--owner-key", "none.key",
                      cwd=tmp_path)
    assert no_owner.returncode == 2 and "smlaas owner init" in no_owner.stderr
    (tmp_path / "m.json").write_text('{"coordinator": "' + "ab" * 32 + '"}')
    written = smlaas("deploy", "B", "--owner-key", "owner.key", "--k8s-out", "k8s",
                     "--backend", "gramine", "--measurements", "m.json", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "k8s" / "stage-0.yaml").is_file()


def test_deploy_on_a_port_in_use_fails_at_once_in_one_line(tmp_path: Path) -> None:
    import socket

    from tests.builds import sealed_chain_build

    build, keys, owner = sealed_chain_build(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = smlaas("deploy", str(build), "--keys", str(keys), "--owner-key", str(owner),
                        "--port", str(port), cwd=tmp_path)
        took = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines
    assert "--port" in lines[0] and took < 15


def test_an_unusable_process_is_not_restarted(tmp_path: Path) -> None:
    """Exit code 2 (unusable input) would only repeat: the launcher gives up at once."""
    from smlaas.deploy.launchers import LocalLauncher, ProcessSpec

    launcher = LocalLauncher(tmp_path / "logs")
    try:
        launcher.start(ProcessSpec("bad", ["worker", "--role", "stage-0"]))  # options missing
        end = time.monotonic() + 30
        while not launcher.problems():
            assert time.monotonic() < end
            time.sleep(0.1)
        assert launcher.restarts() == {"bad": 0}
        assert "code 2" in launcher.problems()[0] and "not restarted" in launcher.problems()[0]
    finally:
        launcher.stop()


def read_until(process: subprocess.Popen[str], marker: str, timeout_s: float = DEPLOY_TIMEOUT_S
               ) -> str:
    """What ``process`` printed up to the line holding ``marker`` (AssertionError if it
    exits first or ``timeout_s`` passes)."""
    assert process.stdout is not None
    seen, end = [], time.monotonic() + timeout_s
    while time.monotonic() < end:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"deploy exited early:\n{''.join(seen)}\n"
                                 f"{process.stderr.read() if process.stderr else ''}")
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} within {timeout_s:.0f} s:\n{''.join(seen)}")


def test_demo_on_a_decoder_generates_the_whole_models_tokens(tmp_path: Path) -> None:
    result = smlaas("demo", "--model", "gpt2_small4_kv", "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens equal greedy decoding of the whole model with its KV cache" in result.stdout
    assert "time to first token" in result.stdout and "SIMULATED" in result.stdout
