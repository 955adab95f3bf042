"""Exporter quirks in the pure graph layer: how dimensions, refusals and schedules are read."""

from __future__ import annotations

import pytest

from smlaas.errors import GraphError, InputError, UnsupportedModelError
from smlaas.graph import ModelGraph, model_inputs, prepare_model, resolve_input_sizes
from smlaas.graph.input_size import input_dims
from tests.exporter_models import paddle_style_model, zipmap_classifier_model
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
