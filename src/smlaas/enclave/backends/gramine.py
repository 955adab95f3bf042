"""The ``gramine`` backend: real SGX enclaves under Gramine (gramine-sgx).

NOT VERIFIED ON HARDWARE: our machines have no SGX. What is tested here is what can be tested
without it: the manifest smlaas renders, and the ``/dev/attestation`` file protocol against a
directory standing in for Gramine's pseudo-filesystem.

Gramine's protocol (docs: "Attestation and Secret Provisioning"): write 64 bytes to
``/dev/attestation/user_report_data``, then read ``/dev/attestation/quote``; the MRENCLAVE-bound
sealing key is ``/dev/attestation/keys/_sgx_mrenclave`` (16 bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import sys
import sysconfig
from pathlib import Path

import dcap_qvl

from smlaas.enclave.verification import INTEL_ROOT, TrustedRoot, fetch_collateral
from smlaas.errors import AttestationError, ConfigError

ATTESTATION_DIR = Path("/dev/attestation")
MIB = 1024 * 1024
# Python, ONNX Runtime and smlaas itself, before any model: a conservative allowance for the
# enclave size (virtual, not EPC); measure on hardware and adjust.
RUNTIME_ALLOWANCE_MIB = 512
MIN_ENCLAVE_MIB = 1024
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


def enclave_size_mib(working_set_bytes: int) -> int:
    """``sgx.enclave_size``: a power of two holding the stage's working set and the runtime."""
    needed = working_set_bytes / MIB + RUNTIME_ALLOWANCE_MIB
    return max(MIN_ENCLAVE_MIB, 2 ** math.ceil(math.log2(needed)))


def render_manifest(*, role: str, argv: list[str], enclave_size_mib: int,
                    mounts: dict[str, Path], passthrough_env: list[str],
                    fixed_env: dict[str, str] | None = None, max_threads: int = 32,
                    debug: bool = False) -> str:
    """A Gramine manifest template (``gramine-manifest`` fills ``{{ gramine.* }}``).

    ``argv`` is the role's measured command line (``loader.argv``: fixed by the measurement,
    never taken from the host); ``passthrough_env`` names the host-chosen settings
    (addresses, threads) that the host may pass in, and ``fixed_env`` values the manifest
    fixes. Trusted files: the Python interpreter, its standard library and site-packages
    (smlaas, ONNX Runtime, ...), so the measurement covers the code. ``mounts`` (enclave path
    -> host directory: the sealed stages, the coordinator's sealed state) are ``allowed``, not
    trusted: smlaas authenticates what it reads there itself (AES-GCM under keys only this
    measurement obtains).
    """
    if role.startswith("-") or not role:
        raise ConfigError(f"bad role {role!r}")
    python = Path(sys.executable).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    prefix = Path(sys.prefix).resolve()
    # -I: isolated mode, so neither the working directory nor PYTHON* variables reach sys.path
    argv_toml = ", ".join(_toml_string(a) for a in ["python3", "-I", "-m", "smlaas", *argv])
    env_lines = [f"loader.env.{name} = {_toml_string(value)}"
                 for name, value in {**(fixed_env or {}), "SMLAAS_ROLE": role}.items()]
    env_lines += [f"loader.env.{name} = {{ passthrough = true }}"
                  for name in passthrough_env if name not in (fixed_env or {})]
    mount_lines = "".join(f'  {{ path = "{inside}", uri = "file:{outside.resolve()}" }},\n'
                          for inside, outside in mounts.items())
    allowed = "".join(f'  "file:{outside.resolve()}/",\n' for outside in mounts.values())
    return f"""# smlaas {role}: Gramine manifest template (render with gramine-manifest, sign with
# gramine-sgx-sign). Generated by `smlaas gramine manifest`. NOT VERIFIED ON SGX HARDWARE.
# loader.argv is this role's measured configuration; the host may set only the passthrough
# variables below (where the role runs, not what it trusts).
libos.entrypoint = "{python}"
loader.entrypoint.uri = "file:{{{{ gramine.libos }}}}"
loader.log_level = "error"
loader.argv = [{argv_toml}]
loader.env.LD_LIBRARY_PATH = "/lib:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu"
loader.env.OMP_NUM_THREADS = "1"
{chr(10).join(env_lines)}

fs.mounts = [
  {{ path = "/lib", uri = "file:{{{{ gramine.runtimedir() }}}}" }},
  {{ path = "/usr", uri = "file:/usr" }},
  {{ path = "{prefix}", uri = "file:{prefix}" }},
{mount_lines}  {{ type = "tmpfs", path = "/tmp" }},
]

sgx.debug = {"true" if debug else "false"}
sgx.edmm_enable = false
sgx.enclave_size = "{enclave_size_mib}M"
sgx.max_threads = {max_threads}
sgx.remote_attestation = "dcap"
sgx.isvprodid = 1
sgx.isvsvn = 1

sgx.trusted_files = [
  "file:{{{{ gramine.libos }}}}",
  "file:{{{{ gramine.runtimedir() }}}}/",
  "file:{python}",
  "file:{stdlib}/",
  "file:{purelib}/",
  "file:/lib/x86_64-linux-gnu/",
  "file:/usr/lib/x86_64-linux-gnu/",
]
sgx.allowed_files = [
{allowed}]
"""


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
