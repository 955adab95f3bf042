"""Fitting the working-set constants to measured stages, and the benchmark's summary (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smlaas.bench.working_set import markdown, summarise
from smlaas.plan import preset
from smlaas.profile.calibrate import MemorySample, fit_memory_constants
from smlaas.runtime.working_set import _kib_fields, unavailable_reason

MIB = 2**20


def _sample(weights_mib: float, activations_mib: float, measured_mib: float) -> MemorySample:
    return MemorySample("s", int(weights_mib * MIB), int(activations_mib * MIB),
                        int(measured_mib * MIB))


@settings(max_examples=50, deadline=None)
@given(k_w=st.floats(0.5, 3.0), runtime_mib=st.floats(0.0, 20.0))
def test_the_fit_recovers_the_constants_that_made_the_measurements(k_w: float,
                                                                   runtime_mib: float) -> None:
    samples = [_sample(w, a, k_w * w + a + runtime_mib)
               for w, a in [(6, 6), (38, 0.6), (55, 3), (1, 10), (120, 2)]]
    fit = fit_memory_constants(samples)
    assert fit.weight_factor == pytest.approx(k_w, rel=1e-3)
    assert fit.runtime_overhead_mib == pytest.approx(runtime_mib, abs=1e-2)
    assert fit.samples == 5


def test_the_fit_keeps_both_constants_non_negative() -> None:
    # Measured below the activations alone: the best runtime overhead would be negative.
    fit = fit_memory_constants([_sample(10, 5, 12), _sample(50, 5, 50), _sample(90, 5, 88)])
    assert fit.runtime_overhead_mib == 0.0 and 0.8 < fit.weight_factor < 1.0
    # Measured falling as weights grow: the best weight factor would be negative.
    fit = fit_memory_constants([_sample(10, 0, 30), _sample(50, 0, 20)])
    assert fit.weight_factor == 0.0 and 20 < fit.runtime_overhead_mib < 30


def test_the_fit_refuses_too_few_or_indistinct_stages() -> None:
    with pytest.raises(ValueError, match="at least two measured stages with different weight"):
        fit_memory_constants([_sample(10, 1, 20)])
    with pytest.raises(ValueError, match="got 2"):
        fit_memory_constants([_sample(10, 1, 20), _sample(10, 2, 21)])


def test_smaps_fields_are_summed_in_bytes(tmp_path) -> None:
    text = ("7f00-7f01 r-xp 00000000 00:00 0  /lib/x.so\nRss:   12 kB\nReferenced:   8 kB\n"
            "7f02-7f03 rw-p 00000000 00:00 0\nRss:    4 kB\nReferenced:   4 kB\nSwap: 0 kB\n")
    assert _kib_fields(text) == {"Referenced": 12 * 1024, "Rss": 16 * 1024}
    (tmp_path / "self").mkdir()
    assert "clear_refs does not exist" in (unavailable_reason(tmp_path) or "")
    (tmp_path / "self" / "clear_refs").write_text("")
    assert "no " in (unavailable_reason(tmp_path) or "")
    (tmp_path / "self" / "smaps").write_text(text)
    assert unavailable_reason(tmp_path) is None


def _stage(model: str, stage: int, weights: float, predicted: float, measured: float,
           family: str = "zoo") -> dict:
    return {"model": model, "family": family, "stage": stage, "nodes": 3,
            "touched_weight_mib": weights, "peak_activation_mib": 1.0,
            "predicted_mib": predicted, "measured_mib": measured, "rss_mib": 3 * measured,
            "peak_rss_mib": 4 * measured, "error": (predicted - measured) / measured,
            "over_epc_predicted_to_fit": measured > 93.5 >= predicted}


def _row(model: str, stages: list[dict], family: str = "zoo") -> dict:
    return {"model": model, "family": family, "stages": stages, "seconds": 1.0,
            "samples": [{"label": f"{model} stage {s['stage']}",
                         "touched_weight_bytes": int(s["touched_weight_mib"] * MIB),
                         "peak_activation_bytes": MIB,
                         "measured_bytes": int(s["measured_mib"] * MIB)} for s in stages]}


def test_the_summary_counts_stages_over_the_epc_that_were_predicted_to_fit() -> None:
    rows = [_row("a", [_stage("a", 0, 10, 19, 15), _stage("a", 1, 85, 94, 96)]),
            _row("b", [_stage("b", 0, 80, 89, 95, "q")], family="q"),
            _row("c", [_stage("c", 0, 30, 39, 33), _stage("c", 1, 2, 11, 6)]),
            {"model": "z", "family": "skl2onnx", "skipped": "refused by design"}]
    summary = summarise(rows, preset("sgx1"))
    assert summary["stage_count"] == 5 and summary["model_count"] == 3
    assert summary["over_epc_predicted_to_fit"] == ["b stage 0"]
    assert summary["worst_stage"] == "c stage 1"
    assert summary["worst_error"] == pytest.approx(5 / 6)
    assert summary["median_error"] == pytest.approx(6 / 33)  # of 2/96, 6/95, 6/33, 4/15, 5/6
    assert summary["skipped"] == {"z": "refused by design"}
    assert summary["median_error_exporters"] == pytest.approx(6 / 95)
    calibrated = summary["calibrated"]
    assert calibrated["median_error_in_sample"] < summary["median_error"]
    assert calibrated["median_error_leave_one_model_out"] is not None
    text = markdown({"summary": summary, "models": rows})
    assert "| b | q | 0 | 80.0 | 1.0 | 89.0 | 95.0 **over EPC, predicted to fit** |" in text
    assert "measured above the usable EPC (93.5 MiB) while predicted to fit: 1 (b stage 0)" \
        in text
    assert "| z | skl2onnx | - |" in text and "skipped: refused by design" in text
