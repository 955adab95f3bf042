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

A spec's host options are one table (``HOST_OPTIONS``, of :class:`HostOption`): each names the
spec field it sets, its flag, how it is read and written, its help and its default (the
field's). ``smlaas worker`` and ``smlaas gateway`` generate their options from it
(:func:`smlaas.cli.serve_cmds.host_options`), ``host_options()`` writes it, ``host_env()``
names its variables: one place holds each default.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from smlaas.coordinator.manifest import GATEWAY_ROLE, stage_role
from smlaas.coordinator.protocol import COORDINATOR_ROLE
from smlaas.enclave.measurement import measure
from smlaas.transport.addresses import parse_address, parse_addresses

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


@dataclass(frozen=True)
class HostOption:
    """One host-chosen option of a role (see the module docstring)."""

    flag: str
    field: str
    """The spec field it sets."""
    kind: str = "text"
    """text, path, int, float, address (HOST:PORT), addresses (HOST:PORT,...), or host/port
    (the two parts of an address field)."""
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    metavar: str | None = None
    written_when_default: bool = True
    """False: left off the command line when it has its default (``--next`` of the last
    stage, ``--replica 0``, no ``--labels``)."""
    default: Any = None
    """Only for a part of a field without a default of its own (the gateway's --host);
    None: the field's default (MISSING when it has none: the option is required)."""

    def default_of(self, spec_class: type) -> Any:
        if self.default is not None:
            return self.default
        field = {f.name: f for f in fields(spec_class)}[self.field]
        return MISSING if field.default is MISSING else field.default

    def text(self, spec: Any) -> str | None:
        """The option's value on ``spec``'s command line (None: left off)."""
        value = getattr(spec, self.field)
        if self.kind == "host":
            value = value[0]
        elif self.kind == "port":
            value = value[1]
        if not self.written_when_default and value == self.default_of(type(spec)):
            return None
        if self.kind == "address":
            return address_text(value)
        if self.kind == "addresses":
            return addresses_text(value)
        if self.kind == "float":
            return f"{value:g}"
        return str(value)

    def parse(self, text: Any) -> Any:
        """The field value from the option's value as the CLI parsed it."""
        if self.kind == "address":
            return parse_address(str(text), what=self.flag)
        if self.kind == "addresses":
            return parse_addresses(str(text), what=self.flag) if text else ()
        return text


_COORDINATOR = HostOption("--coordinator", "coordinator", "address", metavar="HOST:PORT",
                          help="The coordinator to register with.")


class RoleSpec:
    """What every spec provides (the dataclasses below)."""

    command: ClassVar[str]
    HOST_OPTIONS: ClassVar[tuple[HostOption, ...]] = ()
    backend: str

    @property
    def role(self) -> str:
        raise NotImplementedError

    def measured_argv(self) -> list[str]:
        raise NotImplementedError

    def host_options(self) -> dict[str, str]:
        """Flag -> value of every host-chosen option (from ``HOST_OPTIONS``)."""
        written = {option.flag: option.text(self) for option in self.HOST_OPTIONS}
        return {flag: value for flag, value in written.items() if value is not None}

    @classmethod
    def host_fields(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Spec field values from ``HOST_OPTIONS`` flag -> parsed value (an address field's
        host and port parts joined)."""
        out: dict[str, Any] = {}
        for option in cls.HOST_OPTIONS:
            raw = values[option.flag]
            value = option.default_of(cls) if raw is None else option.parse(raw)
            if option.kind in ("host", "port"):
                host, port = out.get(option.field, ("", 0))
                out[option.field] = (value, port) if option.kind == "host" else (host, value)
            else:
                out[option.field] = value
        return out

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

    HOST_OPTIONS: ClassVar[tuple[HostOption, ...]] = (
        HostOption("--host", "listen", "host"),
        HostOption("--port", "listen", "port", minimum=0, maximum=65535),
        HostOption("--state", "state_path", "path", written_when_default=False,
                   help="Sealed state file (default: under the smlaas cache)."))


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

    HOST_OPTIONS: ClassVar[tuple[HostOption, ...]] = (
        _COORDINATOR,
        HostOption("--listen", "listen", "address", metavar="HOST:PORT",
                   help="Where the previous role connects."),
        HostOption("--build", "sealed_dir", "path",
                   help="The sealed directory (plan.json and stage_K.sealed)."),
        HostOption("--threads", "threads", "int", minimum=1,
                   help="ONNX Runtime intra-op threads."),
        HostOption("--queue-size", "queue_size", "int", minimum=1,
                   help="Requests waiting here (and in flight downstream) before "
                        "back-pressure."),
        HostOption("--replica", "replica", "int", minimum=0, written_when_default=False,
                   help="Which replica of its stage this worker is: its slot in the "
                        "manifest's replicas (names its metrics)."),
        HostOption("--next", "next_stages", "addresses", metavar="HOST:PORT",
                   written_when_default=False,
                   help="The next stage's replicas, comma-separated (omit for the last "
                        "stage)."))


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
    max_connections_per_source: int = 64
    max_open_connections: int = 1024
    max_sequences_per_client: int = 0
    """A decoder's sequences one client address may generate at once (0: half the plan's
    --max-sequences, at least 1)."""
    labels_path: str = ""
    """Class labels for the classification extension, one per line ('' = none); the file
    must have the SHA-256 the manifest names."""

    @property
    def role(self) -> str:
        return GATEWAY_ROLE

    def measured_argv(self) -> list[str]:
        return [self.command, "--backend", self.backend, "--coordinator-mrenclave",
                self.coordinator_mrenclave]

    HOST_OPTIONS: ClassVar[tuple[HostOption, ...]] = (
        _COORDINATOR,
        HostOption("--first-stage", "first_stages", "addresses", metavar="HOST:PORT",
                   help="Stage 0's replicas, comma-separated."),
        HostOption("--host", "listen", "host", default="127.0.0.1"),
        HostOption("--port", "listen", "port", minimum=1, maximum=65535, default=8443),
        HostOption("--model-name", "model_name", help="The name clients use in "
                   "/v2/models/NAME."),
        HostOption("--max-batch-size", "max_batch_size", "int", minimum=0,
                   help="0: no batch dimension; N: batch up to N rows (the manifest's limit "
                        "is the ceiling)."),
        HostOption("--max-queue-delay-us", "max_queue_delay_us", "int", minimum=0,
                   help="How long a batch waits to fill."),
        HostOption("--max-inflight", "max_inflight", "int", minimum=1,
                   help="Batches in the pipeline at once."),
        HostOption("--request-timeout", "request_timeout_s", "float", minimum=0.1,
                   help="Seconds before a request is answered 504."),
        HostOption("--max-queue", "max_queue", "int", minimum=1,
                   help="Requests waiting for the pipeline before the gateway answers 503."),
        HostOption("--header-timeout", "header_timeout_s", "float", minimum=0.1,
                   help="Seconds a request's headers may take to arrive."),
        HostOption("--body-timeout", "body_timeout_s", "float", minimum=0.1,
                   help="Seconds a request's body may take after its headers."),
        HostOption("--grpc-port", "grpc_port", "int", minimum=0, maximum=65535,
                   help="Also serve the KServe V2 gRPC API here (0: no gRPC)."),
        HostOption("--max-connections-per-source", "max_connections_per_source", "int",
                   minimum=1, help="Open connections one client address may hold (past it, "
                   "its oldest idle one is closed)."),
        HostOption("--max-open-connections", "max_open_connections", "int", minimum=1,
                   help="Open connections in all."),
        HostOption("--max-sequences-per-client", "max_sequences_per_client", "int", minimum=0,
                   help="A decoder's sequences one client address may generate at once (0: "
                        "half the plan's --max-sequences, at least 1)."),
        HostOption("--labels", "labels_path", "path", written_when_default=False,
                   help="Class labels (one per line) for the classification extension; "
                        "must be the file whose SHA-256 the manifest names."))


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
