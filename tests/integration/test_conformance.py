"""ONNX's own backend test suite through the partitioned chain (a stage per node) against
plain ONNX Runtime: every test ONNX Runtime passes passes through the chain, or a known limit
explains why (the whole suite takes ~25 s, so CI runs all of it)."""

from __future__ import annotations

import onnxruntime as ort
import onnxruntime.backend as ort_backend

from smlaas.conformance.backend import chain_backend
from smlaas.conformance.report import explain
from smlaas.conformance.suite import compare, list_tests, run_suite


def test_chain_passes_what_onnxruntime_passes_or_a_known_limit_explains() -> None:
    ort.set_default_logger_severity(3)
    names = list_tests()
    assert len(names) > 1500
    result = compare(ort_backend, chain_backend("every"), names)
    grouped, unexplained = explain(result)
    assert not unexplained, unexplained
    assert result.reference_passed > 1500
    assert result.chain_passed >= result.reference_passed - 40
    assert sum(len(v) for v in grouped.values()) == len(result.regressions)


def test_cut_related_limits_pass_with_two_stages() -> None:
    """The fp16 and If limits come from cutting after every node: with one cut in the middle
    the same tests pass; folded constant outputs pass either way."""
    ort.set_default_logger_severity(3)
    cut_dependent = ["test_affine_grid_3d_expanded_cpu",
                     "test_attention_4d_causal_fp16_expanded_cpu"]
    middle = run_suite(chain_backend("middle"), cut_dependent)
    assert all(o.status == "passed" for o in middle.values()), middle
    every = run_suite(chain_backend("every"), ["test_shape_cpu", "test_constant_cpu"])
    assert all(o.status == "passed" for o in every.values()), every


def test_planner_cuts_mode_runs_the_partition_jobs_cuts() -> None:
    ort.set_default_logger_severity(3)
    names = list_tests(r"test_(layer_normalization_2d_axis0_expanded|softmax_example_expanded|"
                       r"operator_mm|gemm_all_attributes)_cpu$")
    assert len(names) >= 3
    result = compare(ort_backend, chain_backend("planner"), names)
    assert result.chain_passed == result.reference_passed, result.regressions
