"""Exporter quirks in the pure graph layer: how dimensions, refusals and schedules are read."""

from __future__ import annotations

from smlaas.graph import ModelGraph, model_inputs, prepare_model, resolve_input_sizes
from smlaas.graph.input_size import input_dims
from tests.exporter_models import paddle_style_model


def test_paddle_minus_one_is_a_symbolic_dimension() -> None:
    model = paddle_style_model()
    assert input_dims(model_inputs(model)[0]) == ["?", 3, 6, 8]
    assert resolve_input_sizes(model, {"": (2, 3, 6, 8)}) == {"x": (2, 3, 6, 8)}
    graph = ModelGraph(prepare_model(model, {"": (2, 3, 6, 8)}))
    assert graph.tensors["c"].shape == (2, 4, 6, 8)
    assert graph.tensors["softmax_0.tmp_0"].shape == (2, 2)
