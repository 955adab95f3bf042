"""onnx's checker as smlaas runs it on a model it is given: ONNX Runtime's own operators in
ONNX's domain (ONNX Runtime GenAI's model builder writes SimplifiedLayerNormalization there)
pass, and the rest of such a model is still checked."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from smlaas.errors import ModelError
from smlaas.graph.loading import check_model


def _model(op_type: str, *, broken: bool = False):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4)
    nodes = [helper.make_node(op_type, ["x", "scale"], ["h"], epsilon=1e-5),
             helper.make_node("Relu", ["h" if not broken else "missing"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_onnx_runtime_ops_in_onnx_domain_pass_and_the_model_is_unchanged() -> None:
    model = _model("SimplifiedLayerNormalization")
    before = model.SerializeToString()
    check_model(model, source="genai.onnx")
    assert model.SerializeToString() == before


def test_such_a_model_is_still_checked_elsewhere() -> None:
    with pytest.raises(ModelError, match="genai.onnx is not a valid ONNX model"):
        check_model(_model("SimplifiedLayerNormalization", broken=True), source="genai.onnx")


def test_an_operator_nobody_defines_is_refused() -> None:
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        check_model(_model("MadeUpNormalization"), source="m.onnx")
