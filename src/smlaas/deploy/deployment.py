"""``smlaas deploy``: bring a sealed build up as an attested pipeline.

The owner's side of the ceremony, in order: start the coordinator; attest it (its measurement
is pinned, computed from this code for ``sim`` or given for ``gramine``); set the manifest
(each role's accepted measurement, the stage keys, the topology); start one worker per stage
and the gateway, which register and receive their certificates (and keys) only if their
quotes pass; wait until the gateway answers ``ready`` through every stage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import onnx

from smlaas.coordinator.client import CoordinatorClient
from smlaas.coordinator.manifest import GATEWAY_ROLE, Manifest, stage_role
from smlaas.deploy.launchers import Launcher, ProcessSpec
from smlaas.enclave.measurement import measure
from smlaas.enclave.sealing import OwnerKeys
from smlaas.enclave.verification import INTEL_ROOT, TrustedRoot
from smlaas.errors import AttestationError, ConfigError, DeployError
from smlaas.export.batching import batching_problem
from smlaas.export.build_dir import PLAN_FILE, read_plan, stage_paths
from smlaas.export.sealed_build import sealed_path
from smlaas.plan.plan import Plan
from smlaas.profile.inputs import random_inputs
from smlaas.serving.enrol import coordinator_policy, role_config, sim_coordinator_mrenclave

logger = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 8
COORDINATOR_ROLE = "coordinator"


@dataclass(frozen=True)
class DeploySettings:
    build_dir: Path
    keys_path: Path
    state_dir: Path
    backend: str = "sim"
    host: str = "127.0.0.1"
    port: int = 8443
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_batch_size: int | None = None
    """None: DEFAULT_MAX_BATCH if the stages batch correctly, else 0 (no batching)."""
    max_queue_delay_us: int = 500
    max_inflight: int | None = None
    """Batches in the pipeline at once; None: the number of stages (one per stage; fewer in
    flight means fuller batches: on 2 shared cores, 3 stages served 12.0/s with 3 in flight
    against 10.7/s with 4, ResNet-50, 16 clients)."""
    measurements: dict[str, str] | None = None
    """role -> MRENCLAVE hex (required for gramine: from gramine-sgx-sign)."""
    ready_timeout_s: float = 120.0


class Deployment:
    """One running deployment; use as a context manager or call start()/stop()."""

    def __init__(self, settings: DeploySettings, launcher: Launcher, *,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.settings, self.launcher, self.progress = settings, launcher, progress
        self.plan: Plan = read_plan(settings.build_dir)
        self.keys = OwnerKeys.load(settings.keys_path)
        self.url = ""
        self.ca_path = settings.state_dir / "ca.pem"
        self.max_batch_size = 0
        self.batching_note = ""
        self.ready_s = 0.0
        """Seconds from start() to ready (coordinator, manifest, workers, gateway)."""
        self.trusted_roots: list[TrustedRoot] = [INTEL_ROOT]
        """Roots the owner verifies quotes against (plus the simulation root for sim)."""

    @property
    def model_name(self) -> str:
        return self.plan.model.name

    @property
    def stage_count(self) -> int:
        return len(self.plan.stages)

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        s = self.settings
        self._check_build()
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.max_batch_size, self.batching_note = self._batching()
        if s.backend == "sim":  # create the simulation PKI before any process races to
            from smlaas.enclave.backends.sim import SimBackend

            self.trusted_roots = [INTEL_ROOT, SimBackend(COORDINATOR_ROLE).trusted_root]
        coordinator_mr = self._measurement(COORDINATOR_ROLE) if s.backend != "sim" else \
            sim_coordinator_mrenclave()
        coordinator = self.launcher.reserve(COORDINATOR_ROLE)
        self.launcher.start(ProcessSpec(COORDINATOR_ROLE, [
            "coordinator", "--host", coordinator[0], "--port", str(coordinator[1]),
            "--state", str(s.state_dir / "coordinator.sealed"), "--backend", s.backend]))
        self.progress(f"coordinator starting on {coordinator[0]}:{coordinator[1]}")
        owner = self._attest_coordinator(coordinator, coordinator_mr)
        digest = owner.set_manifest(self._manifest(coordinator_mr))
        self.ca_path.write_text(owner.deployment_ca())
        self.progress(f"coordinator attested; manifest {digest[:16]} set")
        common = ["--coordinator", _address(coordinator), "--backend", s.backend,
                  "--coordinator-mrenclave", coordinator_mr]
        addresses = [self.launcher.reserve(stage_role(k)) for k in range(self.stage_count)]
        for k, address in enumerate(addresses):
            role = stage_role(k)
            nxt = ["--next", _address(addresses[k + 1])] if k + 1 < self.stage_count else []
            self.launcher.start(ProcessSpec(role, [
                "worker", "--role", role, "--build", str(s.build_dir.resolve()), "--listen",
                _address(address), "--threads", str(s.threads), *nxt, *common]))
        self.progress(f"{self.stage_count} stage worker(s) starting")
        inflight = s.max_inflight or self.stage_count
        self.launcher.start(ProcessSpec(GATEWAY_ROLE, [
            "gateway", "--first-stage", _address(addresses[0]), "--host", s.host,
            "--port", str(s.port), "--model-name", self.model_name,
            "--max-batch-size", str(self.max_batch_size),
            "--max-queue-delay-us", str(s.max_queue_delay_us),
            "--max-inflight", str(inflight), *common]))
        self.url = f"https://{'127.0.0.1' if s.host in ('0.0.0.0', '') else s.host}:{s.port}"
        self.wait_ready(s.ready_timeout_s)
        self.ready_s = time.monotonic() - started
        self.progress(f"ready: {self.url} (CA {self.ca_path})")

    def wait_ready(self, timeout_s: float) -> float:
        """Waits until the gateway is ready through every stage; returns the seconds waited.
        DeployError when a process died for good or the deadline passed."""
        started = time.monotonic()
        context = ssl.create_default_context(cafile=str(self.ca_path))
        last = "no answer yet"
        with httpx.Client(verify=context, timeout=2.0) as client:
            while time.monotonic() - started < timeout_s:
                problems = self.launcher.problems()
                if problems:
                    raise DeployError("the deployment failed:\n" + "\n".join(problems))
                try:
                    response = client.get(f"{self.url}/v2/health/ready")
                    if response.status_code == 200:
                        return time.monotonic() - started
                    last = response.json().get("error", response.text)
                except (httpx.HTTPError, ValueError) as err:
                    last = str(err) or type(err).__name__
                time.sleep(0.2)
        raise DeployError(f"the deployment was not ready within {timeout_s:.0f} s (last "
                          f"answer: {last}); logs are in {self.settings.state_dir / 'logs'}")

    def stop(self) -> None:
        self.launcher.stop()

    def _check_build(self) -> None:
        plan_sha = _sha256(self.settings.build_dir / PLAN_FILE)
        if self.keys.build_sha256 != plan_sha:
            raise ConfigError(f"keyfile {self.settings.keys_path} belongs to another build "
                              f"(its plan.json differs); seal this build again")
        for stage in self.plan.stages:
            if not sealed_path(self.settings.build_dir, stage.index).is_file():
                raise ConfigError(f"stage {stage.index} is not sealed; run `smlaas seal "
                                  f"{self.settings.build_dir} --keys KEYFILE` first")
            if stage.index not in self.keys.stage_keys:
                raise ConfigError(f"keyfile has no key for stage {stage.index}")

    def _batching(self) -> tuple[int, str]:
        requested = self.settings.max_batch_size
        if requested == 0:
            return 0, "dynamic batching off (--max-batch-size 0)"
        paths = stage_paths(self.settings.build_dir, self.plan)
        if not all(p.is_file() for p in paths):
            return 0, "dynamic batching off: plaintext stages are not in the build to check"
        models = [onnx.load(str(p)) for p in paths]
        shapes = {k: tuple(v) for k, v in self.plan.model.input_shapes.items()}
        problem = batching_problem(models, random_inputs(models[0], shapes))
        if problem is not None:
            return 0, f"dynamic batching off: {problem}"
        size = requested or DEFAULT_MAX_BATCH
        return size, f"dynamic batching up to {size} (checked: batch 2 equals 2 requests)"

    def _measurement(self, role: str) -> str:
        if self.settings.backend == "sim":
            coordinator_mr = sim_coordinator_mrenclave()
            return measure(role, role_config(coordinator_mr)).mrenclave.hex()
        known = self.settings.measurements or {}
        if role not in known:
            raise ConfigError(f"the {self.settings.backend} backend needs the MRENCLAVE of "
                              f"role {role!r} (--measurements FILE, from gramine-sgx-sign)")
        return known[role]

    def _manifest(self, coordinator_mr: str) -> Manifest:
        roles = [GATEWAY_ROLE, *(stage_role(k) for k in range(self.stage_count))]
        return Manifest(
            policy={"allow_simulation_insecure": self.settings.backend == "sim",
                    "roles": {role: {"mrenclave": [self._measurement(role)]} for role in roles}},
            stage_keys={k: base64.b64encode(v).decode()
                        for k, v in self.keys.stage_keys.items()},
            topology=roles)

    def _attest_coordinator(self, address: tuple[str, int], mrenclave: str,
                            deadline_s: float = 60.0) -> CoordinatorClient:
        simulated = self.settings.backend == "sim"
        client = CoordinatorClient(*address, roots=self.trusted_roots,
                                   policy=coordinator_policy(mrenclave, simulated=simulated))
        end = time.monotonic() + deadline_s
        while True:
            try:
                client.deployment_ca()
                return client
            except OSError as err:
                problems = self.launcher.problems()
                if problems or time.monotonic() > end:
                    raise DeployError("the coordinator did not come up: " +
                                      ("\n".join(problems) or str(err))) from err
                time.sleep(0.2)
            except AttestationError as err:
                raise DeployError(f"the coordinator failed attestation: {err}") from err


def read_measurements(path: Path) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
        return {str(role): str(value) for role, value in data.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path} is not a JSON object of role -> MRENCLAVE: {err}") from err


def _address(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
