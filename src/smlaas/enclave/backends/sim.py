"""The simulated quoting enclave: real-format DCAP v3 quotes under the simulation root.

INSECURE by construction: the "enclave" is an ordinary process and the quoting key lives on
disk. It exists so that every other part of smlaas (verification, policy, key release, TLS)
runs the same code with or without SGX hardware. Every quote it makes verifies only against
the simulation root, which the default policy refuses.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
from pathlib import Path

import dcap_qvl
from cryptography.hazmat.primitives.asymmetric import ec

from smlaas.enclave.quote import (
    ATTESTATION_KEY_ECDSA_P256,
    CERT_DATA_PCK_CHAIN,
    INTEL_QE_VENDOR_ID,
    QUOTE_VERSION_SGX,
)
from smlaas.enclave.sim_pki import (
    SIM_CPU_SVN,
    SIM_PCE_SVN,
    SIM_QE_MRSIGNER,
    SIM_QE_PROD_ID,
    SIM_QE_SVN,
    SIM_TCB_SIGNER,
    SimulationPKI,
    raw_signature,
)
from smlaas.enclave.verification import TrustedRoot

logger = logging.getLogger(__name__)

# SGX attribute flags: INIT | MODE64BIT, plus DEBUG when asked; XFRM x87 | SSE.
_FLAGS_INIT_MODE64 = 0x05
_FLAG_DEBUG = 0x02
_XFRM = 0x03
_QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
_WARNED = False


def report_body(*, mrenclave: bytes, mrsigner: bytes, isv_prod_id: int, isv_svn: int,
                report_data: bytes, attributes: bytes, cpu_svn: bytes = SIM_CPU_SVN) -> bytes:
    """An SGX report body (384 bytes) in the layout of Intel's sgx_report_body_t."""
    if len(report_data) > 64:
        raise ValueError(f"report_data is at most 64 bytes, got {len(report_data)}")
    body = (cpu_svn + struct.pack("<I", 0) + bytes(28) + attributes + mrenclave.ljust(32, b"\0")
            + bytes(32) + mrsigner.ljust(32, b"\0") + bytes(96)
            + struct.pack("<HH", isv_prod_id, isv_svn) + bytes(60)
            + report_data.ljust(64, b"\0"))
    assert len(body) == 384
    return body


class SimQuotingEnclave:
    """Makes quotes for simulated enclaves with one attestation key per instance."""

    def __init__(self, pki: SimulationPKI) -> None:
        self.pki = pki
        self._attestation_key = ec.generate_private_key(ec.SECP256R1())
        _warn_once()

    @property
    def trusted_root(self) -> TrustedRoot:
        return simulation_root(self.pki)

    def quote(self, *, mrenclave: bytes, mrsigner: bytes, report_data: bytes,
              isv_prod_id: int = 0, isv_svn: int = 0, debug: bool = False) -> bytes:
        flags = _FLAGS_INIT_MODE64 | (_FLAG_DEBUG if debug else 0)
        attributes = flags.to_bytes(8, "little") + _XFRM.to_bytes(8, "little")
        header = (struct.pack("<HHIHH", QUOTE_VERSION_SGX, ATTESTATION_KEY_ECDSA_P256, 0,
                              SIM_QE_SVN, SIM_PCE_SVN) + INTEL_QE_VENDOR_ID + bytes(20))
        body = report_body(mrenclave=mrenclave, mrsigner=mrsigner, isv_prod_id=isv_prod_id,
                           isv_svn=isv_svn, report_data=report_data, attributes=attributes)
        numbers = self._attestation_key.public_key().public_numbers()
        attestation_key = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
        qe_auth = bytes(range(32))  # what Intel's QE puts there; dcap-qvl requires 32 bytes
        qe_body = report_body(
            mrenclave=hashlib.sha256(b"smlaas simulated QE").digest(), mrsigner=SIM_QE_MRSIGNER,
            isv_prod_id=SIM_QE_PROD_ID, isv_svn=SIM_QE_SVN, attributes=_QE_ATTRIBUTES,
            report_data=hashlib.sha256(attestation_key + qe_auth).digest())
        cert_data = self.pki.pck_chain_pem()
        signature_data = (
            raw_signature(self._attestation_key, header + body) + attestation_key + qe_body
            + raw_signature(self.pki.pck_key, qe_body) + struct.pack("<H", len(qe_auth))
            + qe_auth + struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(cert_data)) + cert_data)
        return header + body + struct.pack("<I", len(signature_data)) + signature_data


