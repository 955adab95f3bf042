"""``smlaas deploy``: bring a sealed build up as an attested pipeline.

The owner's side of the ceremony, in order:

1. check the sealed directory against the owner's keyfile (its plan.json hash, every stage's
   sealed header against the keyfile's plaintext SHA-256; no plaintext stage present);
2. start the coordinator with the owner's public key in its measured configuration, and
   attest it (its MRENCLAVE pinned: computed from the spec for ``sim``, given for
   ``gramine``);
3. build the manifest (each role's accepted measurement, a commitment to each stage key, each
   stage's plaintext SHA-256, the topology, the policy, the collateral source) and compare its
   digest with what the coordinator holds: none -> sign it for this coordinator and set it
   with the stage keys; the same -> nothing to do; another -> refuse, naming both digests
   (unless asked to replace it with a higher signed version);
4. start one worker per stage and the gateway, which register and receive their certificates
   (and keys) only if their quotes pass; wait until the gateway answers ``ready`` through
   every stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from smlaas.coordinator.client import CoordinatorClient, CoordinatorStatus
from smlaas.coordinator.manifest import (
    GATEWAY_ROLE,
    Manifest,
    StageCommitment,
    key_commitment,
    stage_role,
)
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.deploy.launchers import Launcher, ProcessSpec, pin_cpu_sets
from smlaas.deploy.roles import (
    CoordinatorSpec,
    GatewaySpec,
    RoleSpec,
    StageSpec,
    placed_elsewhere,
)
from smlaas.enclave.policy import Policy, RolePolicy
from smlaas.enclave.sealing import OwnerKeys, read_header_of
from smlaas.enclave.verification import INTEL_ROOT, TrustedRoot
from smlaas.errors import AttestationError, ConfigError, DeployError
from smlaas.export.build_dir import PLAN_FILE, read_plan
from smlaas.export.sealed_build import (
    ServingNote,
    plaintext_stages,
    sealed_directory,
    sealed_path,
)
from smlaas.plan.plan import Plan
from smlaas.transport.framing import ProtocolError

if TYPE_CHECKING:
    from smlaas.client import InferenceClient

logger = logging.getLogger(__name__)
GATEWAY_POLICY_FILE = "gateway-policy.toml"


@dataclass(frozen=True)
class DeploySettings:
    build_dir: Path
    """The sealed directory (or a build holding one in ``sealed/``)."""
    keys_path: Path
    state_dir: Path
    owner_key_path: Path = field(default_factory=default_owner_key_path)
    backend: str = "sim"
    host: str = "127.0.0.1"
    port: int = 8443
    grpc_port: int | None = None
    """The gateway's gRPC port (None: no gRPC)."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_batch_size: int | None = None
    """None: what seal recorded (8 if the stages batch correctly, else 0); 0: off."""
    max_queue_delay_us: int = 500
    max_inflight: int | None = None
    """Batches in the pipeline at once; None: the number of stage replicas (one per replica,
    so each is busy; fewer in
    flight means fuller batches: on 2 shared cores, 3 stages served 12.0/s with 3 in flight
    against 10.7/s with 4, ResNet-50, 16 clients)."""
    measurements: dict[str, str] | None = None
    """role -> MRENCLAVE hex (required for gramine: from gramine-sgx-sign)."""
    policy: dict[str, Any] | None = None
    """The manifest policy's base (TCB statuses, evaluation number, collateral age); the
    roles' measurements are filled in by deploy."""
    collateral: dict[str, Any] = field(default_factory=dict)
    """The manifest's collateral source ({} = the coordinator's own)."""
    replace_manifest: bool = False
    """Replace another manifest the coordinator holds with this one (next version)."""
    labels_path: Path | None = None
    """Class labels for the classification extension (its SHA-256 goes in the manifest)."""
    gateway_options: dict[str, Any] = field(default_factory=dict)
    """Further GatewaySpec fields (max_queue, header_timeout_s, body_timeout_s, ...)."""
    ready_timeout_s: float = 120.0
    replicas: dict[int, int] | None = None
    """Stage index -> replicas, over the plan's (None: as the plan says, 1 per stage)."""
    pin: bool = False
    """Give each stage replica its own disjoint set of this machine's cores (and ONNX Runtime
    threads equal to its size): a miniature of one machine per enclave."""


