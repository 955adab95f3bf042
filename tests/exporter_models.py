"""Small models with the constructs real exporters write, built with onnx.helper where the
exporter itself is heavy (PaddlePaddle, torch, transformers), or with a light exporter
(onnxruntime.quantization) where there is one."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, initializers=(), *, opset: int = OPSET, value_info=(),
           extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "exported", inputs, outputs, list(initializers),
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    *extra_opsets])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weight(name: str, shape: tuple[int, ...], seed: int = 0, dtype=np.float32,
            scale: float = 1.0) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.5 * scale).astype(dtype),
                                   name)


def paddle_style_model() -> onnx.ModelProto:
    """What paddle2onnx writes (rapidocr's text direction classifier): ``dim_value: -1`` for
    the dynamic batch on the input, the output and intermediate value_info, and a Reshape to
    ``[0, -1]``."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv2d_0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu_0"),
        helper.make_node("Reshape", ["r", "flat_shape"], ["flat"], name="reshape_0"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="linear_0"),
        helper.make_node("Softmax", ["logits"], ["softmax_0.tmp_0"], name="softmax_0", axis=1),
    ]
    inits = [_weight("conv_w", (4, 3, 3, 3), 1), _weight("fc_w", (4 * 6 * 8, 2), 2),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 6, 8])],
                  [helper.make_tensor_value_info("softmax_0.tmp_0", TensorProto.FLOAT, [-1, 2])],
                  inits, value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT,
                                                                   [-1, 4, 6, 8])])


def zipmap_classifier_model() -> onnx.ModelProto:
    """What skl2onnx writes for a classifier by default: ai.onnx.ml LinearClassifier, then a
    ZipMap that turns probabilities into a sequence of maps (unsupported by design: stages
    exchange tensors only)."""
    ml = helper.make_opsetid("ai.onnx.ml", 1)
    nodes = [
        helper.make_node("Scaler", ["input"], ["scaled"], name="Scaler", domain="ai.onnx.ml",
                         offset=[0.1, 0.2, 0.3, 0.4], scale=[1.0, 2.0, 0.5, 1.5]),
        helper.make_node("LinearClassifier", ["scaled"], ["label", "probability_tensor"],
                         name="LinearClassifier", domain="ai.onnx.ml", classlabels_ints=[0, 1, 2],
                         coefficients=[float(v) for v in np.linspace(-1, 1, 12)],
                         intercepts=[0.1, -0.2, 0.05], post_transform="SOFTMAX"),
        helper.make_node("ZipMap", ["probability_tensor"], ["probabilities"], name="ZipMap",
                         domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    seq_of_maps = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64,
                                   helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
                  [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                   helper.make_value_info("probabilities", seq_of_maps)],
                  extra_opsets=[ml])


def fp16_model(*, fp32_io: bool, width: int = 64, depth: int = 6) -> onnx.ModelProto:
    """A float16 MLP as onnxconverter-common's float16 converter writes it: float16 weights
    and activations, with float32 graph I/O and Cast nodes at both ends (``keep_io_types``)
    when ``fp32_io``, else float16 I/O. Wide sums (MatMul, ReduceSum) are where ONNX
    Runtime's CPU kernels keep float32 inside a session and round only at a stage's edge."""
    nodes, inits = [], []
    x = "x16"
    if fp32_io:
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], name="graph_input_cast0",
                                      to=TensorProto.FLOAT16))
    else:
        x = "x"
    for layer in range(depth):
        # Weights of std 1.5/sqrt(width): every layer keeps the activations' scale.
        inits += [_weight(f"w{layer}", (width, width), 10 + layer, np.float16, 3 / width**0.5),
                  _weight(f"b{layer}", (width,), 20 + layer, np.float16)]
        nodes += [
            helper.make_node("MatMul", [x, f"w{layer}"], [f"m{layer}"], name=f"mm{layer}"),
            helper.make_node("Add", [f"m{layer}", f"b{layer}"], [f"a{layer}"], name=f"add{layer}"),
            helper.make_node("Tanh", [f"a{layer}"], [f"t{layer}"], name=f"tanh{layer}"),
        ]
        x = f"t{layer}"
    nodes.append(helper.make_node("Softmax", [x], ["p16"], name="softmax", axis=-1))
    elem = TensorProto.FLOAT if fp32_io else TensorProto.FLOAT16
    if fp32_io:
        nodes.append(helper.make_node("Cast", ["p16"], ["probs"], name="graph_output_cast0",
                                      to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("Identity", ["p16"], ["probs"], name="out"))
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", width])],
                  [helper.make_tensor_value_info("probs", elem, ["N", width])], inits)
