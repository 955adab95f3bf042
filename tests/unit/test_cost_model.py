from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smlaas.errors import ConfigError
from smlaas.plan import CostModel, preset, to_toml_text
from smlaas.plan.cost_model import MIB


def test_presets_have_their_documented_values() -> None:
    sgx1, sgx2, native = preset("sgx1"), preset("sgx2"), preset("native")
    assert sgx1.usable_epc_mib == 93.5 and sgx1.compute_overhead == 1.2
    assert sgx1.transfer_ms(MIB) == pytest.approx(15.0)  # the seed's 15 ms per MiB
    assert sgx2.compute_overhead == 1.05 and sgx2.usable_epc_mib > 1024
    assert not native.enclave and native.enclave_time_ms(10.0, 10**12) == 10.0


def test_the_enclave_working_set_is_the_native_one_plus_the_libos_pages() -> None:
    """R (the runtime, measured natively) and L (the LibOS, only on hardware) together are the
    8 MiB assumed before R was measured; a calibrated R leaves L in place."""
    sgx1 = preset("sgx1")
    weights, activations = 40 * MIB, 6 * MIB
    native = sgx1.native_working_set_bytes(weights, activations)
    assert native == pytest.approx(46 * MIB + sgx1.runtime_overhead_mib * MIB)
    assert sgx1.working_set_bytes(weights, activations) == pytest.approx(54 * MIB)
    assert sgx1.overhead_bytes == 8 * MIB  # what split_budget leaves beside a node
    calibrated = sgx1.with_overrides({"runtime_overhead_mib": 3.85})
    assert calibrated.working_set_bytes(0, 0) == pytest.approx((3.85 + 4.0) * MIB)
    assert preset("native").working_set_bytes(weights, activations) == pytest.approx(46 * MIB)
    older_toml = {k: v for k, v in sgx1.to_dict().items() if k != "libos_overhead_mib"}
    assert CostModel.from_dict(older_toml).libos_overhead_mib == 4.0  # the preset's L


def test_paging_is_a_step_at_the_epc() -> None:
    sgx1 = preset("sgx1")
    epc = sgx1.usable_epc_bytes
    assert sgx1.paging_ms(epc) == 0.0
    above = float(sgx1.paging_ms(epc + 4096))
    pages = np.ceil((epc + 4096) / 4096)
    assert above == pytest.approx(pages * 40_000 / 3.0e6)
    assert sgx1.enclave_time_ms(10.0, epc + 4096) > 10 * sgx1.enclave_time_ms(10.0, epc)


def test_toml_round_trip_and_override(tmp_path: Path) -> None:
    model = preset("sgx2").with_overrides({"usable_epc_mib": 200.0, "cpu_ghz": 2.5})
    path = tmp_path / "cm.toml"
    path.write_text(to_toml_text(model, comments={"note": "test"}))
    assert CostModel.from_toml(path) == model
    partial = tmp_path / "partial.toml"
    partial.write_text("[cost_model]\nusable_epc_mib = 180\n")
    assert CostModel.from_toml(partial, base=preset("sgx1")).usable_epc_mib == 180.0


@pytest.mark.parametrize("text, message", [
    ("[cost_model]\nno_such = 1\n", "unknown cost model parameter"),
    ("[cost_model]\ncpu_ghz = 'fast'\n", "must be a number"),
    ("[cost_model]\ncpu_ghz = -1\n", "must be"),
    ("preset = 'sgx9'\n", "unknown cost model preset"),
    ("this is = = not toml", "not valid TOML"),
])
def test_bad_toml_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        CostModel.from_toml(path)
