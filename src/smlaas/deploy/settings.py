"""What a deployment is asked for: the owner's inputs and the serving layout (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlaas.coordinator.owner import default_owner_key_path
from smlaas.coordinator.release import DEFAULT_VALIDITY_S


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
    threads: int | None = None
    """ONNX Runtime threads per stage replica; None: on one machine (the local launcher) this
    machine's cores divided among the stage replicas and the gateway, so the default does not
    oversubscribe it; 1 per enclave on a cluster."""
    max_batch_size: int | None = None
    """None: what seal recorded (8 if the stages batch correctly, else 0); 0: off."""
    max_queue_delay_us: int = 500
    max_inflight: int | None = None
    """Batches in the pipeline at once; None: the number of stage replicas (one per replica,
    so each is busy; fewer in flight means fuller batches: on 2 shared cores, 3 stages served
    12.0/s with 3 in flight against 10.7/s with 4, ResNet-50, 16 clients)."""
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
    gateway_hosts: tuple[str, ...] = ()
    """Host names the owner lets the gateway's certificate carry, besides loopback and a
    non-wildcard ``host`` (the manifest names them; the host cannot add any)."""
    release_validity_s: int = DEFAULT_VALIDITY_S
    """How long the owner's release is valid (at most a day)."""
    coordinator_address: str | None = None
    """HOST:PORT clients can reach the coordinator at, named in the release (None: the
    address the owner attested it at)."""
    sim_root: Path | None = None
    """PEM of the simulation root to trust (sim backend; None: this machine's)."""
