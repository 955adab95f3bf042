"""Dynamic axes through preparation (pure): which axes stay symbolic, and what the prepared
model and its analysis keep of them."""

from __future__ import annotations

import pytest

from smlaas.errors import InputSizeError
from smlaas.graph import ModelGraph, prepare_model
from smlaas.graph.dynamic_axes import (
    BATCH_DIM,
    parse_dynamic_axes,
    prepare_symbolic,
    symbolic_axes,
)
from tests.exporter_models import dynamic_attention_model, nonzero_model, paddle_style_model

SIZES = {"hidden": (1, 5, 16), "attention_mask": (1, 5)}


def test_parse_dynamic_axes() -> None:
    assert parse_dynamic_axes(["ids:1", "mask:1", "ids:1"]) == {"ids": (1,), "mask": (1,)}
    for bad in ("ids", "ids:x", ":1"):
        with pytest.raises(InputSizeError, match="NAME:AXIS"):
            parse_dynamic_axes([bad])


def test_batch_axis_of_symbolic_inputs_is_dynamic_by_default() -> None:
    assert symbolic_axes(dynamic_attention_model()) == {
        "hidden": {0: BATCH_DIM}, "attention_mask": {0: BATCH_DIM}}
    assert symbolic_axes(paddle_style_model()) == {"x": {0: BATCH_DIM}}  # dim_value -1
    assert symbolic_axes(nonzero_model()) == {}  # declared [4, 8]


def test_requested_axis_keeps_the_models_name_and_must_be_symbolic() -> None:
    model = dynamic_attention_model()
    axes = symbolic_axes(model, {"hidden": (1,)})
    assert axes["hidden"] == {0: BATCH_DIM, 1: "sequence_length"}
    with pytest.raises(InputSizeError, match="fixed size 16 on axis 2"):
        symbolic_axes(model, {"hidden": (2,)})
    with pytest.raises(InputSizeError, match="has rank 3"):
        symbolic_axes(model, {"hidden": (3,)})
    with pytest.raises(InputSizeError, match="model's inputs are"):
        symbolic_axes(model, {"nope": (0,)})


def test_symbolic_preparation_keeps_the_shape_chain_the_fixed_one_folds() -> None:
    model = dynamic_attention_model()
    fixed = prepare_model(model, SIZES)
    assert "Shape" not in {n.op_type for n in fixed.graph.node}
    symbolic, concrete = prepare_symbolic(model, SIZES, symbolic_axes(model))
    assert {"Shape", "Gather", "Concat"} <= {n.op_type for n in symbolic.graph.node}
    graph = ModelGraph(symbolic, concrete=concrete)
    assert graph.tensors["q_split"].shape == (1, 5, 2, 8)
    assert graph.symbolic_dims["q_split"] == (BATCH_DIM, 5, 2, 8)
    assert graph.tensors["split_shape"].shape == (4,)  # folded in the concrete copy
    assert "split_shape" not in graph.symbolic_dims
    # The fixed analysis has no symbolic dims and the same sizes where both have a tensor.
    fixed_graph = ModelGraph(fixed)
    assert fixed_graph.symbolic_dims == {}
    assert fixed_graph.tensors["probs"] == graph.tensors["probs"]
