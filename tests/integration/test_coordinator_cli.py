"""``smlaas coordinator`` as a real process: attest it, get the CA, stop it with Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from smlaas.coordinator.client import CoordinatorClient
from smlaas.coordinator.server import free_port
from smlaas.enclave import INTEL_ROOT, Policy
from smlaas.enclave.backends.sim import SimBackend
from tests.conftest import cli_env


def wait_for_port(port: int, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {deadline_s} s")


def test_coordinator_process_serves_the_deployment_ca(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "smlaas", "coordinator", "--port", str(port), "--state",
         str(tmp_path / "state.sealed")], cwd=tmp_path, env=cli_env(tmp_path / "cache"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port)
        backend = SimBackend("coordinator", pki_dir=tmp_path / "cache" / "sim-pki")
        policy = Policy.from_dict({"allow_simulation_insecure": True, "roles": {
            "coordinator": {"mrenclave": [backend.measurement.mrenclave.hex()]}}})
        client = CoordinatorClient("127.0.0.1", port, policy=policy,
                                   roots=[INTEL_ROOT, backend.trusted_root])
        assert "BEGIN CERTIFICATE" in client.deployment_ca()
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "SIMULATED" in out