class SimBackend:
    """The ``sim`` enclave backend for one role (see the module docstring: INSECURE)."""

    name = "sim"

    def __init__(self, role: str, *, config: dict | None = None,
                 pki_dir: Path | None = None) -> None:
        from smlaas.enclave.measurement import measure

        self.role = role
        self.pki_dir = pki_dir or default_pki_dir()
        self.pki = SimulationPKI.load_or_create(self.pki_dir)
        self.quoting_enclave = SimQuotingEnclave(self.pki)
        self.measurement = measure(role, config)

    @property
    def simulated(self) -> bool:
        return True

    @property
    def trusted_root(self) -> TrustedRoot:
        return self.quoting_enclave.trusted_root

    def quote(self, report_data: bytes) -> bytes:
        return self.quoting_enclave.quote(mrenclave=self.measurement.mrenclave,
                                          mrsigner=self.measurement.mrsigner,
                                          report_data=report_data)

    def collateral_json(self) -> str:
        return self.pki.collateral().to_json()

    def collateral_for(self, quote: bytes) -> dcap_qvl.QuoteCollateralV3:
        """Fresh collateral of the simulation PCS (every sim quote is of one platform)."""
        return self.pki.collateral()

    def sealing_key(self, label: str) -> bytes:
        """Like SGX's MRENCLAVE-policy sealing key: a platform secret (here a 0600 file next
        to the simulation PKI) mixed with the measurement, so other code cannot derive it."""
        secret_file = self.pki_dir / "sealing-root.key"
        if not secret_file.is_file():
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(os.urandom(32))
        return hmac.new(secret_file.read_bytes(),
                        b"smlaas seal v1|" + self.measurement.mrenclave + label.encode(),
                        hashlib.sha256).digest()


def _warn_once() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        logger.warning("SIMULATED SGX: quotes from this process prove nothing about hardware "
                       "(sim backend, INSECURE)")


def simulation_root(pki: SimulationPKI) -> TrustedRoot:
    return TrustedRoot(name="smlaas SIMULATION root (INSECURE)", der=pki.root_der,
                       simulated=True, tcb_signer=SIM_TCB_SIGNER)


def simulation_root_from_pem(path: Path) -> TrustedRoot:
    """The simulation root in the PEM file ``path`` (e.g. the one baked into a Kubernetes
    image: ``smlaas attest sim-root``), to trust exactly that root and no other."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from smlaas.errors import ConfigError

    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a PEM certificate (the simulation root): {err}") \
            from err
    return TrustedRoot(name="smlaas SIMULATION root (INSECURE)",
                       der=certificate.public_bytes(serialization.Encoding.DER),
                       simulated=True, tcb_signer=SIM_TCB_SIGNER)


def known_roots() -> list[TrustedRoot]:
    """Intel's root, and this machine's simulation root if one was ever created (a policy
    must still allow simulation explicitly for it to count)."""
    from smlaas.enclave.verification import INTEL_ROOT

    roots = [INTEL_ROOT]
    if (default_pki_dir() / "root.pem").is_file():
        roots.append(simulation_root(SimulationPKI.load(default_pki_dir())))
    return roots


def default_pki_dir() -> Path:
    from smlaas.paths import cache_dir

    return cache_dir() / "sim-pki"
