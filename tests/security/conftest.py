"""The security tier: each test drives one attack against real processes on 127.0.0.1 (a
coordinator, workers, a deployment) and asserts it is refused with a clear error and that
nothing leaked. The attacker is the host: it runs the launchers, reads and writes the disks,
and relays the network; it does not hold the owner's keys."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smlaas.coordinator.client import CoordinatorClient
from smlaas.enclave.backends.sim import default_pki_dir
from tests.builds import sealed_chain_build
from tests.coordinator_setup import Ceremony
from tests.integration.test_coordinator_cli import wait_for_port


@pytest.fixture
def ceremony() -> Ceremony:
    """The owner (its key), and sim enclaves on the PKI the child processes use."""
    return Ceremony(default_pki_dir())


class CoordinatorProcess:
    """``smlaas coordinator`` as a real process."""

    def __init__(self, ceremony: Ceremony, state: Path, *, owner_public_key: str | None = None
                 ) -> None:
        from smlaas.coordinator.server import free_port

        self.port = free_port()
        self.log = state.with_suffix(".log")
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smlaas", "-v", "coordinator", "--owner-public-key",
             owner_public_key or ceremony.owner.public_key_hex, "--port", str(self.port),
             "--state", str(state)], stdout=self._log_file, stderr=subprocess.STDOUT,
            env=dict(os.environ))
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise AssertionError(self.log.read_text()) from None
        self.ceremony = ceremony

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def client(self) -> CoordinatorClient:
        return CoordinatorClient(*self.address, policy=self._policy(), roots=self._roots())

    def _policy(self):  # the genuine coordinator of this owner, as the owner pins it
        from smlaas.coordinator.client import coordinator_policy

        return coordinator_policy(
            self.ceremony.coordinator_backend().measurement.mrenclave.hex(), simulated=True)

    def _roots(self):
        from smlaas.enclave import INTEL_ROOT

        return [INTEL_ROOT, self.ceremony.coordinator_backend().trusted_root]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


@contextlib.contextmanager
def coordinator_process(ceremony: Ceremony, state: Path, **kwargs: str
                        ) -> Iterator[CoordinatorProcess]:
    running = CoordinatorProcess(ceremony, state, **kwargs)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def sealed_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(build, owner keyfile, owner signing key) of a small sealed 3-stage chain model."""
    return sealed_chain_build(tmp_path_factory.mktemp("security-build"))


def deploy_settings(sealed_build: tuple[Path, Path, Path], state_dir: Path,
                    **overrides: Any) -> Any:
    """DeploySettings for the sealed chain build: one thread, a free port, a 60 s deadline."""
    from smlaas.coordinator.server import free_port
    from smlaas.deploy.settings import DeploySettings

    build, keyfile, owner = sealed_build
    values: dict[str, Any] = {"build_dir": build, "keys_path": keyfile, "state_dir": state_dir,
                              "owner_key_path": owner, "port": free_port(), "threads": 1,
                              "ready_timeout_s": 60, **overrides}
    return DeploySettings(**values)


def coordinator_address(deployment: object) -> tuple[str, int]:
    """Where a local deployment's coordinator listens (from its launcher's command line)."""
    argv = deployment.launcher._processes["coordinator"].spec.argv  # type: ignore[attr-defined]
    return "127.0.0.1", int(argv[argv.index("--port") + 1])


@contextlib.contextmanager
def vacated(deployment: Any, name: str) -> Iterator[None]:
    """The host stops the genuine process ``name``, so that its replica slot is free for the
    host's own copy of that stage (while the genuine one lives, a copy is refused
    ``slot_taken`` and never gets the key); the genuine one is started again after."""
    from smlaas.deploy.launchers import LocalLauncher
    from smlaas.serving.data_plane import READY_CACHE_S

    launcher = deployment.launcher
    assert isinstance(launcher, LocalLauncher)
    spec = launcher.stop_process(name)
    try:
        yield
    finally:
        launcher.start(spec)
        # the gateway remembers a good probe for READY_CACHE_S: one made before the stop
        # must not pass for the restarted process
        time.sleep(READY_CACHE_S + 0.2)
        deployment.wait_ready(timeout_s=60)


def assert_port_closed(port: int) -> None:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return
    raise AssertionError(f"something listens on {port}: the refused process served")
