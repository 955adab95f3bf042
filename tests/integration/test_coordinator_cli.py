"""``smlaas coordinator`` as a real process: attest it, get the CA, stop it with Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from smlaas.coordinator.client import CoordinatorClient, coordinator_policy
from smlaas.coordinator.server import free_port
from smlaas.enclave import INTEL_ROOT
from tests.conftest import cli_env
from tests.coordinator_setup import Ceremony


def wait_for_port(port: int, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {deadline_s} s")


def start_coordinator(tmp_path: Path, owner_public_key: str, *, state: str = "state.sealed"
                      ) -> tuple[subprocess.Popen[str], int]:
    """A real ``smlaas coordinator`` process on a free port, once it listens."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "smlaas", "coordinator", "--owner-public-key", owner_public_key,
         "--port", str(port), "--state", str(tmp_path / state)], cwd=tmp_path,
        env=cli_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        raise AssertionError(process.communicate(timeout=10)[1]) from None
    return process, port


def test_coordinator_process_serves_the_deployment_ca(tmp_path: Path) -> None:
    ceremony = Ceremony(tmp_path / "cache" / "sim-pki")
    process, port = start_coordinator(tmp_path, ceremony.owner.public_key_hex)
    try:
        client = CoordinatorClient("127.0.0.1", port, policy=coordinator_policy(
            ceremony.coordinator_backend().measurement.mrenclave.hex(), simulated=True),
            roots=[INTEL_ROOT, ceremony.coordinator_backend().trusted_root])
        assert "BEGIN CERTIFICATE" in client.deployment_ca()
        assert client.status().owner == ceremony.owner.fingerprint
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "SIMULATED" in out and ceremony.owner.fingerprint in out
