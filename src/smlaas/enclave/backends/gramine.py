"""The ``gramine`` backend: real SGX enclaves under Gramine (gramine-sgx).

NOT VERIFIED ON HARDWARE: our machines have no SGX. What is tested here is what can be tested
without it: the ``/dev/attestation`` file protocol against a directory standing in for
Gramine's pseudo-filesystem. The manifests that start a role under Gramine are written and
checked in :mod:`smlaas.deploy.gramine_manifests`.

Gramine's protocol (docs: "Attestation and Secret Provisioning"): write 64 bytes to
``/dev/attestation/user_report_data``, then read ``/dev/attestation/quote``; the MRENCLAVE-bound
sealing key is ``/dev/attestation/keys/_sgx_mrenclave`` (16 bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import dcap_qvl

from smlaas.enclave.verification import INTEL_ROOT, TrustedRoot, fetch_collateral
from smlaas.errors import AttestationError

ATTESTATION_DIR = Path("/dev/attestation")
PCCS_URL_ENV = "SMLAAS_PCCS_URL"
DEFAULT_PCCS_URL = "https://localhost:8081/sgx/certification/v4/"


class GramineBackend:
    """Quotes and sealing keys from inside a Gramine SGX enclave."""

    name = "gramine"

    def __init__(self, role: str, *, attestation_dir: Path = ATTESTATION_DIR) -> None:
        self.role = role
        self.attestation_dir = attestation_dir
        self._last_quote: bytes | None = None
        if not (attestation_dir / "quote").exists():
            raise AttestationError(f"{attestation_dir}/quote does not exist: not running inside "
                                   f"a Gramine SGX enclave with sgx.remote_attestation = "
                                   f"\"dcap\"")

    @property
    def simulated(self) -> bool:
        return False

    @property
    def trusted_root(self) -> TrustedRoot:
        return INTEL_ROOT

    def quote(self, report_data: bytes) -> bytes:
        if len(report_data) > 64:
            raise AttestationError(f"report_data is at most 64 bytes, got {len(report_data)}")
        (self.attestation_dir / "user_report_data").write_bytes(report_data.ljust(64, b"\0"))
        self._last_quote = (self.attestation_dir / "quote").read_bytes()
        return self._last_quote

    def collateral_json(self) -> str:
        """Collateral for the last quote, from the PCCS named by ``SMLAAS_PCCS_URL`` (default:
        the local PCCS of Intel's DCAP quote provider library)."""
        if self._last_quote is None:
            raise AttestationError("no quote has been made yet to fetch collateral for")
        return str(self.collateral_for(self._last_quote).to_json())

    def collateral_for(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        """From the PCCS named by ``SMLAAS_PCCS_URL`` (host-supplied: it can serve only
        Intel-signed collateral, whose age and evaluation number the policy bounds)."""
        return fetch_collateral(os.environ.get(PCCS_URL_ENV, DEFAULT_PCCS_URL), quote)

    def sealing_key(self, label: str) -> bytes:
        base = (self.attestation_dir / "keys" / "_sgx_mrenclave").read_bytes()
        return hmac.new(base, b"smlaas seal v1|" + label.encode(), hashlib.sha256).digest()
