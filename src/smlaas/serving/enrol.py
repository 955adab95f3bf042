"""How a pipeline role (stage or gateway) joins a deployment: it attests the coordinator whose
measurement it was built to trust, proves its own measurement with a quote binding its role,
a fresh key and the coordinator's nonce, and receives its role certificate (and, for a stage,
the key of its sealed sub-model, encrypted to that fresh key).

The coordinator's MRENCLAVE is part of each role's measured configuration
(:mod:`smlaas.roles`), so a role cannot be pointed at another coordinator without
changing its own measurement.
"""

from __future__ import annotations

import logging
import time

from smlaas.coordinator.client import CoordinatorClient, Registration, coordinator_policy
from smlaas.coordinator.protocol import RETRYABLE
from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.enclave.verification import INTEL_ROOT
from smlaas.errors import ConfigError, CoordinatorRefused, DeployError, ProtocolError

logger = logging.getLogger(__name__)
RETRY_PAUSE_S = 0.2


def check_replica_count(addresses: tuple[tuple[str, int], ...], role: str, allowed: int
                        ) -> None:
    """The host may give a role at most the manifest's replicas of the role it links to."""
    if len(addresses) > allowed:
        raise ConfigError(f"the host gave {len(addresses)} addresses for {role}; the owner's "
                          f"manifest has {allowed} replica(s) of it")


def enrol(coordinator: tuple[str, int], *, role: str, backend: EnclaveBackend,
          coordinator_mrenclave: str, hosts: list[str], slot: int = 0, hold: bool = False,
          deadline_s: float = 60.0) -> Registration:
    """Registers with the coordinator, waiting (until ``deadline_s``) while it is not up, has
    no manifest yet, our nonce expired, or our replica slot is still held by a predecessor;
    any other refusal is raised at once. A stage claims replica slot ``slot`` and, with
    ``hold``, keeps its registration connection as the lease (``Registration.lease``)."""
    roots = [INTEL_ROOT, backend.trusted_root] if backend.simulated else [INTEL_ROOT]
    client = CoordinatorClient(*coordinator, roots=roots, policy=coordinator_policy(
        coordinator_mrenclave, simulated=backend.simulated))
    end = time.monotonic() + deadline_s
    while True:
        try:
            registration = client.register(backend, role=role, hosts=hosts, slot=slot,
                                           hold=hold)
            logger.info("%s registered with the coordinator at %s:%d", role, *coordinator)
            return registration
        except CoordinatorRefused as err:
            if err.code not in RETRYABLE or time.monotonic() > end:
                raise
            reason = str(err)
        except (OSError, ProtocolError) as err:  # not up yet, restarting, or busy
            if time.monotonic() > end:
                raise DeployError(f"cannot reach the coordinator at {coordinator[0]}:"
                                  f"{coordinator[1]} within {deadline_s:.0f} s: {err}") from err
            reason = str(err)
        logger.debug("registration of %s not done yet (%s); retrying", role, reason)
        time.sleep(RETRY_PAUSE_S)
