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


def value_switched_lstm_model(hidden: int = 6) -> onnx.ModelProto:
    """silero-vad's shape: an If on a scalar input ``sr`` (16000 or 8000) whose branches run
    an LSTM on the audio ``input`` [batch, channels, samples], each behind TorchScript's
    guarded squeeze ``If(Equal(Shape(x)[1], 1)) Squeeze else Identity`` (branches of
    different ranks). Only sr 16000 and 8000 are valid: any other value fails at run time
    (the 8 kHz branch indexes a table with sr - 8000)."""
    def lstm_branch(tag: str, samples: int, seed: int) -> onnx.GraphProto:
        guard = helper.make_graph(
            [helper.make_node("Squeeze", ["input", "one"], [f"{tag}_squeezed"],
                              name=f"{tag}_squeeze")], f"{tag}_squeeze_branch", [],
            [helper.make_tensor_value_info(f"{tag}_squeezed", TensorProto.FLOAT,
                                           [f"{tag}_b", f"{tag}_t"])])
        keep = helper.make_graph(
            [helper.make_node("Identity", ["input"], [f"{tag}_kept"], name=f"{tag}_keep")],
            f"{tag}_keep_branch", [],
            [helper.make_tensor_value_info(f"{tag}_kept", TensorProto.FLOAT,
                                           [f"{tag}_b", f"{tag}_c", f"{tag}_t"])])
        nodes = [
            helper.make_node("Shape", ["input"], [f"{tag}_shape"], name=f"{tag}_shape_of"),
            helper.make_node("Gather", [f"{tag}_shape", "one"], [f"{tag}_channels"],
                             name=f"{tag}_gather", axis=0),
            helper.make_node("Equal", [f"{tag}_channels", "one"], [f"{tag}_mono"],
                             name=f"{tag}_is_mono"),
            helper.make_node("If", [f"{tag}_mono"], [f"{tag}_frames"], name=f"{tag}_guard",
                             then_branch=guard, else_branch=keep),
            # Frames of `samples`: [1, batch, samples] (seq 1), as the LSTM wants rank 3.
            helper.make_node("Unsqueeze", [f"{tag}_frames", "zero"], [f"{tag}_x"],
                             name=f"{tag}_unsqueeze"),
            helper.make_node("LSTM", [f"{tag}_x", f"{tag}_W", f"{tag}_R"],
                             ["", f"{tag}_h"], name=f"{tag}_LSTM", hidden_size=hidden),
            helper.make_node("Squeeze", [f"{tag}_h", "zero"], [f"{tag}_h2"],
                             name=f"{tag}_h2"),
            helper.make_node("Sub", ["sr", "sr8k"], [f"{tag}_index"], name=f"{tag}_index"),
            helper.make_node("Gather", [f"{tag}_table", f"{tag}_index"], [f"{tag}_row"],
                             name=f"{tag}_row", axis=0),
            helper.make_node("Add", [f"{tag}_h2", f"{tag}_row"], [f"{tag}_out"],
                             name=f"{tag}_out"),
        ]
        if tag == "then":  # the 16 kHz branch takes no row from the table
            nodes[-3:] = [helper.make_node("Identity", [f"{tag}_h2"], [f"{tag}_out"],
                                           name=f"{tag}_out")]
        inits = [_weight(f"{tag}_W", (1, 4 * hidden, samples), seed),
                 _weight(f"{tag}_R", (1, 4 * hidden, hidden), seed + 1),
                 *([_weight(f"{tag}_table", (1, hidden), seed + 2)] if tag == "else" else [])]
        return helper.make_graph(nodes, f"{tag}_branch", [], [
            helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, ["b", hidden])],
            inits)

    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is_16k"], name="Equal_0"),
        helper.make_node("If", ["is_16k"], ["h"], name="If_0",
                         then_branch=lstm_branch("then", 8, 1),
                         else_branch=lstm_branch("else", 8, 3)),
        helper.make_node("Sigmoid", ["h"], ["output"], name="sigmoid"),
    ]
    inits = [numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
             numpy_helper.from_array(np.array(8000, np.int64), "sr8k"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "zero")]
    return _model(nodes, [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "channels", 8]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", hidden])], inits)


def small_cnn_model(channels: int = 16, layers: int = 4, size: int = 16) -> onnx.ModelProto:
    """A float32 CNN (Conv+Relu blocks, global pool, Gemm head) for the quantiser to work on."""
    nodes, inits, x, c_in = [], [], "input", 3
    for layer in range(layers):
        inits += [_weight(f"conv{layer}.weight", (channels, c_in, 3, 3), layer, scale=0.5),
                  _weight(f"conv{layer}.bias", (channels,), 50 + layer)]
        nodes += [helper.make_node("Conv", [x, f"conv{layer}.weight", f"conv{layer}.bias"],
                                   [f"c{layer}"], name=f"/layer{layer}/Conv", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"],
                                   name=f"/layer{layer}/Relu")]
        x, c_in = f"r{layer}", channels
    inits += [_weight("fc.weight", (10, channels), 99), _weight("fc.bias", (10,), 98)]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pooled"], name="/pool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], name="/flatten"),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"],
                               name="/fc/Gemm", transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        [1, 3, size, size])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits,
                  opset=13)


