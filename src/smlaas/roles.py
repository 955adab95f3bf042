"""One typed spec per role (coordinator, gateway, stage-K): the one source of what each
process runs and of what its enclave measures, for every launcher and backend.

A spec splits its command line in two:

- ``measured_argv()``: what decides the enclave's trust, fixed in its measurement. For the
  coordinator, the owner's public key (so it obeys that owner only); for a stage or the
  gateway, its role and the coordinator's MRENCLAVE (so it registers only with that
  coordinator). Under Gramine this is the manifest's ``loader.argv``; under the sim backend it
  is hashed into MRENCLAVE (:meth:`RoleSpec.measured_config`).
- ``host_options()``: where it runs and how fast (addresses, threads, queue sizes). The host
  may choose these freely: they cannot change what the enclave trusts. Under Gramine they
  reach the enclave as passthrough environment variables (:func:`host_envvar`), never as
  arguments.

The local and Ray launchers run ``to_argv()`` (both halves on the command line), the
Kubernetes manifests the same arguments (or the environment, for gramine), the Gramine
manifests ``measured_argv()`` with the host options' variables passed through; the owner
computes each role's expected measurement from the same spec. What is measured is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_role
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.enclave.measurement import measure

Address = tuple[str, int]
ANY_ADDRESS: Address = ("0.0.0.0", 0)
"""Stands for any address in a spec whose placement is decided elsewhere (not measured)."""


def address_text(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def addresses_text(addresses: tuple[Address, ...]) -> str:
    """Replicas' addresses as one option value: ``host:port,host:port``."""
    return ",".join(address_text(a) for a in addresses)


def host_envvar(flag: str) -> str:
    """The environment variable a host option can also be given by: ``--listen`` ->
    ``SMLAAS_LISTEN`` (the CLI declares the same names)."""
    return "SMLAAS_" + flag.lstrip("-").replace("-", "_").upper()


class RoleSpec:
    """What every spec provides (the dataclasses below)."""

    command: ClassVar[str]
    backend: str

    @property
    def role(self) -> str:
        raise NotImplementedError

    def measured_argv(self) -> list[str]:
        raise NotImplementedError

    def host_options(self) -> dict[str, str]:
        """Flag -> value of every host-chosen option."""
        raise NotImplementedError

    def to_argv(self) -> list[str]:
        """Arguments after ``python -m smlaas``: measured ones, then the host's."""
        host = [part for flag, value in self.host_options().items() for part in (flag, value)]
        return [*self.measured_argv(), *host]

    def host_env(self) -> dict[str, str]:
        """The host options as environment variables (how Gramine passes them)."""
        return {host_envvar(flag): value for flag, value in self.host_options().items()}

    def measured_config(self) -> dict[str, list[str]]:
        """What the sim backend hashes into MRENCLAVE (Gramine measures loader.argv)."""
        return {"argv": self.measured_argv()}

    def sim_mrenclave(self) -> str:
        """The MRENCLAVE this role has under the sim backend with the installed code."""
        return measure(self.role, self.measured_config()).mrenclave.hex()


@dataclass(frozen=True)
class CoordinatorSpec(RoleSpec):
    command: ClassVar[str] = "coordinator"
    backend: str
    owner_public_key: str
    """Hex SubjectPublicKeyInfo DER of the owner's signing key."""
    listen: Address = ("127.0.0.1", 7443)
    state_path: str = ""
    """'' = the default under the smlaas cache."""

    @property
    def role(self) -> str:
        return COORDINATOR_ROLE

    def measured_argv(self) -> list[str]:
        return [self.command, "--backend", self.backend, "--owner-public-key",
                self.owner_public_key]

    def host_options(self) -> dict[str, str]:
        options = {"--host": self.listen[0], "--port": str(self.listen[1])}
        if self.state_path:
            options["--state"] = self.state_path
        return options


