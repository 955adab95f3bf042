"""The owner plane: the only code that loads the owner's signing key or the stage keys.

It reads files the owner controls, each once, and talks only to attested enclaves (the
coordinator over RA-TLS, the gateway over HTTPS after checking its quote). It never imports a
launcher, Ray or a Kubernetes client and never starts a process: whatever starts processes
(the operator plane, :mod:`smlaas.deploy.operator`) may be the host's, and the host's engines
can run code in any process connected to them.

The owner's steps, in order:

1. read ``plan.json`` once: its SHA-256 must be the keyfile's, and the batching limit, the
   replicas and the topology are taken from those same bytes, which the manifest binds
   (``plan_sha256``); check every sealed stage's header (plaintext SHA-256 and key id)
   against the keyfile;
2. attest the coordinator (its MRENCLAVE pinned: computed from its spec for ``sim``, given
   for ``gramine``);
3. build the manifest and compare its digest with what the coordinator holds: none -> sign
   it for this coordinator instance and set it with the stage keys and a first release;
   the same -> renew the release; another -> refuse (or, asked to, replace it with the next
   version). The highest version signed for each coordinator instance is remembered, so a
   rolled-back coordinator is noticed and never makes the owner sign two different versions
   of one number;
4. write what clients pin: the deployment CA, the gateway policy and the owner's public key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smlaas.coordinator.client import CoordinatorClient, CoordinatorStatus, coordinator_policy
from smlaas.coordinator.manifest import (
    GATEWAY_ROLE,
    Manifest,
    StageCommitment,
    key_commitment,
    stage_role,
)
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.coordinator.release import Release, SignedRelease, sign_release
from smlaas.deploy.settings import DeploySettings
from smlaas.deploy.topology import stage_replicas
from smlaas.enclave.policy import Policy, RolePolicy
from smlaas.enclave.sealing import OwnerKeys, key_id, read_header_of
from smlaas.enclave.verification import INTEL_ROOT, TrustedRoot
from smlaas.errors import AttestationError, ConfigError, DeployError, ProtocolError
from smlaas.export.build_dir import PLAN_FILE
from smlaas.export.sealed_build import (
    ServingNote,
    plaintext_stages,
    sealed_directory,
    sealed_path,
)
from smlaas.paths import state_dir
from smlaas.plan.plan import Plan
from smlaas.roles import CoordinatorSpec, RoleSpec, placed_elsewhere
from smlaas.version_memory import VersionMemory

if TYPE_CHECKING:
    from smlaas.client import InferenceClient

logger = logging.getLogger(__name__)
CA_FILE = "ca.pem"
GATEWAY_POLICY_FILE = "gateway-policy.toml"
OWNER_PUBLIC_KEY_FILE = "owner.pub"
SIGNED_VERSIONS_FILE = "signed-versions.json"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
WILDCARDS = ("0.0.0.0", "::", "")


def read_plan_once(sealed_dir: Path) -> tuple[bytes, Plan]:
    """plan.json's bytes, read once, and the validated Plan parsed from exactly those."""
    path = Path(sealed_dir) / PLAN_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    try:
        plan = Plan.from_json(data.decode())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 JSON: {err}") from err
    plan.check()
    return data, plan


