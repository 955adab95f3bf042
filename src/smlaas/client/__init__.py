"""The smlaas client SDK.

>>> with InferenceClient("https://127.0.0.1:8443", ca="state/ca.pem") as client:
...     outputs = client.infer({"input": x})

The client pins the deployment CA: the gateway's HTTPS certificate must chain to it, so only
an enclave that the coordinator attested can answer. The CA itself comes from
:func:`attest_coordinator`, which attests the coordinator first; :meth:`InferenceClient.attest`
also checks the gateway's own quote and that it binds the very key serving this connection.
Errors: :class:`smlaas.errors.ServingError` (with the HTTP status) for refused requests,
:class:`smlaas.errors.AttestationError` (or its ``PolicyError``) for failed evidence.
"""

from __future__ import annotations

from smlaas.client.inference import InferenceClient
from smlaas.coordinator.client import CoordinatorClient, Registration
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import TrustedRoot

__all__ = ["CoordinatorClient", "InferenceClient", "Registration", "attest_coordinator"]


def attest_coordinator(host: str, port: int, *, policy: Policy, roots: list[TrustedRoot],
                       timeout_s: float = 10.0) -> str:
    """Attests the coordinator and returns the deployment CA (PEM) to pin for the gateway."""
    return CoordinatorClient(host, port, policy=policy, roots=roots,
                             timeout_s=timeout_s).deployment_ca()
