"""Enclave backends: ``sim`` (development, CI, the demo) and ``gramine`` (real SGX), behind
one interface (:class:`~smlaas.enclave.backends.base.EnclaveBackend`)."""

from __future__ import annotations

from typing import Any

from smlaas.enclave.backends.base import EnclaveBackend
from smlaas.errors import ConfigError

BACKENDS = ("sim", "gramine")


def create_backend(kind: str, role: str, config: dict[str, Any] | None = None
                   ) -> EnclaveBackend:
    """The enclave this process runs in; for ``sim``, measured over ``config``."""
    if kind == "sim":
        from smlaas.enclave.backends.sim import SimBackend

        return SimBackend(role, config=config)
    if kind == "gramine":
        from smlaas.enclave.backends.gramine import GramineBackend

        return GramineBackend(role)
    raise ConfigError(f"unknown enclave backend {kind!r} (choose from {', '.join(BACKENDS)})")
