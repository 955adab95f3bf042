"""Attacks on how many enclaves hold a key and what names a certificate carries (issue 17,
items 3 and 4): the host starts more replicas of a stage than the owner's manifest names, and
asks for gateway host names the owner never named. Against a real deployment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from cryptography import x509

from smlaas.coordinator.client import CoordinatorClient, coordinator_policy
from smlaas.coordinator.server import free_port
from smlaas.coordinator.slots import LEASE_S
from smlaas.deploy.deployment import Deployment, DeploySettings
from smlaas.deploy.launchers import LocalLauncher
from smlaas.enclave.backends.sim import SimBackend
from smlaas.errors import ServingError
from smlaas.roles import GatewaySpec, StageSpec
from tests.integration.serving_setup import cache_env
from tests.security.conftest import assert_port_closed, coordinator_address


@pytest.fixture(scope="module")
def deployed(sealed_build, tmp_path_factory: pytest.TempPathFactory):
    build, keyfile, owner = sealed_build
    state = tmp_path_factory.mktemp("slot-attacks") / "state"
    settings = DeploySettings(build_dir=build, keys_path=keyfile, state_dir=state,
                              owner_key_path=owner, port=free_port(), threads=1,
                              ready_timeout_s=60)
    with cache_env(tmp_path_factory.getbasetemp() / "smlaas-cache"), \
            Deployment(settings, LocalLauncher(state / "logs")) as deployment:
        yield deployment


def _extra_stage(deployment: Deployment, *, index: int, replica: int) -> StageSpec:
    return StageSpec(index=index, replica=replica, backend="sim",
                     coordinator_mrenclave=deployment.measurements["coordinator"],
                     coordinator=coordinator_address(deployment),
                     listen=("127.0.0.1", free_port()), sealed_dir=str(deployment.sealed_dir),
                     next_stages=(("127.0.0.1", 9),))


def _coordinator_log(deployment: Deployment) -> str:
    return (deployment.settings.state_dir / "logs" / "coordinator.log").read_text()


def test_a_replica_beyond_the_manifest_gets_no_key(deployed: Deployment) -> None:
    """The manifest has one replica of stage 1. A genuine stage-1 enclave asking for slot 1
    is refused at once; one asking for the held slot 0 is refused while the holder lives
    (it keeps retrying, for a restart's sake) and never listens."""
    assert deployed.manifest is not None and deployed.manifest.replicas_of(1) == 1
    beyond = _extra_stage(deployed, index=1, replica=1)
    result = subprocess.run([sys.executable, "-m", "smlaas", *beyond.to_argv()],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 1, result.stderr[-1500:]
    assert "1 replica(s) of stage-1" in result.stderr and "slot 1 does not exist" in \
        result.stderr
    assert_port_closed(beyond.listen[1])
    second = _extra_stage(deployed, index=1, replica=0)
    process = subprocess.Popen([sys.executable, "-m", "smlaas", "-v", *second.to_argv()],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ))
    try:
        end = time.monotonic() + 30
        while "refused register request (slot_taken)" not in _coordinator_log(deployed):
            assert time.monotonic() < end, "the second claimant was never refused"
            assert process.poll() is None
            time.sleep(0.3)
        time.sleep(1.0)
        assert_port_closed(second.listen[1])
    finally:
        process.kill()
        process.wait(timeout=10)
    with deployed.client() as client:
        assert client.ready()


def test_a_sigkilled_replica_restarts_takes_its_slot_and_serves(deployed: Deployment,
                                                               sealed_build) -> None:
    """SIGKILL closes the holder's lease connection: its slot is free at once, and the
    launcher's restart registers, gets the key and serves."""
    launcher = deployed.launcher
    assert isinstance(launcher, LocalLauncher)
    before = launcher.restarts()["stage-1"]
    killed = time.monotonic()
    os.kill(launcher.pid("stage-1"), signal.SIGKILL)
    end = killed + 15
    while launcher.restarts()["stage-1"] == before:
        assert time.monotonic() < end, "stage-1 was not restarted"
        time.sleep(0.1)
    from tests.security.test_manifest_attacks import _assert_serves_the_owners_model

    # Serving again sooner than a lease lapses: the slot was free the moment the killed
    # holder's connection closed (the gateway's readiness may lag; its answers do not lie).
    while True:
        try:
            _assert_serves_the_owners_model(deployed, sealed_build[0])
            break
        except ServingError:
            assert time.monotonic() - killed < 30, "stage-1 never served again"
            time.sleep(0.2)
    assert time.monotonic() - killed < LEASE_S


def test_a_host_name_the_owner_did_not_name_is_in_no_certificate(deployed: Deployment) -> None:
    """The host registers a genuine gateway enclave asking for www.bank.example and 10.0.0.1
    besides localhost: the certificate carries exactly what the owner's manifest names."""
    assert deployed.manifest is not None
    assert set(deployed.manifest.gateway_hosts) == {"localhost", "127.0.0.1"}
    spec = GatewaySpec(backend="sim", coordinator_mrenclave=deployed.measurements["coordinator"],
                       coordinator=coordinator_address(deployed), first_stages=(("x", 1),),
                       listen=("127.0.0.1", 1), model_name="m")
    enclave = SimBackend("gateway", config=spec.measured_config())
    client = CoordinatorClient(*coordinator_address(deployed), roots=deployed.trusted_roots,
                               policy=coordinator_policy(deployed.measurements["coordinator"],
                                                         simulated=True))
    registration = client.register(enclave, role="gateway",
                                   hosts=["www.bank.example", "10.0.0.1", "localhost"])
    certificate = x509.load_pem_x509_certificate(registration.certificate_pem.encode())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(str(n.value) for n in names) == ["127.0.0.1", "localhost"]
    assert "www.bank.example" not in registration.certificate_pem
    assert "left out of its certificate" in _coordinator_log(deployed)