class Deployment:
    """One running deployment; use as a context manager or call start()/stop()."""

    def __init__(self, settings: DeploySettings, launcher: Launcher, *,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.settings, self.launcher, self.progress = settings, launcher, progress
        self.sealed_dir = sealed_directory(settings.build_dir)
        self.plan: Plan = read_plan(self.sealed_dir)
        self.keys = OwnerKeys.load(settings.keys_path)
        self.owner = OwnerKey.load(settings.owner_key_path)
        self.url = ""
        self.grpc_address: str | None = None
        self.ca_path = settings.state_dir / "ca.pem"
        self.gateway_policy_path = settings.state_dir / GATEWAY_POLICY_FILE
        """The policy a client attests the gateway with (its pinned MRENCLAVE)."""
        serving = ServingNote.of(self.plan)
        self.max_batch_size, self.batching_note = _batching(serving, settings.max_batch_size)
        self.ready_s = 0.0
        """Seconds from start() to ready (coordinator, manifest, workers, gateway)."""
        self.trusted_roots: list[TrustedRoot] = [INTEL_ROOT]
        """Roots the owner verifies quotes against (plus the simulation root for sim)."""
        self.measurements: dict[str, str] = {}
        """role -> the MRENCLAVE the manifest accepts (after start)."""
        self.manifest: Manifest | None = None
        self.replicas = stage_replicas(self.plan, settings.replicas)
        """Replicas per stage, in stage order."""
        self._cpus: dict[tuple[int, int] | None, tuple[int, ...]] = {}
        self._pinning = ""

    @property
    def model_name(self) -> str:
        return self.plan.model.name

    @property
    def stage_count(self) -> int:
        return len(self.plan.stages)

    @property
    def simulated(self) -> bool:
        return self.settings.backend == "sim"

    def role_policy(self, role: str) -> Policy:
        """A policy accepting exactly the measurement this deployment pinned for ``role``
        (e.g. for clients attesting the gateway)."""
        base = Policy.from_dict(self.manifest.policy) if self.manifest else Policy()
        return replace(base, roles={role: RolePolicy(mrenclave=(self.measurements[role],))})

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
        self._check_sealed_dir()
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self._trust_simulation_root()
        coordinator = CoordinatorSpec(
            backend=s.backend, owner_public_key=self.owner.public_key_hex,
            listen=self.launcher.reserve(COORDINATOR_ROLE),
            state_path=str((s.state_dir / "coordinator.sealed").resolve()))
        coordinator_mr = self._measurement(coordinator)
        self.launcher.start(ProcessSpec(coordinator.role, coordinator.to_argv()))
        self.progress(f"coordinator starting on {coordinator.listen[0]}:"
                      f"{coordinator.listen[1]} (owner {self.owner.fingerprint})")
        client = self._attest_coordinator(coordinator.listen, coordinator_mr)
        roles = self._role_specs(coordinator, coordinator_mr)
        self.measurements = {spec.role: self._measurement(spec) for spec in roles}
        self.measurements[COORDINATOR_ROLE] = coordinator_mr
        self.manifest = self._set_manifest(client)
        self.ca_path.write_text(client.status().ca_pem)  # the same, pinned instance
        self.gateway_policy_path.write_text(self.role_policy(GATEWAY_ROLE).to_toml())
        for spec in roles:
            self.launcher.start(ProcessSpec(
                spec.process_name if isinstance(spec, StageSpec) else spec.role,
                spec.to_argv(), cpus=self._cpus.get(self._process_key(spec), ())))
        workers = sum(self.replicas)
        self.progress(f"{workers} stage worker(s) for {self.stage_count} stage(s) and the "
                      f"gateway starting" + (f"; pinned: {self._pinning}" if s.pin else ""))
        host = '127.0.0.1' if s.host in ('0.0.0.0', '') else s.host
        self.url = f"https://{host}:{s.port}"
        self.grpc_address = f"{host}:{s.grpc_port}" if s.grpc_port else None
        self.wait_ready(s.ready_timeout_s)
        self._check_gateway()
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

    def set_manifest_at(self, coordinator: tuple[str, int]) -> Manifest:
        """Steps 1 to 3 against a coordinator that another system runs (a Kubernetes
        StatefulSet; `smlaas owner set-manifest`): check the sealed directory, attest the
        coordinator, set this deployment's manifest (or find it already set), and write the
        CA and the gateway policy to the state directory. Starts nothing: the roles register
        on their own once the manifest is set. Returns the manifest the coordinator holds."""
        self._check_sealed_dir()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self._trust_simulation_root()
        coordinator_mr = self._measurement(CoordinatorSpec(
            backend=self.settings.backend, owner_public_key=self.owner.public_key_hex))
        client = self._attest_coordinator(coordinator, coordinator_mr)
        # Placement is not measured, so specs with stand-in addresses give the measurements
        # of the roles wherever the other system runs them.
        self.measurements = {spec.role: self._measurement(spec) for spec in placed_elsewhere(
            backend=self.settings.backend, coordinator_mrenclave=coordinator_mr,
            stage_count=self.stage_count)}
        self.measurements[COORDINATOR_ROLE] = coordinator_mr
        self.manifest = self._set_manifest(client)
        self.ca_path.write_text(client.status().ca_pem)
        self.gateway_policy_path.write_text(self.role_policy(GATEWAY_ROLE).to_toml())
        return self.manifest

    def _trust_simulation_root(self) -> None:
        if self.simulated:  # create the simulation PKI before any process races to
            from smlaas.enclave.backends.sim import SimBackend

            self.trusted_roots = [INTEL_ROOT, SimBackend(COORDINATOR_ROLE).trusted_root]

    def stop(self) -> None:
        self.launcher.stop()

    def client(self, **options: Any) -> InferenceClient:
        """A client that attests this deployment's gateway (its MRENCLAVE and manifest)
        before its first request."""
        from smlaas.client import InferenceClient

        assert self.manifest is not None  # set by start()
        return InferenceClient(self.url, ca=self.ca_path, policy=self.role_policy(GATEWAY_ROLE),
                               roots=self.trusted_roots, manifest_digest=self.manifest.digest(),
                               **options)

    def _check_gateway(self) -> None:
        """The gateway that answers is the one this deployment pinned, admitted under this
        manifest (not a gateway of another coordinator the host routed us to)."""
        assert self.manifest is not None  # set by start()
        with self.client() as client:
            try:
                client.attest(self.role_policy(GATEWAY_ROLE), self.trusted_roots,
                              manifest_digest=self.manifest.digest())
            except AttestationError as err:
                raise DeployError(f"the gateway at {self.url} failed attestation: {err}") \
                    from err
        self.progress(f"gateway attested under {self.manifest.describe()}")

    # -- the steps -----------------------------------------------------------------------
    def _check_sealed_dir(self) -> None:
        plaintext = plaintext_stages(self.sealed_dir) + (
            plaintext_stages(self.settings.build_dir)
            if Path(self.settings.build_dir).resolve() != self.sealed_dir.resolve() else [])
        if plaintext:
            names = ", ".join(p.name for p in plaintext)
            if not self.simulated:
                raise ConfigError(f"{self.sealed_dir} holds plaintext sub-models ({names}); "
                                  f"deploy only the directory `smlaas seal` wrote")
            logger.warning("%s holds plaintext sub-models (%s): with a real backend this is "
                           "refused", self.settings.build_dir, names)
        plan_sha = hashlib.sha256((self.sealed_dir / PLAN_FILE).read_bytes()).hexdigest()
        if self.keys.build_sha256 != plan_sha:
            raise ConfigError(f"keyfile {self.settings.keys_path} belongs to another sealed "
                              f"build (its plan.json differs); seal this build again")
        for stage in self.plan.stages:
            path = sealed_path(self.sealed_dir, stage.index)
            if not path.is_file():
                raise ConfigError(f"stage {stage.index} is not sealed ({path} is missing); "
                                  f"run `smlaas seal` again")
            if stage.index not in self.keys.stage_keys:
                raise ConfigError(f"keyfile has no key for stage {stage.index}")
            if read_header_of(path).sha256 != self.keys.stage_sha256[stage.index]:
                raise ConfigError(f"{path} is not the stage this keyfile sealed (its SHA-256 "
                                  f"differs): the sealed directory was changed")

    def _role_specs(self, coordinator: CoordinatorSpec, coordinator_mr: str) -> list[RoleSpec]:
        s = self.settings
        common: dict[str, Any] = {"backend": s.backend, "coordinator_mrenclave": coordinator_mr,
                                  "coordinator": coordinator.listen}
        self._cpus, self._pinning = self._pin_plan()
        names = [(k, r) for k, count in enumerate(self.replicas) for r in range(count)]
        self.launcher.prepare([(_process_name(k, r), len(self._cpus.get((k, r), ())) or
                                s.threads) for k, r in names])
        addresses = [tuple(self.launcher.reserve(_process_name(k, r)) for r in range(count))
                     for k, count in enumerate(self.replicas)]
        specs: list[RoleSpec] = [
            StageSpec(index=k, replica=r, listen=address,
                      sealed_dir=str(self.sealed_dir.resolve()),
                      next_stages=addresses[k + 1] if k + 1 < self.stage_count else (),
                      threads=len(self._cpus.get((k, r), ())) or s.threads, **common)
            for k, replicas in enumerate(addresses) for r, address in enumerate(replicas)]
        specs.append(GatewaySpec(
            first_stages=addresses[0], listen=(s.host, s.port), model_name=self.model_name,
            max_batch_size=self.max_batch_size, max_queue_delay_us=s.max_queue_delay_us,
            max_inflight=s.max_inflight or sum(self.replicas), grpc_port=s.grpc_port or 0,
            labels_path=str(Path(s.labels_path).resolve()) if s.labels_path else "",
            **common, **s.gateway_options))
        return specs

    @staticmethod
    def _process_key(spec: RoleSpec) -> tuple[int, int] | None:
        return (spec.index, spec.replica) if isinstance(spec, StageSpec) else None

    def _pin_plan(self) -> tuple[dict[tuple[int, int] | None, tuple[int, ...]], str]:
        """(stage, replica) -> its cores when pinning, and a line saying what was done."""
        if not self.settings.pin:
            return {}, ""
        keys = [(k, r) for k, count in enumerate(self.replicas) for r in range(count)]
        sets = pin_cpu_sets(len(keys))
        if sets is None:
            cores = len(os.sched_getaffinity(0))
            logger.warning("--pin: %d stage replicas but %d cores; not pinned", len(keys),
                           cores)
            return {}, f"not pinned ({len(keys)} stage replicas, {cores} cores)"
        cpus: dict[tuple[int, int] | None, tuple[int, ...]] = dict(zip(keys, sets))
        return cpus, ", ".join(f"{stage_role(k)}{'.r' + str(r) if r else ''} on cores "
                               f"{','.join(map(str, cpus[(k, r)]))}" for k, r in keys)

    def _measurement(self, spec: RoleSpec) -> str:
        if self.simulated:
            return spec.sim_mrenclave()
        known = self.settings.measurements or {}
        if spec.role not in known:
            raise ConfigError(f"the {self.settings.backend} backend needs the MRENCLAVE of "
                              f"role {spec.role!r} (--measurements FILE, from "
                              f"gramine-sgx-sign)")
        return known[spec.role].lower()

    def build_manifest(self, *, version: int = 1) -> Manifest:
        """This deployment's manifest (after the measurements are known)."""
        roles = [GATEWAY_ROLE, *(stage_role(k) for k in range(self.stage_count))]
        policy = dict(self.settings.policy or {})
        policy["allow_simulation_insecure"] = self.simulated
        policy["roles"] = {role: {"mrenclave": [self.measurements[role]]} for role in roles}
        return Manifest(
            version=version, policy=policy, topology=tuple(roles),
            stages={k: StageCommitment(key_commitment(k, key), self.keys.stage_sha256[k])
                    for k, key in self.keys.stage_keys.items()},
            max_batch_size=self.max_batch_size, collateral=dict(self.settings.collateral),
            replicas={k: n for k, n in enumerate(self.replicas) if n > 1},
            labels_sha256=hashlib.sha256(Path(self.settings.labels_path).read_bytes()).hexdigest()
            if self.settings.labels_path else "")

    def _set_manifest(self, client: CoordinatorClient) -> Manifest:
        status = client.status()
        if status.owner != self.owner.fingerprint:
            raise DeployError(f"the coordinator obeys owner {status.owner}, not this owner "
                              f"key {self.owner.fingerprint}")
        manifest = self.build_manifest()
        if status.manifest_digest == manifest.digest():
            self.progress(f"coordinator attested; it already holds this deployment's "
                          f"{manifest.describe()}")
            return manifest
        if status.manifest_digest is not None:
            if not self.settings.replace_manifest:
                raise DeployError(_held_another(status, manifest, self.settings.state_dir))
            manifest = self.build_manifest(version=(status.manifest_version or 0) + 1)
        digest = client.set_manifest(manifest, owner=self.owner,
                                     stage_keys=self.keys.stage_keys)
        if digest != manifest.digest():
            raise DeployError(f"the coordinator holds manifest {digest}, not the "
                              f"{manifest.digest()} just set")
        self.progress(f"coordinator attested; {manifest.describe()} signed and set")
        return manifest

    def _attest_coordinator(self, address: tuple[str, int], mrenclave: str,
                            deadline_s: float = 60.0) -> CoordinatorClient:
        from smlaas.serving.enrol import coordinator_policy

        client = CoordinatorClient(*address, roots=self.trusted_roots,
                                   policy=coordinator_policy(mrenclave,
                                                             simulated=self.simulated))
        end = time.monotonic() + deadline_s
        while True:
            try:
                client.deployment_ca()
                return client
            except (OSError, ProtocolError) as err:
                problems = self.launcher.problems()
                if problems or time.monotonic() > end:
                    raise DeployError("the coordinator did not come up: " +
                                      ("\n".join(problems) or str(err))) from err
                time.sleep(0.2)
            except AttestationError as err:
                raise DeployError(f"the coordinator failed attestation: {err}") from err


def _process_name(index: int, replica: int) -> str:
    """The launcher's name for a stage replica (as ``StageSpec.process_name``)."""
    return stage_role(index) + (f".r{replica}" if replica else "")


def stage_replicas(plan: Plan, override: dict[int, int] | None) -> list[int]:
    """Replicas per stage: the plan's (1 where it says nothing), then ``override``."""
    replicas = [int(getattr(stage, "replicas", 1) or 1) for stage in plan.stages]
    for index, count in (override or {}).items():
        if not 0 <= index < len(replicas):
            raise ConfigError(f"--replicas names stage {index}; the plan has stages "
                              f"0..{len(replicas) - 1}")
        if count < 1:
            raise ConfigError(f"stage {index} needs at least 1 replica, not {count}")
        replicas[index] = count
    return replicas


def _batching(note: ServingNote, requested: int | None) -> tuple[int, str]:
    if requested == 0:
        return 0, "dynamic batching off (--max-batch-size 0)"
    if note.max_batch_size == 0 or requested is None:
        return note.max_batch_size, note.batching
    return requested, f"dynamic batching up to {requested} (checked at seal time)"


def _held_another(status: CoordinatorStatus, manifest: Manifest, state_dir: Path) -> str:
    return (f"the coordinator already holds another manifest: {status.manifest_digest} "
            f"(version {status.manifest_version}), not this deployment's {manifest.digest()}; "
            f"refusing to serve under it. Use a new --state-dir, or --replace-manifest to "
            f"replace it with this one signed as version {(status.manifest_version or 0) + 1} "
            f"(state: {state_dir})")


def read_measurements(path: Path) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
        return {str(role): str(value) for role, value in data.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path} is not a JSON object of role -> MRENCLAVE: {err}") from err