class OwnerPlane:
    """The owner's inputs (read once) and steps; see the module docstring."""

    def __init__(self, settings: DeploySettings, *,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        keep_memory_private()  # before any key is loaded
        self.settings, self.progress = settings, progress
        self.sealed_dir = sealed_directory(settings.build_dir)
        self.plan_bytes, self.plan = read_plan_once(self.sealed_dir)
        self.plan_sha256 = hashlib.sha256(self.plan_bytes).hexdigest()
        self.keys = OwnerKeys.load(settings.keys_path)
        self.owner = OwnerKey.load(settings.owner_key_path)
        self.max_batch_size, self.batching_note = _batching(ServingNote.of(self.plan),
                                                            settings.max_batch_size)
        self.replicas = stage_replicas(self.plan, settings.replicas)
        """Replicas per stage, in stage order (from the plan the owner read)."""
        self.trusted_roots: list[TrustedRoot] = [INTEL_ROOT]
        """Roots the owner verifies quotes against (plus a simulation root for sim)."""
        self.measurements: dict[str, str] = {}
        """role -> the MRENCLAVE the manifest accepts (after the roles are known)."""
        self.manifest: Manifest | None = None
        self.release: SignedRelease | None = None
        self.signed_versions = signed_versions_memory()
        state = settings.state_dir
        self.ca_path = state / CA_FILE
        self.gateway_policy_path = state / GATEWAY_POLICY_FILE
        """The policy a client attests the gateway with (its pinned MRENCLAVE)."""
        self.owner_public_key_path = state / OWNER_PUBLIC_KEY_FILE
        """The owner's public key, which clients check the release with."""

    @property
    def simulated(self) -> bool:
        return self.settings.backend == "sim"

    @property
    def stage_count(self) -> int:
        return len(self.plan.stages)

    # -- 1. the sealed directory -----------------------------------------------------------
    def check_sealed_dir(self) -> None:
        """The sealed directory is the one the keyfile sealed (from the plan bytes held)."""
        s = self.settings
        plaintext = plaintext_stages(self.sealed_dir) + (
            plaintext_stages(s.build_dir)
            if Path(s.build_dir).resolve() != self.sealed_dir.resolve() else [])
        if plaintext:
            names = ", ".join(p.name for p in plaintext)
            if not self.simulated:
                raise ConfigError(f"{self.sealed_dir} holds plaintext sub-models ({names}); "
                                  f"deploy only the directory `smlaas seal` wrote")
            logger.warning("%s holds plaintext sub-models (%s): with a real backend this is "
                           "refused", s.build_dir, names)
        if self.keys.build_sha256 != self.plan_sha256:
            raise ConfigError(f"keyfile {s.keys_path} belongs to another sealed build (its "
                              f"plan.json differs); seal this build again")
        for stage in self.plan.stages:
            path = sealed_path(self.sealed_dir, stage.index)
            if not path.is_file():
                raise ConfigError(f"stage {stage.index} is not sealed ({path} is missing); "
                                  f"run `smlaas seal` again")
            if stage.index not in self.keys.stage_keys:
                raise ConfigError(f"keyfile has no key for stage {stage.index}")
            header = read_header_of(path)
            if header.sha256 != self.keys.stage_sha256[stage.index]:
                raise ConfigError(f"{path} is not the stage this keyfile sealed (its SHA-256 "
                                  f"differs): the sealed directory was changed")
            if header.key_id != key_id(self.keys.stage_keys[stage.index]):
                raise ConfigError(f"{path} is sealed under another key (key id "
                                  f"{header.key_id}, the keyfile's is "
                                  f"{key_id(self.keys.stage_keys[stage.index])}): the sealed "
                                  f"directory was changed; seal this build again")

    # -- 2. the coordinator ----------------------------------------------------------------
    def trust_roots(self) -> None:
        """Intel's root, and for ``sim`` the simulation root: the one named by
        ``settings.sim_root``, else this machine's (created here before any process races
        to create it)."""
        if not self.simulated:
            return
        from smlaas.enclave.backends.sim import SimBackend, simulation_root_from_pem

        root = simulation_root_from_pem(self.settings.sim_root) if self.settings.sim_root \
            else SimBackend(COORDINATOR_ROLE).trusted_root
        self.trusted_roots = [INTEL_ROOT, root]

    def coordinator_spec(self, **placement: Any) -> CoordinatorSpec:
        return CoordinatorSpec(backend=self.settings.backend,
                               owner_public_key=self.owner.public_key_hex, **placement)

    def measure(self, spec: RoleSpec) -> str:
        if self.simulated:
            return spec.sim_mrenclave()
        known = self.settings.measurements or {}
        if spec.role not in known:
            raise ConfigError(f"the {self.settings.backend} backend needs the MRENCLAVE of "
                              f"role {spec.role!r} (--measurements FILE, from "
                              f"gramine-sgx-sign)")
        return known[spec.role].lower()

    def measure_roles(self, specs: list[RoleSpec], coordinator_mrenclave: str) -> None:
        self.measurements = {spec.role: self.measure(spec) for spec in specs}
        self.measurements[COORDINATOR_ROLE] = coordinator_mrenclave

    def measure_placed_elsewhere(self, coordinator_mrenclave: str) -> None:
        """The roles' measurements when another system places them: placement is not
        measured, so specs with stand-in addresses measure the same."""
        self.measure_roles(placed_elsewhere(
            backend=self.settings.backend, coordinator_mrenclave=coordinator_mrenclave,
            stage_count=self.stage_count), coordinator_mrenclave)

    def attest_coordinator(self, address: tuple[str, int], mrenclave: str, *,
                           problems: Callable[[], list[str]] = lambda: [],
                           deadline_s: float = 60.0) -> CoordinatorClient:
        """A client of the coordinator at ``address`` once it answered and passed
        attestation (retried while it is not up, until ``deadline_s`` or ``problems()``)."""

        client = CoordinatorClient(*address, roots=self.trusted_roots,
                                   policy=coordinator_policy(mrenclave,
                                                             simulated=self.simulated))
        end = time.monotonic() + deadline_s
        while True:
            try:
                client.deployment_ca()
                return client
            except (OSError, ProtocolError) as err:
                found = problems()
                if found or time.monotonic() > end:
                    raise DeployError("the coordinator did not come up: " +
                                      ("\n".join(found) or str(err))) from err
                time.sleep(0.2)
            except AttestationError as err:
                raise DeployError(f"the coordinator failed attestation: {err}") from err

    # -- 3. the manifest and the release ---------------------------------------------------
    def gateway_hosts(self) -> tuple[str, ...]:
        host = self.settings.host
        named = [*LOOPBACK_HOSTS, *([host] if host not in WILDCARDS else []),
                 *self.settings.gateway_hosts]
        return tuple(dict.fromkeys(named))

    def build_manifest(self, *, version: int = 1) -> Manifest:
        """This deployment's manifest (after the measurements are known)."""
        roles = [GATEWAY_ROLE, *(stage_role(k) for k in range(self.stage_count))]
        policy = dict(self.settings.policy or {})
        policy["allow_simulation_insecure"] = self.simulated
        policy["roles"] = {role: {"mrenclave": [self.measurements[role]]} for role in roles}
        labels = self.settings.labels_path
        return Manifest(
            version=version, policy=policy, topology=tuple(roles),
            stages={k: StageCommitment(key_commitment(k, key), self.keys.stage_sha256[k])
                    for k, key in self.keys.stage_keys.items()},
            max_batch_size=self.max_batch_size, collateral=dict(self.settings.collateral),
            replicas={k: n for k, n in enumerate(self.replicas) if n > 1},
            labels_sha256=hashlib.sha256(Path(labels).read_bytes()).hexdigest()
            if labels else "", plan_sha256=self.plan_sha256,
            gateway_hosts=self.gateway_hosts())

    def _version_key(self, instance: str) -> str:
        return f"{self.owner.fingerprint}/{instance}"

    def set_manifest(self, client: CoordinatorClient, address: tuple[str, int]) -> Manifest:
        """Step 3 (see the module docstring); returns the manifest the coordinator holds."""
        status = client.status()
        if status.owner != self.owner.fingerprint:
            raise DeployError(f"the coordinator obeys owner {status.owner}, not this owner "
                              f"key {self.owner.fingerprint}")
        version_key = self._version_key(status.instance)
        signed_before = self.signed_versions.highest(version_key)
        held_version = status.manifest_version or 0
        manifest = self.build_manifest(version=held_version or 1)
        if signed_before > held_version and not self.settings.replace_manifest:
            raise DeployError(_rolled_back(status, signed_before))
        if status.manifest_digest == manifest.digest() and signed_before <= held_version:
            self.manifest = manifest
            self.release = self.renew_release(client, address)
            self.progress(f"coordinator attested; it already holds this deployment's "
                          f"{manifest.describe()}; release renewed")
            return manifest
        if status.manifest_digest is not None and not self.settings.replace_manifest:
            raise DeployError(_held_another(status, manifest, self.settings.state_dir))
        version = max(held_version, signed_before) + 1 if (
            status.manifest_digest is not None or signed_before) else 1
        manifest = self.build_manifest(version=version)
        # Remembered before it is sent: a signature that left this process counts.
        self.signed_versions.record(version_key, version)
        releases: list[SignedRelease] = []

        def first_release(instance: bytes) -> SignedRelease:
            releases.append(self.sign_release(instance.hex(), manifest, address))
            return releases[-1]

        digest = client.set_manifest(manifest, owner=self.owner,
                                     stage_keys=self.keys.stage_keys, release=first_release)
        if digest != manifest.digest():
            raise DeployError(f"the coordinator holds manifest {digest}, not the "
                              f"{manifest.digest()} just set")
        self.manifest, self.release = manifest, releases[-1]
        self.progress(f"coordinator attested; {manifest.describe()} and its release signed "
                      f"and set")
        return manifest

    def sign_release(self, instance: str, manifest: Manifest, address: tuple[str, int]
                     ) -> SignedRelease:
        """The owner's release of ``manifest`` on coordinator ``instance`` from now on."""
        return sign_owner_release(
            self.owner, instance=instance, manifest_digest=manifest.digest(),
            version=manifest.version, coordinator_mrenclave=self.measurements[COORDINATOR_ROLE],
            coordinator_address=self.settings.coordinator_address or
            f"{address[0]}:{address[1]}", validity_s=self.settings.release_validity_s)

    def renew_release(self, client: CoordinatorClient, address: tuple[str, int]
                      ) -> SignedRelease:
        """A fresh release of this deployment's manifest, which the coordinator holds."""
        return renew_release(
            self.owner, client, signed_versions=self.signed_versions,
            coordinator_mrenclave=self.measurements[COORDINATOR_ROLE],
            coordinator_address=self.settings.coordinator_address or
            f"{address[0]}:{address[1]}", validity_s=self.settings.release_validity_s,
            expected_digest=self.manifest.digest() if self.manifest else None)

    def set_manifest_at(self, coordinator: tuple[str, int]) -> Manifest:
        """Every owner step against a coordinator that another system runs (Kubernetes,
        ``smlaas operator up``): check the sealed directory, attest the coordinator, set
        this deployment's manifest and release (or find it set), and write what clients pin.
        Starts nothing: the roles register on their own once the manifest is set."""
        self.check_sealed_dir()
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.trust_roots()
        coordinator_mr = self.measure(self.coordinator_spec())
        client = self.attest_coordinator(coordinator, coordinator_mr)
        self.measure_placed_elsewhere(coordinator_mr)
        manifest = self.set_manifest(client, coordinator)
        self.write_client_files(client)
        return manifest

    # -- 4. what clients pin ---------------------------------------------------------------
    def write_client_files(self, client: CoordinatorClient) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.ca_path.write_text(client.status().ca_pem)  # the same, pinned instance
        self.gateway_policy_path.write_text(self.role_policy(GATEWAY_ROLE).to_toml())
        self.owner_public_key_path.write_text(self.owner.public_key_hex + "\n")

    def role_policy(self, role: str) -> Policy:
        """A policy accepting exactly the measurement this deployment pinned for ``role``
        (e.g. for clients attesting the gateway)."""
        base = Policy.from_dict(self.manifest.policy) if self.manifest else Policy()
        return replace(base, roles={role: RolePolicy(mrenclave=(self.measurements[role],))})

    def client(self, url: str, **options: Any) -> InferenceClient:
        """A client that attests this deployment's gateway (its MRENCLAVE, its manifest and
        the owner's current release) before its first request."""
        from smlaas.client import InferenceClient

        if self.manifest is None:
            raise DeployError("the deployment has no manifest yet")
        return InferenceClient(url, ca=self.ca_path, policy=self.role_policy(GATEWAY_ROLE),
                               roots=self.trusted_roots, manifest_digest=self.manifest.digest(),
                               owner_public_key=self.owner.public_key_hex, **options)


def keep_memory_private() -> None:
    """Makes this process non-dumpable (Linux ``PR_SET_DUMPABLE`` 0): other processes of the
    same user, such as the operator child this process starts, can then neither ptrace it nor
    read its ``/proc/PID/mem`` or ``environ``, and it writes no core dump holding keys. Root
    still can (docs/SECURITY.md)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
            logger.warning("could not make the owner's process non-dumpable (errno %d)",
                           ctypes.get_errno())
    except (OSError, AttributeError) as err:  # not Linux
        logger.warning("could not make the owner's process non-dumpable: %s", err)


def signed_versions_memory() -> VersionMemory:
    """coordinator instance -> the highest manifest version this owner signed for it."""
    return VersionMemory(state_dir() / SIGNED_VERSIONS_FILE)


def sign_owner_release(owner: OwnerKey, *, instance: str, manifest_digest: str, version: int,
                       coordinator_mrenclave: str, coordinator_address: str,
                       validity_s: int) -> SignedRelease:
    now = int(time.time())
    return sign_release(owner.private_key, Release(
        owner=owner.fingerprint, coordinator_instance=instance,
        coordinator_mrenclave=coordinator_mrenclave, coordinator_address=coordinator_address,
        manifest_digest=manifest_digest, version=version, issued_at=now,
        expires_at=now + validity_s))


def renew_release(owner: OwnerKey, client: CoordinatorClient, *,
                  signed_versions: VersionMemory, coordinator_mrenclave: str,
                  coordinator_address: str, validity_s: int,
                  expected_digest: str | None = None) -> SignedRelease:
    """Signs and sets a fresh release of the manifest the (attested) coordinator holds,
    refused if that is not the highest version this owner signed for that coordinator
    instance (its state was rolled back) or, with ``expected_digest``, another manifest."""
    status = client.status()
    if status.owner != owner.fingerprint:
        raise DeployError(f"the coordinator obeys owner {status.owner}, not this owner key "
                          f"{owner.fingerprint}")
    if status.manifest_digest is None or status.manifest_version is None:
        raise DeployError("the coordinator holds no manifest: there is nothing to release "
                          "(set one first)")
    signed_before = signed_versions.highest(f"{owner.fingerprint}/{status.instance}")
    if signed_before > status.manifest_version:
        raise DeployError(_rolled_back(status, signed_before))
    if expected_digest is not None and status.manifest_digest != expected_digest:
        raise DeployError(f"the coordinator holds manifest {status.manifest_digest}, not "
                          f"this deployment's {expected_digest}")
    release = sign_owner_release(
        owner, instance=status.instance, manifest_digest=status.manifest_digest,
        version=status.manifest_version, coordinator_mrenclave=coordinator_mrenclave,
        coordinator_address=coordinator_address, validity_s=validity_s)
    client.set_release(release)
    return release


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
            f"or higher (state: {state_dir})")


def _rolled_back(status: CoordinatorStatus, signed_before: int) -> str:
    return (f"the coordinator (instance {status.instance[:16]}...) holds manifest version "
            f"{status.manifest_version or 'none'}, but this owner already signed version "
            f"{signed_before} for it: its sealed state was rolled back by the host. Refusing "
            f"to release it; --replace-manifest signs version {signed_before + 1}")


def read_measurements(path: Path) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
        return {str(role): str(value) for role, value in data.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path} is not a JSON object of role -> MRENCLAVE: {err}") from err
