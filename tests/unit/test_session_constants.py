"""The weights a stage's ONNX Runtime session holds (NOTE_SESSION_CONSTANTS): outputs of
constant-foldable subgraphs count as weights of the stage reading them, and half-precision
weights of ops the CPU provider runs in float32 count at float32 size."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from smlaas.graph import ModelGraph, prepare_model, segment_memory

MATRIX = (256, 512)  # 1024 elements are the folding limit of prepare: this stays a weight


def model(nodes: list[onnx.NodeProto], initializers: dict[str, np.ndarray], *,
          x_type: int = TensorProto.FLOAT, y_type: int = TensorProto.FLOAT,
          x_shape: tuple[int, ...] = (1, MATRIX[0]), x_name: str = "x") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(x_name, x_type, list(x_shape))],
        [helper.make_tensor_value_info("y", y_type, None)],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def analysed(onnx_model: onnx.ModelProto) -> ModelGraph:
    return ModelGraph(prepare_model(onnx_model, {}))


def whole_model(graph: ModelGraph) -> tuple[int, int, int]:
    """(stored, touched weight, peak activation) bytes of the one-stage plan."""
    memory = segment_memory(graph)
    n = graph.node_count
    return (int(memory.weight_bytes[0, n]), int(memory.touched_weight_bytes[0, n]),
            int(memory.peak_activation_bytes[0, n]))


def test_constant_of_shape_weight_counts_as_a_weight_not_an_activation() -> None:
    # The onnx wheel's light_* models build every weight so.
    graph = analysed(model(
        [helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                          value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        {"w_shape": np.array(MATRIX, np.int64)}))
    weight_bytes = MATRIX[0] * MATRIX[1] * 4
    stored, touched, peak = whole_model(graph)
    assert stored == 16  # the file holds only the shape
    assert touched == weight_bytes
    assert peak == (MATRIX[0] + MATRIX[1]) * 4  # x and y; w is not an activation
    assert graph.session_weight_uses() == {"w": [1]}


def test_a_folded_weight_is_held_by_the_stage_reading_it() -> None:
    graph = analysed(model(
        [helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                          value=numpy_helper.from_array(np.array([0.5], np.float32))),
         helper.make_node("Relu", ["x"], ["h"]),
         helper.make_node("MatMul", ["h", "w"], ["y"])],
        {"w_shape": np.array(MATRIX, np.int64)}))
    memory = segment_memory(graph)
    consumer = [n.op_type for n in graph.nodes].index("MatMul")
    n = graph.node_count
    assert memory.touched_weight_bytes[consumer, n] == MATRIX[0] * MATRIX[1] * 4
    assert memory.touched_weight_bytes[0, consumer] == 0


def test_transposed_weight_replaces_its_source() -> None:
    # ORT folds the Transpose and drops the initializer nothing else reads: one copy held.
    graph = analysed(model(
        [helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        {"w_t": np.ones(MATRIX[::-1], np.float32)}))
    stored, touched, peak = whole_model(graph)
    assert stored == touched == MATRIX[0] * MATRIX[1] * 4
    assert peak == (MATRIX[0] + MATRIX[1]) * 4
    assert set(graph.session_weight_uses()) == {"w"}


def test_dequantize_linear_is_not_folded() -> None:
    # ORT keeps QDQ weights int8 for its fusions: the int8 bytes are the weight.
    graph = analysed(model(
        [helper.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        {"w_q": np.ones(MATRIX, np.int8), "scale": np.array(0.1, np.float32),
         "zero": np.array(0, np.int8)}))
    assert not graph.constant_positions
    _stored, touched, peak = whole_model(graph)
    assert touched == MATRIX[0] * MATRIX[1] + 4 + 1
    assert peak >= MATRIX[0] * MATRIX[1] * 4  # the dequantized weight lives one step


def test_random_and_graph_output_producers_are_not_folded() -> None:
    onnx_model = model(
        [helper.make_node("RandomNormalLike", ["w0"], ["noise"]),
         helper.make_node("Add", ["x", "noise"], ["h"]),
         helper.make_node("Identity", ["w1"], ["y"])],
        {"w0": np.zeros((1, MATRIX[0]), np.float32), "w1": np.ones((4, 4), np.float32)})
    onnx_model.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    graph = analysed(onnx_model)
    assert not graph.constant_positions


def test_float16_matmul_weight_counts_at_float32_size() -> None:
    graph = analysed(model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        {"w": np.ones(MATRIX, np.float16)}, x_type=TensorProto.FLOAT16,
        y_type=TensorProto.FLOAT16))
    stored, touched, _peak = whole_model(graph)
    assert stored == MATRIX[0] * MATRIX[1] * 2
    assert touched == 2 * stored


def test_bfloat16_conv_weight_counts_at_float32_size() -> None:
    weight = helper.make_tensor("w", TensorProto.BFLOAT16, [8, 3, 3, 3], [0] * 216)
    onnx_model = model([helper.make_node("Conv", ["x", "w"], ["y"])], {},
                       x_type=TensorProto.BFLOAT16, y_type=TensorProto.BFLOAT16,
                       x_shape=(1, 3, 8, 8))
    onnx_model.graph.initializer.append(weight)
    stored, touched, _peak = whole_model(analysed(onnx_model))
    assert (stored, touched) == (216 * 2, 216 * 4)


def test_float16_embedding_table_stays_float16() -> None:
    # Gather has a float16 CPU kernel: the rows read are counted at their stored size.
    rows, width = 4, 4096  # one 8 KiB row: two pages
    graph = analysed(model(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], {"table": np.ones(
            (rows, width), np.float16)}, x_type=TensorProto.INT64,
        y_type=TensorProto.FLOAT16, x_shape=(1,), x_name="ids"))
    stored, touched, _peak = whole_model(graph)
    assert stored == rows * width * 2
    assert touched == width * 2


def test_float16_weight_cast_to_float32_is_held_at_float32_size() -> None:
    # keep_io_types-style: the Cast of an initializer is folded; only the float32 copy stays.
    graph = analysed(model(
        [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        {"w16": np.ones(MATRIX, np.float16)}))
    stored, touched, _peak = whole_model(graph)
    assert (stored, touched) == (MATRIX[0] * MATRIX[1] * 2, MATRIX[0] * MATRIX[1] * 4)


def test_float16_weight_of_a_data_movement_op_is_not_widened() -> None:
    graph = analysed(model(
        [helper.make_node("Concat", ["x", "w"], ["y"], axis=0)],
        {"w": np.ones((64, MATRIX[0]), np.float16)}, x_type=TensorProto.FLOAT16,
        y_type=TensorProto.FLOAT16))
    stored, touched, _peak = whole_model(graph)
    assert touched == stored == 64 * MATRIX[0] * 2