@dataclass(frozen=True)
class StageSpec(RoleSpec):
    command: ClassVar[str] = "worker"
    index: int
    backend: str
    coordinator_mrenclave: str
    coordinator: Address
    listen: Address
    sealed_dir: str
    next_stages: tuple[Address, ...] = ()
    """The next stage's replicas (empty for the last stage)."""
    threads: int = 1
    queue_size: int = 4
    replica: int = 0
    """Which replica of its stage this process is (for its process name and metrics)."""

    @property
    def role(self) -> str:
        return stage_role(self.index)

    @property
    def process_name(self) -> str:
        return self.role if self.replica == 0 else f"{self.role}.r{self.replica}"

    def measured_argv(self) -> list[str]:
        return [self.command, "--role", self.role, "--backend", self.backend,
                "--coordinator-mrenclave", self.coordinator_mrenclave]

    def host_options(self) -> dict[str, str]:
        options = {"--coordinator": address_text(self.coordinator),
                   "--listen": address_text(self.listen), "--build": self.sealed_dir,
                   "--threads": str(self.threads), "--queue-size": str(self.queue_size),
                   **({"--replica": str(self.replica)} if self.replica else {})}
        if self.next_stages:
            options["--next"] = addresses_text(self.next_stages)
        return options


@dataclass(frozen=True)
class GatewaySpec(RoleSpec):
    command: ClassVar[str] = "gateway"
    backend: str
    coordinator_mrenclave: str
    coordinator: Address
    first_stages: tuple[Address, ...]
    """Stage 0's replicas."""
    listen: Address
    model_name: str
    max_batch_size: int = 0
    max_queue_delay_us: int = 500
    max_inflight: int = 4
    request_timeout_s: float = 30.0
    max_queue: int = 128
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    grpc_port: int = 0
    """0: no gRPC endpoint."""
    labels_path: str = ""
    """Class labels for the classification extension, one per line ('' = none); the file
    must have the SHA-256 the manifest names."""

    @property
    def role(self) -> str:
        return GATEWAY_ROLE

    def measured_argv(self) -> list[str]:
        return [self.command, "--backend", self.backend, "--coordinator-mrenclave",
                self.coordinator_mrenclave]

    def host_options(self) -> dict[str, str]:
        return {"--coordinator": address_text(self.coordinator),
                "--first-stage": addresses_text(self.first_stages),
                "--host": self.listen[0], "--port": str(self.listen[1]),
                "--model-name": self.model_name, "--max-batch-size": str(self.max_batch_size),
                "--max-queue-delay-us": str(self.max_queue_delay_us),
                "--max-inflight": str(self.max_inflight),
                "--request-timeout": f"{self.request_timeout_s:g}",
                "--max-queue": str(self.max_queue),
                "--header-timeout": f"{self.header_timeout_s:g}",
                "--body-timeout": f"{self.body_timeout_s:g}",
                "--grpc-port": str(self.grpc_port),
                **({"--labels": self.labels_path} if self.labels_path else {})}


def placed_elsewhere(*, backend: str, coordinator_mrenclave: str, stage_count: int,
                     model_name: str = "") -> list[RoleSpec]:
    """The gateway's and every stage's spec when another system places them (Kubernetes):
    exact in what is measured (``measured_argv``), with stand-ins for every host option
    (addresses, a non-zero replica number), so that they give each role's measurement and
    the full list of its host options, but not where it runs."""
    common: dict[str, Any] = {"backend": backend, "coordinator_mrenclave": coordinator_mrenclave,
                              "coordinator": ANY_ADDRESS}
    specs: list[RoleSpec] = [GatewaySpec(first_stages=(ANY_ADDRESS,), listen=ANY_ADDRESS,
                                         model_name=model_name, **common)]
    specs += [StageSpec(index=k, listen=ANY_ADDRESS, sealed_dir="", replica=1,
                        next_stages=(ANY_ADDRESS,) if k + 1 < stage_count else (), **common)
              for k in range(stage_count)]
    return specs
