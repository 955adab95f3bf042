"""``smlaas deploy``: bring a sealed build up as an attested pipeline on one machine.

A deployment has two planes (docs/SECURITY.md), and on one machine they are two processes:

- the **owner plane** (:class:`~smlaas.deploy.owner_plane.OwnerPlane`, in this process): reads
  the owner's files once, attests the coordinator, signs and sets the manifest with the stage
  keys and the owner's release, and attests the gateway;
- the **operator plane** (the ``launcher``): starts the coordinator, the stage workers and the
  gateway from the sealed directory's public parts and restarts them. ``smlaas deploy`` and
  the demo run it in a child process with a minimal environment and no keys
  (:class:`~smlaas.deploy.operator.OperatorProcess`), so that whatever the host's engines (Ray)
  can run in it finds nothing secret; the owner's process talks to it with plain JSON lines
  and never imports Ray. Tests may hand an in-process launcher instead.

In order: check the sealed directory against the keyfile; start the coordinator and attest
it; have the operator plan every role (addresses, replicas); set the manifest (or find it
set) and the release; start the roles, which register on their own; wait until the gateway
answers ``ready`` through every stage and attest it as a client would.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.deploy.launchers import Launcher, ProcessSpec
from smlaas.deploy.owner_plane import (
    GATEWAY_POLICY_FILE,
    OwnerPlane,
    read_measurements,
)
from smlaas.deploy.settings import DeploySettings
from smlaas.deploy.topology import (
    ServingLayout,
    pin_plan,
    prepare_stages,
    reserve_beside,
    role_specs,
    shared_machine_threads,
    stage_replicas,
)
from smlaas.enclave.policy import Policy
from smlaas.errors import AttestationError, DeployError
from smlaas.roles import StageSpec

if TYPE_CHECKING:
    from smlaas.client import InferenceClient

__all__ = ["GATEWAY_POLICY_FILE", "Deployment", "DeploySettings", "read_measurements",
           "stage_replicas"]


class Deployment:
    """One running deployment; use as a context manager or call start()/stop()."""

    def __init__(self, settings: DeploySettings, launcher: Launcher, *,
                 progress: Callable[[str], None] = lambda _: None,
                 owner_plane: OwnerPlane | None = None) -> None:
        self.settings, self.launcher, self.progress = settings, launcher, progress
        self.owner_plane = owner_plane or OwnerPlane(settings, progress=progress)
        self.url = ""
        self.grpc_address: str | None = None
        self.ready_s = 0.0
        """Seconds from start() to ready (coordinator, manifest, workers, gateway)."""
        self._pinning = ""

    @classmethod
    def on_this_machine(cls, settings: DeploySettings, *, launcher: str = "local",
                        ray_address: str | None = None, placement: str | None = None,
                        progress: Callable[[str], None] = lambda _: None) -> Deployment:
        """The owner plane in this process (the owner's files read first: bad input starts
        nothing) and the operator plane in a keyless child process running ``launcher``."""
        from smlaas.deploy.operator import OperatorProcess

        owner = OwnerPlane(settings, progress=progress)
        operator = OperatorProcess(launcher, settings.state_dir / "logs", host=settings.host,
                                   ray_address=ray_address, placement=placement)
        progress(f"owner plane: this process (pid {os.getpid()}; it alone loads the owner "
                 f"and stage keys); operator plane: pid {operator.operator_pid} ({launcher} "
                 f"launcher; minimal environment, no keys)")
        return cls(settings, operator, progress=progress, owner_plane=owner)

    # -- what the owner plane read and decided ---------------------------------------------
    @property
    def plan(self) -> Any:
        return self.owner_plane.plan

    @property
    def sealed_dir(self) -> Any:
        return self.owner_plane.sealed_dir

    @property
    def keys(self) -> Any:
        return self.owner_plane.keys

    @property
    def manifest(self) -> Manifest | None:
        return self.owner_plane.manifest

    @property
    def measurements(self) -> dict[str, str]:
        return self.owner_plane.measurements

    @property
    def trusted_roots(self) -> Any:
        return self.owner_plane.trusted_roots

    @property
    def replicas(self) -> list[int]:
        return self.owner_plane.replicas

    @property
    def max_batch_size(self) -> int:
        return self.owner_plane.max_batch_size

    @property
    def batching_note(self) -> str:
        return self.owner_plane.batching_note

    @property
    def ca_path(self) -> Any:
        return self.owner_plane.ca_path

    @property
    def gateway_policy_path(self) -> Any:
        return self.owner_plane.gateway_policy_path

    @property
    def owner_public_key_path(self) -> Any:
        return self.owner_plane.owner_public_key_path

    @property
    def model_name(self) -> str:
        return str(self.plan.model.name)

    @property
    def stage_count(self) -> int:
        return self.owner_plane.stage_count

    def role_policy(self, role: str) -> Policy:
        return self.owner_plane.role_policy(role)

    # -- running ---------------------------------------------------------------------------
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
        s, owner = self.settings, self.owner_plane
        owner.check_sealed_dir()
        s.state_dir.mkdir(parents=True, exist_ok=True)
        owner.trust_roots()
        cpus, self._pinning = pin_plan(owner.replicas, s.pin)
        layout = ServingLayout.of(s, max_batch_size=owner.max_batch_size,
                                  threads=s.threads or self._default_threads())
        prepare_stages(self.launcher, replicas=owner.replicas, layout=layout, cpus=cpus)
        coordinator = owner.coordinator_spec(
            listen=reserve_beside(self.launcher, layout, COORDINATOR_ROLE),
            state_path=str((s.state_dir / "coordinator.sealed").resolve()))
        coordinator_mr = owner.measure(coordinator)
        self.launcher.start(ProcessSpec(coordinator.role, coordinator.to_argv()))
        self.progress(f"operator: coordinator starting on {coordinator.listen[0]}:"
                      f"{coordinator.listen[1]} (owner {owner.owner.fingerprint})")
        client = owner.attest_coordinator(coordinator.listen, coordinator_mr,
                                          problems=self.launcher.problems)
        roles = role_specs(self.launcher, model_name=self.model_name, replicas=owner.replicas,
                           layout=layout,
                           coordinator=coordinator.listen, coordinator_mrenclave=coordinator_mr,
                           sealed_dir=self.sealed_dir, cpus=cpus)
        owner.measure_roles(roles, coordinator_mr)
        owner.set_manifest(client, coordinator.listen)
        owner.write_client_files(client)
        for spec in roles:
            key = (spec.index, spec.replica) if isinstance(spec, StageSpec) else None
            self.launcher.start(ProcessSpec(
                spec.process_name if isinstance(spec, StageSpec) else spec.role,
                spec.to_argv(), cpus=cpus.get(key, ()) if key else ()))
        self.progress(f"operator: {sum(owner.replicas)} stage worker(s) for "
                      f"{self.stage_count} stage(s) and the gateway starting"
                      + (f"; pinned: {self._pinning}" if s.pin else ""))
        host = '127.0.0.1' if s.host in ('0.0.0.0', '') else s.host
        self.url = f"https://{host}:{s.port}"
        self.grpc_address = f"{host}:{s.grpc_port}" if s.grpc_port else None
        self.wait_ready(s.ready_timeout_s)
        self._check_gateway()
        self.ready_s = time.monotonic() - started
        self.progress(f"ready: {self.url} (CA {self.ca_path})")

    def _default_threads(self) -> int:
        """This machine's cores shared out (local launcher); 1 per enclave on a cluster."""
        kind = getattr(self.launcher, "kind", getattr(self.launcher, "name", "local"))
        return shared_machine_threads(self.replicas) if kind == "local" else 1

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
        """The owner's steps only, against a coordinator another system runs
        (:meth:`OwnerPlane.set_manifest_at`)."""
        return self.owner_plane.set_manifest_at(coordinator)

    def stop(self) -> None:
        self.launcher.stop()

    def client(self, **options: Any) -> InferenceClient:
        """A client that attests this deployment's gateway (its MRENCLAVE, manifest and the
        owner's current release) before its first request."""
        return self.owner_plane.client(self.url, **options)

    def _check_gateway(self) -> None:
        """The gateway that answers is the one this deployment pinned, admitted under this
        manifest and stapling the owner's current release (not a gateway of another
        coordinator the host routed us to)."""
        with self.client() as client:
            try:
                client.attest(client.policy or Policy(), self.trusted_roots,
                              manifest_digest=client.manifest_digest)
            except AttestationError as err:
                raise DeployError(f"the gateway at {self.url} failed attestation: {err}") \
                    from err
        assert self.manifest is not None  # set by start()
        self.progress(f"gateway attested under {self.manifest.describe()} and the owner's "
                      f"release")
