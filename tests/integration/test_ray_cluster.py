"""`smlaas deploy --launcher ray` against a Ray cluster started with the `ray` CLI, as an
operator starts one: a head and a second raylet, each advertising `sgx`, with token
authentication on (Ray 2.60: `RAY_AUTH_MODE=token`, the token in `RAY_AUTH_TOKEN`). A driver
without the token is refused with a message naming what to set; one node per enclave is
refused at once for want of a third node; packed, the pipeline is placed over both raylets,
serves the whole model's answers through `smlaas infer`, and stops on Ctrl-C. Every process
started here is stopped at the end, found by its process group.

Loopback only: the nodes use 127.0.0.2 and 127.0.0.3, since Ray replaces a node address of
127.0.0.1 by the machine's routable address."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from smlaas.coordinator.server import free_port
from smlaas.profile.session import create_session, run_session
from tests.builds import sealed_chain_build
from tests.conftest import cli_env
from tests.integration.test_deploy_cli import read_until
from tests.models import chain_model

ray = pytest.importorskip("ray")
# A two-node cluster started with the `ray` CLI takes about a minute on two cores: opt-in
# (`pytest -m slow`); the Ray launcher is tested by default in process-started clusters
# (test_ray_launcher.py, test_ray_placement.py, tests/security/test_ray_*.py).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
WIDTH = 32
START_TIMEOUT_S = 45.0
DEPLOY_TIMEOUT_S = 90.0
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is 75 MiB; its default 30% of RAM
READY_MARKER = "block forever"  # what `ray start --block` prints once its node runs


def ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        pytest.skip("no `ray` command beside this Python")
    return found


class RayCliCluster:
    """Nodes started with `ray start --block`, each in a process group of its own that
    :meth:`stop` signals, and nothing else (`ray stop` would stop every Ray process of the
    machine, other people's clusters included)."""

    def __init__(self, temp_dir: Path, env: dict[str, str]) -> None:
        self.temp_dir, self.env = temp_dir, env
        self.processes: list[subprocess.Popen[bytes]] = []
        self.address = ""

    def start_head(self, *, sgx: int, cpus: int) -> None:
        port = free_port()
        self._start("head", HEAD_IP, sgx, cpus, [
            "--head", "--port", str(port), "--ray-client-server-port", str(free_port()),
            "--dashboard-port", str(free_port()), "--include-dashboard", "false",
            "--temp-dir", str(self.temp_dir)])
        self.address = f"{HEAD_IP}:{port}"

    def add_node(self, ip: str, *, sgx: int, cpus: int) -> None:
        self._start(f"node-{ip}", ip, sgx, cpus, ["--address", self.address])

    def _start(self, name: str, ip: str, sgx: int, cpus: int, args: list[str]) -> None:
        log = self.temp_dir / f"{name}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [ray_cli(), "start", "--block", *args, "--node-ip-address", ip,
                 "--num-cpus", str(cpus), "--resources", json.dumps({"sgx": sgx}),
                 "--object-store-memory", str(OBJECT_STORE_BYTES),
                 "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True)
        self.processes.append(process)
        gcs_log = self.temp_dir / "session_latest" / "logs" / "gcs_server.out"
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:  # started, and registered with the head
            if process.poll() is not None:
                raise AssertionError(f"`ray start` ({name}) exited:\n{log.read_text()}")
            if READY_MARKER in log.read_text(errors="replace") and gcs_log.is_file() and \
                    f"node_address={ip}" in gcs_log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise AssertionError(f"`ray start` ({name}) not up in {START_TIMEOUT_S:.0f} s:\n"
                             f"{log.read_text()}")

    def stop(self) -> None:
        for process in reversed(self.processes):  # `ray start --block` stops its node
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):  # whatever is left in its group
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def processes_mentioning(*texts: str) -> list[str]:
    """Command lines of this machine's processes that mention any of ``texts``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if any(text in command for text in texts):
            found.append(f"{entry.name}: {command[:200]}")
    return found


@contextlib.contextmanager
def ray_cluster(env: dict[str, str]) -> Iterator[RayCliCluster]:
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="smlaas-ray-", dir="/tmp"))
    cluster = RayCliCluster(temp_dir, env)
    try:
        yield cluster
    finally:
        cluster.stop()
        end = time.monotonic() + 20
        while processes_mentioning(str(temp_dir)) and time.monotonic() < end:
            time.sleep(0.5)
        left = processes_mentioning(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes outlived the cluster: {left}"


def deploy_command(build: Path, keys: Path, owner: Path, state: Path, address: str,
                   port: int) -> list[str]:
    return [sys.executable, "-m", "smlaas", "deploy", str(build), "--keys", str(keys),
            "--owner-key", str(owner), "--launcher", "ray", "--ray-address", address,
            "--placement", "pack", "--port", str(port), "--state-dir", str(state),
            "--threads", "1", "--ready-timeout", "60"]


def test_deploy_infer_and_stop_on_a_ray_cli_cluster_with_token_auth(tmp_path: Path) -> None:
    build, keys, owner = sealed_chain_build(tmp_path / "b", width=WIDTH, machines=2)
    x = np.random.default_rng(5).standard_normal((1, WIDTH)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    want = run_session(create_session(chain_model(width=WIDTH, depth=6), threads=1),
                       {"x": x})[0]
    token = secrets.token_hex(32)
    env = {**cli_env(tmp_path / "cache"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # The control bundle (coordinator and gateway: 2 sgx, 2 CPU) fills one node and the two
    # stages the other, so the deployment fits only over both raylets.
    with ray_cluster(env) as cluster:
        cluster.start_head(sgx=2, cpus=2)
        cluster.add_node(NODE_IP, sgx=2, cpus=2)

        # Without the token the cluster refuses the operator's driver, which says why. (Ray
        # retries a refused driver for 20 s; 2 here.)
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
        refused = subprocess.run(
            deploy_command(build, keys, owner, tmp_path / "refused", cluster.address,
                           free_port()),
            env={**no_token, "RAY_gcs_server_port_wait_time_s": "2"}, capture_output=True,
            text=True, timeout=60)
        assert refused.returncode != 0
        assert f"the Ray cluster at {cluster.address} refused this driver" in refused.stderr, \
            refused.stdout + refused.stderr
        assert "Set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN" in \
            refused.stderr

        # One node per enclave (the default with an address) needs a third raylet: refused
        # at once, naming what is missing, and what it booked is given back.
        spread = deploy_command(build, keys, owner, tmp_path / "spread", cluster.address,
                                free_port())
        spread[spread.index("pack")] = "spread"
        too_few = subprocess.run(spread, env=env, capture_output=True, text=True, timeout=90)
        assert too_few.returncode != 0
        assert "placement 'spread' (STRICT_SPREAD): each bundle needs a node of its own" in \
            too_few.stderr, too_few.stdout + too_few.stderr
        assert "1 more node(s) needed" in too_few.stderr
        assert "Placement 'pack' would fit" in too_few.stderr

        port, state = free_port(), tmp_path / "state"
        deploy = subprocess.Popen(deploy_command(build, keys, owner, state, cluster.address,
                                                 port),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            banner = read_until(deploy, "Ctrl-C to stop", DEPLOY_TIMEOUT_S)
            url = f"https://127.0.0.1:{port}"
            assert f"URL  {url}" in banner
            # The client side: what deploy wrote to its state directory (CA, the gateway's
            # policy, the owner's public key) is all `smlaas infer` needs.
            result = subprocess.run(
                [sys.executable, "-m", "smlaas", "infer", "--url", url, "--ca",
                 str(state / "ca.pem"), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "y.npy")], env=cli_env(tmp_path / "cache"),
                capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-4,
                                       atol=1e-5)
        finally:
            deploy.send_signal(signal.SIGINT)
            out, err = deploy.communicate(timeout=60)
        assert deploy.returncode == 0, out + err
        assert "stopped" in out
        # The deployment's processes are gone (the cluster itself still runs).
        assert not processes_mentioning(str(build), str(state)), "a role outlived deploy"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # The cluster's token is the operator's: nothing the deployment wrote holds it.
    for path in state.rglob("*"):
        if path.is_file():
            assert token not in path.read_text(errors="replace"), path
