"""float16 verification against the model's own noise (issue 21, item 5): a correct chain
whose cut rounding a LayerNorm amplifies passes, a changed weight still fails, float32 keeps
its exact tolerance and runs nothing more, and ``smlaas verify --json`` prints its report on
a mismatch too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import smlaas.export.verify as verify_module
import smlaas.runtime.stage_runner as stage_runner_module
from smlaas.cli.main import EXIT_FAILED, main
from smlaas.export import StageExtractor, verify_chain
from smlaas.export.tolerance import NOISE_FACTOR, Tolerance
from smlaas.graph import ModelGraph, prepare_model
from tests.builds import chain_build
from tests.models import chain_model

WIDTH = 64
SHAPES = {"x": (4, WIDTH)}
OFFSET = 30.0
"""A common offset of the activations before the LayerNorm: float16 rounds them in steps of
2**-6, which the LayerNorm scales up by 1/std."""


def _array(name: str, values: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(values.astype(np.float16), name)


def offset_layer_norm_model() -> onnx.ModelProto:
    """A float16 dense layer (erf GELU) with a large common offset feeding a LayerNorm and a
    head, as onnxconverter-common's float16 converter writes it (``keep_io_types``: float32
    graph I/O, Cast nodes at both ends), built directly so the test needs no converter."""
    rng = np.random.default_rng(0)
    inits = [
        _array("w", rng.standard_normal((WIDTH, WIDTH)) * 1.5 / WIDTH**0.5),
        _array("bias", rng.standard_normal(WIDTH) * 0.1 + OFFSET),
        _array("gamma", rng.standard_normal(WIDTH) * 0.1 + 1.0),
        _array("beta", rng.standard_normal(WIDTH) * 0.1),
        _array("head", rng.standard_normal((WIDTH, WIDTH)) / WIDTH**0.5),
        _array("sqrt2", np.array(2**0.5)), _array("one", np.array(1.0)),
        _array("half", np.array(0.5)),
    ]
    node = helper.make_node
    nodes = [
        node("Cast", ["x"], ["x16"], name="graph_input_cast0", to=TensorProto.FLOAT16),
        node("MatMul", ["x16", "w"], ["m"], name="dense"),
        node("Add", ["m", "bias"], ["a"], name="dense_bias"),
        node("Div", ["a", "sqrt2"], ["gd"], name="gelu_div"),
        node("Erf", ["gd"], ["ge"], name="gelu_erf"),
        node("Add", ["ge", "one"], ["g1"], name="gelu_add"),
        node("Mul", ["a", "g1"], ["gm"], name="gelu_mul"),
        node("Mul", ["gm", "half"], ["gelu"], name="gelu_half"),
        node("LayerNormalization", ["gelu", "gamma", "beta"], ["ln"], name="layer_norm",
             axis=-1, epsilon=1e-5),
        node("MatMul", ["ln", "head"], ["logits16"], name="head"),
        node("Softmax", ["logits16"], ["probs16"], name="softmax", axis=-1),
        node("Cast", ["logits16"], ["logits"], name="graph_output_cast0", to=TensorProto.FLOAT),
        node("Cast", ["probs16"], ["probs"], name="graph_output_cast1", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "offset_layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", WIDTH])
         for name in ("logits", "probs")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _two_stages(model: onnx.ModelProto, first_of_second: str) -> list[onnx.ModelProto]:
    prepared = prepare_model(model, SHAPES)
    graph = ModelGraph(prepared)
    cut = next(k for k, n in enumerate(graph.nodes) if n.name == first_of_second)
    extractor = StageExtractor(prepared, graph)
    return [extractor.extract(0, cut, name="s0"),
            extractor.extract(cut, graph.node_count, name="s1")]


@pytest.fixture(scope="module")
def before_layer_norm() -> tuple[onnx.ModelProto, list[onnx.ModelProto]]:
    model = offset_layer_norm_model()
    return model, _two_stages(model, "layer_norm")


def test_a_cut_the_layer_norm_amplifies_passes_within_the_model_s_own_noise(
        before_layer_norm, monkeypatch: pytest.MonkeyPatch) -> None:
    model, stages = before_layer_norm
    report = verify_chain(model, stages, SHAPES, threads=1, seeds=(0, 1), served=False)
    assert report.ok, report.summary()
    logits = report.tolerances["logits"]
    assert logits.noise is not None and logits.noise.spread > 0
    # The chain's error needs the derived atol: it is beyond ten ulps plus one of the peak.
    chain_error = next(o.max_abs_error for o in report.outputs if o.name == "logits")
    assert logits.atol * logits.noise.peak < chain_error <= logits.noise.derived_atol
    assert logits.noise.derived_atol == pytest.approx(NOISE_FACTOR * logits.noise.spread)
    assert "intermediate rounding" in logits.noise.sources
    text = report.summary()
    assert f"derived: 4 x the whole model's spread {logits.noise.spread:.3g}" in text
    assert "across optimisation levels, thread counts and intermediate rounding" in text
    stated = report.to_dict()["tolerances"]["logits"]
    assert stated["noise"]["spread"] == logits.noise.spread and stated["noise"]["factor"] == 4
    # Today's ulp tolerance alone (no noise measured) calls the same chain a mismatch.
    monkeypatch.setattr(verify_module, "measure_model_noise", lambda *a, **k: {})
    ulps_only = verify_chain(model, stages, SHAPES, threads=1, seeds=(0, 1), served=False)
    assert not ulps_only.ok and "derived" not in ulps_only.summary()


def test_a_changed_weight_still_fails_under_the_derived_tolerance(before_layer_norm) -> None:
    model, (first, second) = before_layer_norm
    tampered = onnx.ModelProto()
    tampered.CopyFrom(second)
    head = next(t for t in tampered.graph.initializer if t.name == "head")
    head.CopyFrom(_array("head", numpy_helper.to_array(head).astype(np.float32) * 1.5))
    report = verify_chain(model, [first, tampered], SHAPES, threads=1, seeds=(0, 1),
                          served=False)
    assert not report.ok
    assert "logits" in report.to_dict()["mismatched"]
    logits = next(o for o in report.outputs if o.name == "logits")
    noise = report.tolerances["logits"].noise
    assert noise is not None and logits.max_abs_error > 10 * noise.derived_atol


class _SessionCount:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for module in (stage_runner_module, verify_module):
            original = module.create_session
            monkeypatch.setattr(module, "create_session", self._counting(original))

    def _counting(self, original):
        def create(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)
        return create


def test_float32_keeps_its_exact_tolerance_and_runs_nothing_more(
        before_layer_norm, monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = _SessionCount(monkeypatch)
    model = chain_model()
    prepared = prepare_model(model, {"": (1, 8)})
    graph = ModelGraph(prepared)
    extractor = StageExtractor(prepared, graph)
    stages = [extractor.extract(0, 3, name="s0"),
              extractor.extract(3, graph.node_count, name="s1")]
    report = verify_chain(model, stages, {"x": (1, 8)}, threads=1, seeds=(0, 1))
    assert report.ok
    assert all(t == Tolerance(1e-4, 1e-5) for t in report.tolerances.values())
    assert "spread" not in report.summary()
    # Whole model and two stages, at reference and at serving optimisation: nothing more.
    assert sessions.count == 2 * (1 + len(stages))
    # The float16 model, by contrast, is also run at four other settings.
    sessions.count = 0
    fp16_model, fp16_stages = before_layer_norm
    verify_chain(fp16_model, fp16_stages, SHAPES, threads=1, seeds=(0,))
    assert sessions.count == 2 * (1 + len(fp16_stages)) + 4


def test_verify_json_prints_the_report_on_a_mismatch_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build = chain_build(tmp_path, width=16, depth=4, machines=2)
    stage = onnx.load(str(build / "stage_1.onnx"))
    weight = stage.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(stage, str(build / "stage_1.onnx"))
    assert main(["verify", str(build), "--json", "--seeds", "1", "--threads", "1"]) \
        == EXIT_FAILED
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ok"] is False and data["mismatched"]
    bad = next(o for o in data["outputs"] if o["name"] == data["mismatched"][0])
    assert bad["close"] is False and bad["max_abs_error"] > 0 and bad["tolerance"]
    assert data["summary"].startswith("MISMATCH") and "MISMATCH" in captured.err
