"""How a pipeline role (stage or gateway) joins a deployment: it attests the coordinator whose
measurement it was built to trust, proves its own measurement with a quote, and receives its
role certificate (and, for a stage, the key of its sealed sub-model).

The coordinator's MRENCLAVE is part of each role's measured configuration, so a role cannot be
pointed at another coordinator without changing its own measurement.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from smlaas.coordinator.client import CoordinatorClient, Registration
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import INTEL_ROOT
from smlaas.errors import AttestationError, ConfigError

logger = logging.getLogger(__name__)
BACKENDS = ("sim", "gramine")
_RETRYABLE = ("no manifest is set yet", "unknown, used or expired nonce")


def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def role_config(coordinator_mrenclave: str) -> dict[str, Any]:
    """The measured configuration of a stage or gateway enclave."""
    return {"coordinator_mrenclave": coordinator_mrenclave}


def sim_coordinator_mrenclave() -> str:
    """What the sim coordinator of this installed code measures as."""
    from smlaas.enclave.measurement import measure

    return measure("coordinator").mrenclave.hex()


def create_backend(kind: str, role: str, config: dict[str, Any] | None = None
                   ) -> EnclaveBackend:
    if kind == "sim":
        from smlaas.enclave.backends.sim import SimBackend

        return SimBackend(role, config=config)
    if kind == "gramine":
        from smlaas.enclave.backends.gramine import GramineBackend

        return GramineBackend(role)
    raise ConfigError(f"unknown enclave backend {kind!r} (choose from {', '.join(BACKENDS)})")


def coordinator_policy(coordinator_mrenclave: str, *, simulated: bool) -> Policy:
    return Policy.from_dict({"allow_simulation_insecure": simulated,
                             "roles": {"coordinator": {"mrenclave": [coordinator_mrenclave]}}})


def enrol(coordinator: tuple[str, int], *, role: str, backend: EnclaveBackend,
          coordinator_mrenclave: str, hosts: list[str], deadline_s: float = 60.0
          ) -> Registration:
    """Registers with the coordinator, waiting (until ``deadline_s``) while it is not up or has
    no manifest yet; refusals of this enclave's evidence are raised at once."""
    roots = [INTEL_ROOT, backend.trusted_root] if backend.simulated else [INTEL_ROOT]
    client = CoordinatorClient(*coordinator, roots=roots, policy=coordinator_policy(
        coordinator_mrenclave, simulated=backend.simulated))
    end = time.monotonic() + deadline_s
    while True:
        try:
            registration = client.register(backend, role=role, hosts=hosts)
            logger.info("%s registered with the coordinator at %s:%d", role, *coordinator)
            return registration
        except (OSError, AttestationError) as err:
            retryable = isinstance(err, OSError) or any(r in str(err) for r in _RETRYABLE)
            if not retryable or time.monotonic() > end:
                if isinstance(err, OSError):
                    raise AttestationError(f"cannot reach the coordinator at "
                                           f"{coordinator[0]}:{coordinator[1]} within "
                                           f"{deadline_s:.0f} s: {err}") from err
                raise
            time.sleep(0.2)
