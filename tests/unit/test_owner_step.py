"""The owner's step against a coordinator that runs elsewhere (Kubernetes, `smlaas operator
up`): it sets the same manifest as the local deploy, `smlaas owner set-manifest` is that step,
and it remembers the versions it signed per coordinator instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smlaas.coordinator.client import CoordinatorStatus, coordinator_policy
from smlaas.coordinator.manifest import Manifest
from smlaas.coordinator.owner import OwnerKey
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.coordinator.release import SignedRelease
from smlaas.deploy.launchers import ProcessSpec
from smlaas.deploy.owner_plane import OwnerPlane
from smlaas.deploy.settings import DeploySettings
from smlaas.deploy.topology import ServingLayout, role_specs
from smlaas.errors import DeployError
from smlaas.export.sealed_build import sealed_directory
from smlaas.roles import CoordinatorSpec, StageSpec, placed_elsewhere
from tests.builds import sealed_chain_build


class FakeCoordinator:
    """An attested coordinator in memory; every client reaches the same one (class state)."""

    made: list[FakeCoordinator] = []
    owner_fingerprint = ""
    held: Manifest | None = None
    stage_keys: dict[int, bytes] = {}
    signed = 0
    release: SignedRelease | None = None

    def __init__(self, host: str, port: int, *, roots: list[Any], policy: Any) -> None:
        self.address, self.policy = (host, port), policy
        FakeCoordinator.made.append(self)

    def deployment_ca(self) -> str:
        return "CA PEM\n"

    def status(self) -> CoordinatorStatus:
        held = FakeCoordinator.held
        return CoordinatorStatus(
            instance="ab" * 32, owner=self.owner_fingerprint, ca_pem="CA PEM\n",
            manifest_digest=held.digest() if held else None,
            manifest_version=held.version if held else None, topology=(),
            release=FakeCoordinator.release)

    def set_manifest(self, manifest: Manifest, *, owner: OwnerKey,
                     stage_keys: dict[int, bytes], release: Any = None) -> str:
        FakeCoordinator.held, FakeCoordinator.stage_keys = manifest, dict(stage_keys)
        FakeCoordinator.release = release(bytes.fromhex("ab" * 32)) if release else None
        FakeCoordinator.signed += 1
        return manifest.digest()

    def set_release(self, release: SignedRelease) -> None:
        FakeCoordinator.release = release


class Ports:
    """A launcher that hands out addresses and starts nothing (for the local path's specs)."""

    name = "ports"

    def __init__(self) -> None:
        self.next_port = 20000

    def reserve(self, name: str) -> tuple[str, int]:
        self.next_port += 1
        return "127.0.0.1", self.next_port

    def start(self, spec: ProcessSpec) -> None: ...

    def prepare(self, enclaves: list[tuple[str, int]]) -> None: ...

    def problems(self) -> list[str]:
        return []

    def restarts(self) -> dict[str, int]:
        return {}

    def stop(self) -> None: ...


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return sealed_chain_build(tmp_path_factory.mktemp("owner-step"))


@pytest.fixture
def coordinator(monkeypatch: pytest.MonkeyPatch) -> type[FakeCoordinator]:
    FakeCoordinator.made, FakeCoordinator.held, FakeCoordinator.signed = [], None, 0
    FakeCoordinator.release = None
    monkeypatch.setattr("smlaas.deploy.owner_plane.CoordinatorClient", FakeCoordinator)
    return FakeCoordinator


def _settings(build: tuple[Path, Path, Path], tmp_path: Path, **kwargs: Any) -> DeploySettings:
    build_dir, keys, owner = build
    return DeploySettings(build_dir=sealed_directory(build_dir), keys_path=keys,
                          owner_key_path=owner, state_dir=tmp_path / "state", **kwargs)


def test_placement_is_not_measured() -> None:
    placed = StageSpec(index=1, backend="sim", coordinator_mrenclave="cd" * 32,
                       coordinator=("10.0.0.1", 7443), listen=("10.0.0.2", 9000),
                       sealed_dir="/build", next_stages=(("a", 1), ("b", 2)), replica=3)
    stand_in = placed_elsewhere(backend="sim", coordinator_mrenclave="cd" * 32,
                                stage_count=3)[2]
    assert isinstance(stand_in, StageSpec) and stand_in.role == placed.role
    assert stand_in.sim_mrenclave() == placed.sim_mrenclave()
    # ...and the stand-ins name every host option, the replica number and --next included.
    assert set(stand_in.host_options()) == set(placed.host_options())


def test_set_manifest_at_sets_what_the_local_deploy_sets(
        build: tuple[Path, Path, Path], tmp_path: Path,
        coordinator: type[FakeCoordinator]) -> None:
    owner = OwnerKey.load(build[2])
    coordinator.owner_fingerprint = owner.fingerprint
    remote = OwnerPlane(_settings(build, tmp_path, replicas={1: 2}))
    manifest = remote.set_manifest_at(("smlaas-coordinator", 7443))
    (client,) = coordinator.made
    assert client.address == ("smlaas-coordinator", 7443)
    mrenclave = CoordinatorSpec(backend="sim", owner_public_key=owner.public_key_hex
                                ).sim_mrenclave()
    assert client.policy == coordinator_policy(mrenclave, simulated=True)
    assert coordinator.held == manifest
    assert set(coordinator.stage_keys) == set(remote.keys.stage_keys)
    assert (tmp_path / "state" / "ca.pem").read_text() == "CA PEM\n"
    assert (tmp_path / "state" / "gateway-policy.toml").is_file()
    assert (tmp_path / "state" / "owner.pub").read_text().strip() == owner.public_key_hex
    first = coordinator.release
    assert first is not None and first.release.manifest_digest == manifest.digest()
    assert first.release.version == 1 and first.release.coordinator_instance == "ab" * 32
    first.verify(owner.private_key.public_key())
    # The local deploy computes its measurements from the specs it places itself.
    local = OwnerPlane(_settings(build, tmp_path / "local", replicas={1: 2}))
    specs = role_specs(Ports(), model_name=local.plan.model.name, replicas=local.replicas,
                       layout=ServingLayout(), coordinator=("127.0.0.1", 7443),
                       coordinator_mrenclave=mrenclave, sealed_dir=local.sealed_dir, cpus={})
    local.measure_roles(specs, mrenclave)
    assert local.build_manifest().digest() == manifest.digest()
    # Run again (a Job retried): the coordinator holds it already; nothing is signed anew,
    # but the release is renewed.
    again = OwnerPlane(_settings(build, tmp_path, replicas={1: 2}))
    assert again.set_manifest_at(("smlaas-coordinator", 7443)) == manifest
    assert coordinator.signed == 1 and coordinator.release is not first


def test_a_rolled_back_coordinator_never_gets_a_second_version_of_one_number(
        build: tuple[Path, Path, Path], tmp_path: Path,
        coordinator: type[FakeCoordinator]) -> None:
    owner = OwnerKey.load(build[2])
    coordinator.owner_fingerprint = owner.fingerprint
    OwnerPlane(_settings(build, tmp_path)).set_manifest_at(("c", 1))
    v2 = OwnerPlane(_settings(build, tmp_path, replicas={1: 2}, replace_manifest=True))
    assert v2.set_manifest_at(("c", 1)).version == 2
    # The host restores the sealed state from before v2: the coordinator holds v1 again.
    restored = OwnerPlane(_settings(build, tmp_path))
    restored.measure_placed_elsewhere(CoordinatorSpec(
        backend="sim", owner_public_key=owner.public_key_hex).sim_mrenclave())
    coordinator.held = restored.build_manifest(version=1)
    with pytest.raises(DeployError, match="rolled back by the host"):
        OwnerPlane(_settings(build, tmp_path)).set_manifest_at(("c", 1))
    replaced = OwnerPlane(_settings(build, tmp_path, replace_manifest=True))
    assert replaced.set_manifest_at(("c", 1)).version == 3  # never a second, different v2


def test_gramine_needs_every_role_measured(build: tuple[Path, Path, Path], tmp_path: Path,
                                           coordinator: type[FakeCoordinator]) -> None:
    from smlaas.errors import ConfigError

    remote = OwnerPlane(_settings(build, tmp_path, backend="gramine",
                                  measurements={COORDINATOR_ROLE: "ab" * 32}))
    with pytest.raises(ConfigError, match="MRENCLAVE of role 'gateway'"):
        remote.set_manifest_at(("smlaas-coordinator", 7443))


def test_owner_set_manifest_command(build: tuple[Path, Path, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from smlaas.cli.main import cli

    seen: dict[str, Any] = {}

    def set_manifest_at(self: OwnerPlane, address: tuple[str, int]) -> Manifest:
        seen.update(settings=self.settings, address=address)
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.ca_path.write_text("CA PEM\n")
        self.measurements = {spec.role: spec.sim_mrenclave() for spec in placed_elsewhere(
            backend="sim", coordinator_mrenclave="cd" * 32, stage_count=self.stage_count)}
        return self.build_manifest()

    monkeypatch.setattr(OwnerPlane, "set_manifest_at", set_manifest_at)
    build_dir, keys, owner = build
    sealed = sealed_directory(build_dir)
    result = CliRunner().invoke(cli, [
        "owner", "set-manifest", str(sealed), "--keys", str(keys), "--key", str(owner),
        "--coordinator", "127.0.0.1:7443", "--pccs", "https://pccs.example:8081/sgx/",
        "--state-dir", str(tmp_path / "s"), "--print-ca"])
    assert result.exit_code == 0, result.output
    assert seen["address"] == ("127.0.0.1", 7443)
    assert seen["settings"].collateral == {"pccs_url": "https://pccs.example:8081/sgx/"}
    assert "CA PEM" in result.output and "manifest v1" in result.output


def test_default_threads_share_this_machines_cores() -> None:
    """On one machine every stage replica and the gateway share the cores: 3 stages on 2 cores
    get 1 thread each (not 2 each: 6 threads on 2 cores), 1 stage on 8 cores gets 4."""
    from smlaas.deploy.topology import shared_machine_threads

    assert shared_machine_threads([1, 1, 1], cores=2) == 1
    assert shared_machine_threads([1], cores=8) == 4
    assert shared_machine_threads([2, 1], cores=8) == 2
    assert shared_machine_threads([1, 1], cores=1) == 1
