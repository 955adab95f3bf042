"""What every enclave backend provides (``sim`` and ``gramine`` implement it)."""

from __future__ import annotations

from typing import Protocol

import dcap_qvl

from smlaas.enclave.verification import TrustedRoot


class EnclaveBackend(Protocol):
    """The enclave a process runs in, as the rest of smlaas sees it."""

    name: str
    role: str

    @property
    def simulated(self) -> bool: ...

    @property
    def trusted_root(self) -> TrustedRoot:
        """The root this backend's quotes chain to."""
        ...

    def quote(self, report_data: bytes) -> bytes:
        """A quote of this enclave whose report_data is ``report_data`` (<= 64 bytes)."""
        ...

    def collateral_json(self) -> str:
        """Collateral to verify this backend's own quotes (dcap-qvl JSON layout), for
        RA-TLS certificates."""
        ...

    def collateral_for(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        """Collateral for any quote of this backend's platforms, from this backend's own
        source (the coordinator's default for registrants' quotes)."""
        ...

    def sealing_key(self, label: str) -> bytes:
        """A 32-byte key only an enclave with this measurement on this platform derives."""
        ...
