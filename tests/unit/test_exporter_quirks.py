"""Exporter quirks in the pure graph layer: how dimensions, refusals and schedules are read."""

from __future__ import annotations

import pytest

from smlaas.errors import GraphError, InputError, UnsupportedModelError
from smlaas.export.tolerance import Tolerance
from smlaas.graph import ModelGraph, model_inputs, prepare_model, resolve_input_sizes
from smlaas.graph.input_size import input_dims
from tests.exporter_models import (
    fp16_model,
    paddle_style_model,
    qdq_cnn_model,
    zipmap_classifier_model,
)
from tests.models import chain_model


def test_paddle_minus_one_is_a_symbolic_dimension() -> None:
    model = paddle_style_model()
    assert input_dims(model_inputs(model)[0]) == ["?", 3, 6, 8]
    assert resolve_input_sizes(model, {"": (2, 3, 6, 8)}) == {"x": (2, 3, 6, 8)}
    graph = ModelGraph(prepare_model(model, {"": (2, 3, 6, 8)}))
    assert graph.tensors["c"].shape == (2, 4, 6, 8)
    assert graph.tensors["softmax_0.tmp_0"].shape == (2, 2)


def test_a_sequence_of_maps_is_refused_naming_node_op_and_why() -> None:
    prepared = prepare_model(zipmap_classifier_model(), {"": (2, 4)})
    with pytest.raises(UnsupportedModelError) as caught:
        ModelGraph(prepared)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("node 'ZipMap' (ai.onnx.ml.ZipMap) outputs 'probabilities', a "
                              "sequence of maps: unsupported by design")


def test_graph_inconsistencies_are_bad_input() -> None:
    """A cycle or a dangling tensor is a fault of the model given (exit code 2)."""
    assert issubclass(GraphError, InputError)
    model = chain_model()
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(InputError, match="'nowhere'"):
        prepare_model(model, {"": (1, 8)})


def _two_stages(model, sizes, cut):
    from smlaas.export import StageExtractor

    prepared = prepare_model(model, sizes)
    graph = ModelGraph(prepared)
    extractor = StageExtractor(prepared, graph)
    return [extractor.extract(0, cut, name="s0"),
            extractor.extract(cut, graph.node_count, name="s1")]


def test_tolerance_follows_the_output_and_the_cut_tensors_it_depends_on() -> None:
    from smlaas.export.tolerance import output_tolerances

    fp32 = output_tolerances(_two_stages(chain_model(), {"": (1, 8)}, 3), rtol=1e-4,
                             atol=1e-5)
    assert fp32["y"] == Tolerance(1e-4, 1e-5)
    # float32 output, but the cut carries float16: held to float16's tolerance.
    mixed = output_tolerances(_two_stages(fp16_model(fp32_io=True), {"": (2, 64)}, 4),
                              rtol=1e-4, atol=1e-5)
    assert mixed["probs"].precision == "float16" and mixed["probs"].scaled_atol
    assert mixed["probs"].rtol == pytest.approx(10 * 2**-10)
    # A cut before the input Cast carries float32 only.
    before_cast = output_tolerances(_two_stages(fp16_model(fp32_io=True), {"": (2, 64)}, 0),
                                    rtol=1e-4, atol=1e-5)
    assert before_cast["probs"].precision == "float32"


def test_weight_dequantization_is_scheduled_next_to_its_consumer(tmp_path) -> None:
    model = qdq_cnn_model(tmp_path)
    weights = {t.name for t in model.graph.initializer}
    graph = ModelGraph(prepare_model(model, {}))
    dequantized = [n.output[0] for n in graph.nodes
                   if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert len(dequantized) >= 4
    for name in dequantized:
        # Live from its DequantizeLinear to its consumer only: weight, bias and input DQs.
        assert graph.last_use[name] - graph.producer[name] <= 3, name
    first_conv = next(p for p, n in enumerate(graph.nodes) if n.op_type == "Conv")
    # No dequantized weight of a later layer is alive at the first Conv.
    later = [t for t in graph.cut_tensors(first_conv + 1) if t in dequantized]
    assert later == []