def random_calibration(shapes: dict[str, tuple[int, ...]], batches: int = 4):
    """An onnxruntime.quantization calibration reader of seeded random float32 batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class RandomReader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._batches = iter([{name: rng.standard_normal(shape).astype(np.float32)
                                   for name, shape in shapes.items()} for _ in range(batches)])

        def get_next(self):
            return next(self._batches, None)

    return RandomReader()


def qdq_cnn_model(directory) -> onnx.ModelProto:
    """:func:`small_cnn_model` quantised to int8 QDQ by onnxruntime.quantization's
    quantize_static (calibrated on seeded random data), as a quantiser ships it: every
    weight's DequantizeLinear first in the file, far from its Conv."""
    from pathlib import Path

    from onnxruntime.quantization import QuantFormat, quantize_static

    source, target = Path(directory) / "cnn_fp32.onnx", Path(directory) / "cnn_qdq.onnx"
    onnx.save(small_cnn_model(), str(source))
    quantize_static(str(source), str(target), random_calibration({"input": (1, 3, 16, 16)}),
                    quant_format=QuantFormat.QDQ)
    model = onnx.load(str(target))
    # Put the weights' DequantizeLinear nodes first, as quantisers of big models do.
    weights = {t.name for t in model.graph.initializer}
    nodes = list(model.graph.node)
    first = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    rest = [n for n in nodes if not any(n is f for f in first)]
    del model.graph.node[:]
    model.graph.node.extend(first + rest)
    return model


