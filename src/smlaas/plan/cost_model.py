"""The SGX cost model: predicted enclave time of a stage and transfer time of a cut (pure).

Enclave time of a segment with native time T and working set M on usable EPC E::

    T_enc = alpha * T + transitions + paging(M)
    paging(M) = 0                                         if M <= E
              = ceil(M / 4 KiB) * page_swap_cycles / f     otherwise

Above the EPC, a DNN sweeps its whole working set once per inference; with LRU-like eviction
every page of a working set larger than the EPC faults once per sweep, so paging costs one
swap per page of M (see NOTE_PAGING). Transfer of a cut carrying B bytes::

    transfer = hop_latency + B / network_rate + B / aead_rate

Every default below names its source. Measured values override them through a TOML file
(``CostModel.from_toml``), e.g. one written by ``smlaas calibrate``.

NOTE_PAGING: this is deliberately a step function, as in the seed's model. Real EPC paging
under Linux evicts in batches and may keep part of a working set resident, so the true cost
just above E is lower; the model is pessimistic there and exact in the regime that matters
(working sets several times E page on every layer).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from smlaas.errors import ConfigError

MIB = 1024 * 1024
PAGE_BYTES = 4096


@dataclass(frozen=True)
class CostModel:
    """Parameters of the cost model. Units are in the names."""

    preset: str
    enclave: bool
    usable_epc_mib: float
    compute_overhead: float
    weight_factor: float
    runtime_overhead_mib: float
    """R: pages of the process's runtime (interpreter, ONNX Runtime, numpy) touched per
    inference, as a native measurement sees them."""
    libos_overhead_mib: float
    """L: pages the library OS adds inside an enclave, which no native measurement sees."""
    page_swap_cycles: float
    transition_cycles: float
    transitions_per_inference: float
    cpu_ghz: float
    hop_latency_ms: float
    network_mib_per_s: float
    aead_mib_per_s: float

    # -- formulas ------------------------------------------------------------------------
    @property
    def usable_epc_bytes(self) -> float:
        return self.usable_epc_mib * MIB

    @property
    def overhead_bytes(self) -> float:
        """R + L: what an enclave holds besides a stage's weights and activations."""
        return (self.runtime_overhead_mib + self.libos_overhead_mib) * MIB

    def working_set_bytes(self, touched_weight_bytes: Any, peak_activation_bytes: Any) -> Any:
        """M = k_w * W + A + R + L, the enclave's (works on scalars and numpy arrays); a
        decoder's stage adds its KV cache and a step's pasts and presents
        (:func:`smlaas.plan.costs.segment_costs`)."""
        return (self.native_working_set_bytes(touched_weight_bytes, peak_activation_bytes)
                + self.libos_overhead_mib * MIB)

    def native_working_set_bytes(self, touched_weight_bytes: Any,
                                 peak_activation_bytes: Any) -> Any:
        """k_w * W + A + R: the part of M a native measurement sees (no LibOS pages)."""
        return (self.weight_factor * np.asarray(touched_weight_bytes, dtype=float)
                + np.asarray(peak_activation_bytes, dtype=float)
                + self.runtime_overhead_mib * MIB)

    def paging_ms(self, working_set_bytes: Any) -> Any:
        ws = np.asarray(working_set_bytes, dtype=float)
        if not self.enclave:
            return np.zeros_like(ws)
        pages = np.ceil(ws / PAGE_BYTES)
        swap_ms = pages * self.page_swap_cycles / (self.cpu_ghz * 1e6)
        return np.where(ws > self.usable_epc_bytes, swap_ms, 0.0)

    def transitions_ms(self) -> float:
        if not self.enclave:
            return 0.0
        return self.transitions_per_inference * self.transition_cycles / (self.cpu_ghz * 1e6)

    def enclave_time_ms(self, native_ms: Any, working_set_bytes: Any) -> Any:
        """Predicted time of a stage inside an enclave (native time if ``enclave`` is off)."""
        native = np.asarray(native_ms, dtype=float)
        if not self.enclave:
            return native
        return (self.compute_overhead * native + self.transitions_ms()
                + self.paging_ms(working_set_bytes))

    def transfer_ms(self, nbytes: Any) -> Any:
        """Predicted time to move ``nbytes`` between two stages (or client and stage)."""
        b = np.asarray(nbytes, dtype=float) / MIB
        aead = b / self.aead_mib_per_s * 1000.0 if self.aead_mib_per_s > 0 else 0.0
        return self.hop_latency_ms + b / self.network_mib_per_s * 1000.0 + aead

    # -- data ----------------------------------------------------------------------------
    def validate(self) -> list[str]:
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and (math.isnan(value) or value < 0):
                problems.append(f"{f.name} must be a number >= 0, got {value}")
        for name in ("usable_epc_mib", "cpu_ghz", "network_mib_per_s", "compute_overhead"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown cost model parameter(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        base = preset(str(data.get("preset", "sgx1")))
        return base.with_overrides({k: v for k, v in data.items() if k != "preset"})

    def with_overrides(self, overrides: dict[str, Any]) -> CostModel:
        types = {f.name: f.type for f in fields(self)}
        clean: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in types:
                raise ConfigError(f"unknown cost model parameter {name!r}; known: "
                                  f"{', '.join(sorted(types))}")
            if types[name] in ("float", float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"cost model parameter {name} must be a number, got "
                                      f"{value!r}")
                value = float(value)
            elif types[name] in ("bool", bool) and not isinstance(value, bool):
                raise ConfigError(f"cost model parameter {name} must be true or false")
            clean[name] = value
        model = replace(self, **clean)
        problems = model.validate()
        if problems:
            raise ConfigError("invalid cost model: " + "; ".join(problems))
        return model

    @classmethod
    def from_toml(cls, path: str | Path, *, base: CostModel | None = None) -> CostModel:
        """Reads ``[cost_model]`` (or top-level keys) from a TOML file onto ``base`` or onto
        the file's own ``preset``."""
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"cost model file {file} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"cost model file {file} is not valid TOML: {err}") from err
        table = data.get("cost_model", data)
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: [cost_model] must be a table")
        table = {k: v for k, v in table.items() if not isinstance(v, dict)}
        start = preset(str(table.pop("preset", data.get("preset", "")))) \
            if ("preset" in table or "preset" in data) else (base or preset("sgx1"))
        return start.with_overrides(table)


# -- presets -------------------------------------------------------------------------------
# Sources:
# [SGX-EPC]  SGX v1 reserves 128 MiB of PRM, of which about 93.5 MiB is usable EPC (the rest
#            holds SGX metadata such as the EPCM); the seed's figure, recorded in
#            ARCHITECTURE.md, and the ~93 MB commonly reported in SGX papers.
# [ELEOS]    Orenbach et al., "Eleos", EuroSys 2017: an EPC page fault (evict + reload,
#            encrypted) costs about 40,000 cycles.
# [HOTCALLS] Weisse et al., "Regaining Lost Cycles with HotCalls", ISCA 2017: an ECALL costs
#            about 8,600 cycles and an OCALL about 8,200 on Skylake.
# [SEED]     The research prototype this project rebuilds: compute inside the EPC ~1.2x native
#            and 15 ms per MiB moved between its SGX machines (network + TLS), as recorded in
#            ARCHITECTURE.md.
# [10GBE]    10 Gb/s Ethernet line rate = 1250 MB/s = 1192 MiB/s; we take 1100 MiB/s for
#            TCP/IP framing, and 50 us one-way latency within a rack.
# [ASSUMED]  No published figure fits; a stated assumption to be replaced by measurement on a
#            real SGX machine (TOML override).

_SGX1 = CostModel(
    preset="sgx1",
    enclave=True,
    usable_epc_mib=93.5,  # [SGX-EPC]
    compute_overhead=1.2,  # [SEED]
    # k_w and R are what a native measurement sees; `smlaas calibrate` fits both to this
    # machine's. [WS-BENCH] `smlaas bench working-set` (BENCHMARKS.md), 93 stages of 39
    # models measured natively (W counts constant-folded outputs and fp16 weights widened to
    # fp32, as ORT's CPU provider holds them: NOTE_SESSION_CONSTANTS in
    # graph/session_constants.py): least squares gave k_w 0.99 and R 3.85 MiB; a stage holding
    # almost nothing touches 3.3 to 6.9 MiB. L is what a LibOS (Gramine) adds inside the
    # enclave, which only SGX hardware can measure: R + L is the 8 MiB assumed before R was
    # measured.
    weight_factor=1.0,  # [ASSUMED] ONNX Runtime keeps one copy of each initializer
    runtime_overhead_mib=4.0,  # [WS-BENCH] runtime pages touched per inference, natively
    libos_overhead_mib=4.0,  # [ASSUMED] the LibOS's own pages; measure on SGX hardware
    page_swap_cycles=40_000.0,  # [ELEOS]
    transition_cycles=8_600.0,  # [HOTCALLS]
    transitions_per_inference=8.0,  # [ASSUMED] recv + send syscalls on two TLS streams
    cpu_ghz=3.0,  # [ASSUMED] typical SGX1 Xeon E3 / Core clock; calibrate reads the real one
    hop_latency_ms=0.0,  # [SEED] included in its 15 ms per MiB
    network_mib_per_s=1000.0 / 15.0,  # [SEED] 15 ms per MiB
    aead_mib_per_s=0.0,  # [SEED] its 15 ms per MiB already includes TLS; 0 = no extra term
)

_SGX2 = replace(
    _SGX1,
    preset="sgx2",
    usable_epc_mib=64 * 1024.0,  # Ice Lake Xeon: up to 512 GiB per socket; 64 GiB is common
    compute_overhead=1.05,  # ARCHITECTURE.md: "alpha about 1.05" (no MEE integrity tree)
    hop_latency_ms=0.05,  # [10GBE]
    network_mib_per_s=1100.0,  # [10GBE]
    aead_mib_per_s=1024.0,  # [ASSUMED] AES-256-GCM with AES-NI, one core, conservative
)

_NATIVE = replace(
    _SGX2,
    preset="native",
    enclave=False,
    usable_epc_mib=float(2**20),  # no EPC: effectively unlimited
    compute_overhead=1.0,
    runtime_overhead_mib=0.0,
    libos_overhead_mib=0.0,
    transitions_per_inference=0.0,
    aead_mib_per_s=0.0,  # no encryption
)

PRESETS: dict[str, CostModel] = {m.preset: m for m in (_SGX1, _SGX2, _NATIVE)}


def preset(name: str) -> CostModel:
    """The named preset (``sgx1``, ``sgx2``, ``native``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown cost model preset {name!r}; choose one of "
                          f"{', '.join(PRESETS)}") from None


def to_toml_text(model: CostModel, *, comments: dict[str, str] | None = None) -> str:
    """A TOML document that :meth:`CostModel.from_toml` reads back to ``model``."""
    import tomli_w

    body = tomli_w.dumps({"cost_model": model.to_dict()})
    header = "".join(f"# {key}: {text}\n" for key, text in (comments or {}).items())
    return header + body
