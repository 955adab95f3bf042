"""The smlaas client SDK (public surface; serving calls arrive with the gateway).

>>> ca_pem = attest_coordinator("coordinator.example", 7443, policy=policy, roots=roots)

Raises :class:`smlaas.errors.AttestationError` (or its ``PolicyError``) when the coordinator's
evidence does not satisfy ``policy``; nothing is sent to it before that check passes.
"""

from __future__ import annotations

from smlaas.coordinator.client import CoordinatorClient, Registration
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import TrustedRoot

__all__ = ["CoordinatorClient", "Registration", "attest_coordinator"]


def attest_coordinator(host: str, port: int, *, policy: Policy, roots: list[TrustedRoot],
                       timeout_s: float = 10.0) -> str:
    """Attests the coordinator and returns the deployment CA (PEM) to pin for the gateway."""
    return CoordinatorClient(host, port, policy=policy, roots=roots,
                             timeout_s=timeout_s).deployment_ca()
