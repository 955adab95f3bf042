"""The smlaas client SDK.

>>> policy = Policy.from_toml("state/gateway-policy.toml")   # written by `smlaas deploy`
>>> with InferenceClient("https://127.0.0.1:8443", ca="state/ca.pem", policy=policy) as client:
...     outputs = client.infer({"input": x})   # the gateway is attested before this

The client pins the deployment CA (the gateway's HTTPS certificate must chain to it) and, by
default, attests the gateway before its first request: its quote must pass the policy and bind
the very key serving the connection (``attest=False`` skips it). The CA itself comes from
:func:`attest_coordinator`, which attests the coordinator first. :class:`AsyncInferenceClient`
has the same surface for asyncio. Errors, one tree in :mod:`smlaas.errors`:
``ServingError`` (with the HTTP status), ``TlsError``, ``RequestTimeout``, ``TransportError``,
``AttestationError``/``PolicyError``, ``ConfigError``.
"""

from __future__ import annotations

from smlaas.client.inference import AsyncInferenceClient, InferenceClient
from smlaas.coordinator.client import CoordinatorClient, Registration
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import TrustedRoot

__all__ = ["AsyncInferenceClient", "CoordinatorClient", "InferenceClient", "Registration",
           "attest_coordinator"]


def attest_coordinator(host: str, port: int, *, policy: Policy, roots: list[TrustedRoot],
                       timeout_s: float = 10.0) -> str:
    """Attests the coordinator and returns the deployment CA (PEM) to pin for the gateway."""
    return CoordinatorClient(host, port, policy=policy, roots=roots,
                             timeout_s=timeout_s).deployment_ca()