def nonzero_model() -> onnx.ModelProto:
    """A data-dependent shape in the middle of the graph, as detectors have (NonZero,
    NonMaxSuppression, TopK with a computed k): the positive entries of x are gathered
    ([k] with k depending on x's values) and summed back into the main path."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("Greater", ["h", "zero"], ["positive"], name="is_positive"),
        helper.make_node("NonZero", ["positive"], ["where"], name="nonzero"),
        helper.make_node("Transpose", ["where"], ["indices"], name="indices", perm=[1, 0]),
        helper.make_node("GatherND", ["h", "indices"], ["picked"], name="pick"),
        helper.make_node("Sigmoid", ["picked"], ["detections"], name="detections"),
        helper.make_node("ReduceSum", ["picked"], ["total"], name="total", keepdims=1),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("Add", ["t", "total"], ["y"], name="add"),
    ]
    inits = [_weight("w", (8, 8), 4), numpy_helper.from_array(np.array(0.0, np.float32),
                                                              "zero")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8]),
                   helper.make_tensor_value_info("detections", TensorProto.FLOAT, [None])],
                  inits)


def dynamic_attention_model(hidden: int = 16, heads: int = 2) -> onnx.ModelProto:
    """A transformer block as torch and Hugging Face exporters write it: inputs ``hidden``
    [batch, sequence, hidden] and ``attention_mask`` [batch, sequence] with dynamic axes, the
    head split and merge reshaped to ``Concat(Unsqueeze(Gather(Shape(x), 0)), ...)`` (batch
    and sequence read at run time), the mask Expanded to a shape computed the same way, then
    scaled scores, Softmax, the context MatMul, the output projection and a residual Add."""
    head_dim = hidden // heads
    i64 = np.int64

    def const(name: str, values) -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, i64), name)

    nodes = [
        helper.make_node("Shape", ["hidden"], ["shape"], name="/attn/Shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="/attn/Gather_batch",
                         axis=0),
        helper.make_node("Gather", ["shape", "one"], ["seq"], name="/attn/Gather_seq", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch_1d"],
                         name="/attn/Unsqueeze_batch"),
        helper.make_node("Unsqueeze", ["seq", "axis0"], ["seq_1d"], name="/attn/Unsqueeze_seq"),
        helper.make_node("Concat", ["batch_1d", "seq_1d", "heads", "head_dim"], ["split_shape"],
                         name="/attn/Concat_split", axis=0),
        helper.make_node("Concat", ["batch_1d", "seq_1d", "hidden_dim"], ["merge_shape"],
                         name="/attn/Concat_merge", axis=0),
        helper.make_node("Concat", ["batch_1d", "heads", "seq_1d", "seq_1d"], ["mask_shape"],
                         name="/attn/Concat_mask", axis=0),
    ]
    for tag, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            helper.make_node("MatMul", ["hidden", f"w_{tag}"], [f"{tag}_mm"],
                             name=f"/attn/{tag}/MatMul"),
            helper.make_node("Add", [f"{tag}_mm", f"b_{tag}"], [f"{tag}_proj"],
                             name=f"/attn/{tag}/Add"),
            helper.make_node("Reshape", [f"{tag}_proj", "split_shape"], [f"{tag}_split"],
                             name=f"/attn/{tag}/Reshape"),
            helper.make_node("Transpose", [f"{tag}_split"], [f"{tag}_heads"],
                             name=f"/attn/{tag}/Transpose", perm=perm),
        ]
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], name="/mask/Cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one_f", "mask_f"], ["mask_inv"], name="/mask/Sub"),
        helper.make_node("Mul", ["mask_inv", "mask_value"], ["mask_bias"], name="/mask/Mul"),
        helper.make_node("Unsqueeze", ["mask_bias", "axes12"], ["mask_4d"],
                         name="/mask/Unsqueeze"),
        helper.make_node("Expand", ["mask_4d", "mask_shape"], ["mask_full"],
                         name="/mask/Expand"),
        helper.make_node("MatMul", ["q_heads", "k_heads"], ["scores"], name="/attn/MatMul_qk"),
        helper.make_node("Div", ["scores", "scale"], ["scaled"], name="/attn/Div"),
        helper.make_node("Add", ["scaled", "mask_full"], ["masked"], name="/attn/Add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="/attn/Softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v_heads"], ["context"], name="/attn/MatMul_v"),
        helper.make_node("Transpose", ["context"], ["context_t"], name="/attn/Transpose_merge",
                         perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merge_shape"], ["merged"],
                         name="/attn/Reshape_merge"),
        helper.make_node("MatMul", ["merged", "w_o"], ["out_mm"], name="/attn/o/MatMul"),
        helper.make_node("Add", ["out_mm", "b_o"], ["out_proj"], name="/attn/o/Add"),
        helper.make_node("Add", ["out_proj", "hidden"], ["residual"], name="/attn/Add_residual"),
        helper.make_node("Tanh", ["residual"], ["output"], name="/out/Tanh"),
    ]
    inits = [
        const("zero", 0), const("one", 1), const("axis0", [0]), const("axes12", [1, 2]),
        const("heads", [heads]), const("head_dim", [head_dim]), const("hidden_dim", [hidden]),
        numpy_helper.from_array(np.array(1.0, np.float32), "one_f"),
        numpy_helper.from_array(np.array(-10000.0, np.float32), "mask_value"),
        numpy_helper.from_array(np.array(head_dim ** 0.5, np.float32), "scale"),
    ]
    for seed, tag in enumerate(("q", "k", "v", "o")):
        inits += [_weight(f"w_{tag}", (hidden, hidden), 30 + seed, scale=0.5),
                  _weight(f"b_{tag}", (hidden,), 40 + seed)]
    return _model(nodes, [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                      ["batch_size", "sequence_length", hidden]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                      ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                       ["batch_size", "sequence_length", hidden])], inits)
