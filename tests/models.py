"""Small ONNX models for tests, each exercising one construct the partitioner must handle."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, name: str = "t"
           ) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weight(name: str, shape: tuple[int, ...], seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)


def chain_model(width: int = 8, depth: int = 4) -> onnx.ModelProto:
    """x[N, width] -> (MatMul, Add, Tanh) x depth -> y: single-tensor cuts everywhere."""
    nodes, inits, x = [], [], "x"
    for layer in range(depth):
        inits += [_weight(f"w{layer}", (width, width), layer), _weight(f"b{layer}", (width,))]
        nodes += [helper.make_node("MatMul", [x, f"w{layer}"], [f"m{layer}"], name=f"mm{layer}"),
                  helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}"],
                                   name=f"add{layer}"),
                  helper.make_node("Tanh", [f"a{layer}"], [f"t{layer}"], name=f"tanh{layer}")]
        x = f"t{layer}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)


def skip_model() -> onnx.ModelProto:
    """A skip connection from the graph input over three nodes, and an early graph output."""
    nodes = [
        helper.make_node("Relu", ["x"], ["early"], name="relu"),
        helper.make_node("Mul", ["early", "two"], ["doubled"], name="mul"),
        helper.make_node("Sigmoid", ["doubled"], ["squashed"], name="sigmoid"),
        helper.make_node("Add", ["squashed", "x"], ["y"], name="add_skip"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                   helper.make_tensor_value_info("early", TensorProto.FLOAT, [2, 3])],
                  [numpy_helper.from_array(np.array(2.0, np.float32), "two")])


def multi_input_model() -> onnx.ModelProto:
    """Float features and int64 token ids (an embedding lookup); two outputs."""
    table = _weight("table", (50, 6), 3)
    proj = _weight("proj", (6, 6), 4)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup"),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Add", ["pooled", "feat"], ["mixed"], name="mix"),
        helper.make_node("MatMul", ["mixed", "proj"], ["logits"], name="head"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    return _model(nodes, [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["batch", 6]),
    ], [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 6]),
        helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 6])],
        [table, proj])


def if_model() -> onnx.ModelProto:
    """An If whose branches read an outer-scope tensor: it must stay whole, and its implicit
    input must cross any cut before it."""
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["h", "h"], ["then_out"], name="then_add")], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2, 2])])
    else_graph = helper.make_graph(
        [helper.make_node("Mul", ["h", "h"], ["else_out"], name="else_mul")], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2, 2])])
    nodes = [
        helper.make_node("Exp", ["x"], ["h"], name="exp"),
        helper.make_node("ReduceSum", ["x"], ["total"], name="sum", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="gt"),
        helper.make_node("If", ["positive"], ["branch"], name="if", then_branch=then_graph,
                         else_branch=else_graph),
        helper.make_node("Neg", ["branch"], ["y"], name="neg"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                  [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])


def exporter_style_model() -> onnx.ModelProto:
    """What torch.onnx.export-style files look like: unnamed nodes, Constant nodes, a
    Shape->Gather->Unsqueeze->Concat->Reshape flatten, a symbolic batch dim named N, and an
    initializer also listed as a graph input (IR < 4 style)."""
    conv_w = _weight("conv.weight", (4, 3, 3, 3), 7)
    fc_w = _weight("fc.weight", (4 * 8 * 8, 5), 8)
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Shape", ["r"], ["shape"]),
        helper.make_node("Constant", [], ["zero"],
                         value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Constant", [], ["axes"],
                         value=numpy_helper.from_array(np.array([0], np.int64))),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"]),
        helper.make_node("Constant", [], ["minus1"],
                         value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Concat", ["batch1", "minus1"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["logits"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8]),
              helper.make_tensor_value_info("conv.weight", TensorProto.FLOAT, [4, 3, 3, 3])]
    return _model(nodes, inputs,
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                  [conv_w, fc_w], opset=13)


def huge_matmul_model(size: int = 6000, out_features: int | None = None) -> onnx.ModelProto:
    """One MatMul whose weight alone (137 MiB at 6000) exceeds an SGX v1 EPC; a
    ``size x out_features`` weight when ``out_features`` is given."""
    out = size if out_features is None else out_features
    weight = numpy_helper.from_array(np.full((size, out), 0.001, np.float32), "w")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="huge_matmul")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
                  [weight])


def text_and_bf16_model(width: int = 32, depth: int = 4) -> onnx.ModelProto:
    """Tensors with no fixed element size or no numpy-native type: a string input
    upper-cased and passed through every stage, and bfloat16 in and out around a float32
    chain (as a mixed-precision export does)."""
    nodes = [helper.make_node("StringNormalizer", ["text"], ["upper"], name="normalize",
                              case_change_action="UPPER", locale="C"),
             helper.make_node("Cast", ["h"], ["h32"], name="widen", to=TensorProto.FLOAT)]
    inits, x = [], "h32"
    for layer in range(depth):
        inits.append(_weight(f"w{layer}", (width, width), layer))
        nodes += [helper.make_node("MatMul", [x, f"w{layer}"], [f"m{layer}"], name=f"mm{layer}"),
                  helper.make_node("Tanh", [f"m{layer}"], [f"t{layer}"], name=f"tanh{layer}")]
        x = f"t{layer}"
    nodes += [helper.make_node("Cast", [x], ["y"], name="narrow", to=TensorProto.BFLOAT16),
              helper.make_node("Identity", ["upper"], ["text_out"], name="text_out")]
    return _model(nodes,
                  [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"]),
                   helper.make_tensor_value_info("h", TensorProto.BFLOAT16, ["N", width])],
                  [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", width]),
                   helper.make_tensor_value_info("text_out", TensorProto.STRING, ["N"])],
                  inits)
