"""Operator splitting: every split computes what the original node computes, its pieces fit
the budget they were cut for, and the split chosen is the one that moves fewer bytes."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from smlaas.graph import (
    ModelGraph,
    SplitAxis,
    SplitBudget,
    SplitOperator,
    prepare_model,
    split_operator,
    split_oversize_operators,
)
from smlaas.graph.dynamic_axes import prepare_symbolic, symbolic_axes
from tests.models import huge_matmul_model

RTOL, ATOL = 1e-4, 1e-5  # fp32: the chain's verification tolerances
FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers, *, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _array(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _graph(model: onnx.ModelProto, sizes: dict[str, tuple[int, ...]] | None = None
           ) -> ModelGraph:
    return ModelGraph(prepare_model(model, sizes or {}))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _check_same(graph: ModelGraph, split: ModelGraph, feeds: dict[str, np.ndarray]) -> None:
    onnx.checker.check_model(split.model)
    for want, got in zip(_run(graph.model, feeds), _run(split.model, feeds)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def _node_working_sets(graph: ModelGraph, weight_factor: float = 1.0) -> dict[str, float]:
    """Each node's working set on its own, counted as the cost model counts [p, p + 1)."""
    live = graph.live_bytes_by_step()
    sets = {}
    for position, node in enumerate(graph.nodes):
        weights = sum(graph.touched_initializer_bytes(n, position)
                      for n in graph.node_inputs[position] if graph.is_session_weight(n))
        sets[node.name] = weight_factor * weights + float(live[position])
    return sets


def _segment_working_set(graph: ModelGraph, names: list[str], weight_factor: float) -> float:
    """Working set of consecutive nodes ``names`` as one stage, as the cost model counts it:
    each initializer once, plus the largest live activation set while they run."""
    positions = [[n.name for n in graph.nodes].index(name) for name in names]
    live = graph.live_bytes_by_step()
    weights = {n: graph.touched_initializer_bytes(n, p) for p in positions
               for n in graph.node_inputs[p] if n in graph.initializer_bytes}
    return weight_factor * sum(weights.values()) + float(max(live[p] for p in positions))


def _group_working_sets(graph: ModelGraph, nodes: tuple[str, ...], weight_factor: float,
                        limit: float) -> list[float]:
    """Working sets of the rewrite's groups: the Split alone, each product with its Add, the
    last output piece with the Concat when the two fit the limit together."""
    ops = {n.name: n.op_type for n in graph.nodes}
    groups: list[list[str]] = []
    for name in nodes:
        if ops[name] == "Add":
            groups[-1].append(name)
        elif ops[name] == "Concat":
            joined = groups[-1] + [name]
            if _segment_working_set(graph, joined, weight_factor) <= limit:
                groups[-1] = joined
            else:
                groups.append([name])
        else:
            groups.append([name])
    return [_segment_working_set(graph, group, weight_factor) for group in groups]


def _pieces(draw: st.DrawFn, size: int) -> int:
    return draw(st.integers(2, min(size, 7)))


# -- every split equals the original ---------------------------------------------------------
@st.composite
def matmul_cases(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, np.ndarray], SplitAxis,
                                           int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    k, n = draw(st.integers(2, 48)), draw(st.integers(2, 48))
    leading = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
    transposed = draw(st.booleans())
    x_shape = (*leading, k)
    if transposed:  # B = Transpose(table), as a tied LM head reads its embedding
        table = numpy_helper.from_array(_array(rng, (n, k)), "table")
        nodes = [helper.make_node("Transpose", ["table"], ["w_t"], name="tr", perm=[1, 0]),
                 helper.make_node("MatMul", ["r", "w_t"], ["y"], name="mm")]
        weights = [table]
    else:
        nodes = [helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
        weights = [numpy_helper.from_array(_array(rng, (k, n)), "w")]
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"), *nodes],
                   [helper.make_tensor_value_info("x", FLOAT, list(x_shape))],
                   [helper.make_tensor_value_info("y", FLOAT, [*leading, n])], weights)
    axis = draw(st.sampled_from(list(SplitAxis)))
    return model, {"x": _array(rng, x_shape)}, axis, _pieces(draw, k if axis is
                                                             SplitAxis.REDUCTION else n)


@settings(max_examples=60, deadline=None)
@given(matmul_cases())
def test_split_matmul_equals_the_original(case) -> None:
    model, feeds, axis, pieces = case
    graph = _graph(model)
    split, record = split_operator(graph, "mm", axis=axis, pieces=pieces)
    _check_same(graph, split, feeds)
    assert record.pieces == pieces and record.axis is axis
    ops = [n.op_type for n in split.nodes]
    assert "Transpose" not in ops  # the transposed table is sliced, not transposed at run time
    assert ops.count("MatMul") == pieces
    if axis is SplitAxis.REDUCTION:
        assert ops.count("Split") == 1 and ops.count("Add") == pieces - 1
    else:
        assert ops[-1] == "Concat"


@st.composite
def gemm_cases(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, np.ndarray], SplitAxis,
                                         int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m, k, n = draw(st.integers(1, 5)), draw(st.integers(2, 40)), draw(st.integers(2, 40))
    trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
    alpha = draw(st.sampled_from([1.0, 0.5, -2.0]))
    beta = draw(st.sampled_from([1.0, 0.0, 3.0]))
    bias_shape = draw(st.sampled_from([None, (n,), (1, n), (m, n), (m, 1), (1,), ()]))
    bias_is_input = bias_shape is not None and draw(st.booleans())
    a_shape = (k, m) if trans_a else (m, k)
    inputs = [helper.make_tensor_value_info("a", FLOAT, list(a_shape))]
    feeds = {"a": _array(rng, a_shape)}
    weights = [numpy_helper.from_array(_array(rng, (n, k) if trans_b else (k, n)), "b")]
    gemm_inputs = ["a", "b"]
    if bias_shape is not None:
        gemm_inputs.append("c")
        if bias_is_input:  # C as an activation
            inputs.append(helper.make_tensor_value_info("c", FLOAT, list(bias_shape)))
            feeds["c"] = _array(rng, bias_shape)
        else:
            weights.append(numpy_helper.from_array(_array(rng, bias_shape), "c"))
    model = _model([helper.make_node("Gemm", gemm_inputs, ["y"], name="gemm", alpha=alpha,
                                     beta=beta, transA=int(trans_a), transB=int(trans_b))],
                   inputs, [helper.make_tensor_value_info("y", FLOAT, [m, n])], weights)
    axes = [SplitAxis.REDUCTION] + ([] if bias_is_input and bias_shape[-1:] == (n,)
                                    else [SplitAxis.OUTPUT])
    axis = draw(st.sampled_from(axes))
    return model, feeds, axis, _pieces(draw, k if axis is SplitAxis.REDUCTION else n)


@settings(max_examples=80, deadline=None)
@given(gemm_cases())
def test_split_gemm_equals_the_original(case) -> None:
    """transA/transB/alpha/beta and every bias shape Gemm broadcasts; the bias is added once."""
    model, feeds, axis, pieces = case
    graph = _graph(model)
    split, record = split_operator(graph, "gemm", axis=axis, pieces=pieces)
    _check_same(graph, split, feeds)
    gemms = [n for n in split.nodes if n.op_type == "Gemm"]
    assert len(gemms) == pieces
    if axis is SplitAxis.REDUCTION:  # the accumulator is C of every later piece, beta 1
        for piece in gemms[1:]:
            beta = next(a.f for a in piece.attribute if a.name == "beta")
            assert beta == 1.0 and piece.input[2] == gemms[gemms.index(piece) - 1].output[0]


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[onnx.ModelProto, dict[str, np.ndarray], int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c_in, c_out = draw(st.integers(1, 6)), draw(st.integers(2, 16))
    kernel, stride = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    side = draw(st.integers(kernel, 9))
    pad = draw(st.integers(0, kernel - 1))
    bias = draw(st.booleans())
    x_shape = (draw(st.integers(1, 2)), c_in, side, side)
    weights = [numpy_helper.from_array(_array(rng, (c_out, c_in, kernel, kernel)), "w")]
    if bias:
        weights.append(numpy_helper.from_array(_array(rng, (c_out,)), "b"))
    out_side = (side + 2 * pad - kernel) // stride + 1
    model = _model([helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"],
                                     name="conv", kernel_shape=[kernel, kernel],
                                     strides=[stride, stride], pads=[pad] * 4)],
                   [helper.make_tensor_value_info("x", FLOAT, list(x_shape))],
                   [helper.make_tensor_value_info("y", FLOAT,
                                                  [x_shape[0], c_out, out_side, out_side])],
                   weights)
    return model, {"x": _array(rng, x_shape)}, _pieces(draw, c_out)


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_split_conv_by_output_channels_equals_the_original(case) -> None:
    model, feeds, pieces = case
    graph = _graph(model)
    split, record = split_operator(graph, "conv", axis=SplitAxis.OUTPUT, pieces=pieces)
    _check_same(graph, split, feeds)
    concat = split.nodes[-1]
    assert concat.op_type == "Concat" and concat.attribute[0].i == 1
    with pytest.raises(ValueError, match="reduction"):
        split_operator(graph, "conv", axis=SplitAxis.REDUCTION, pieces=2)


def test_opset_12_splits_with_the_split_attribute() -> None:
    rng = np.random.default_rng(0)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", FLOAT, [2, 9])],
                   [helper.make_tensor_value_info("y", FLOAT, [2, 4])],
                   [numpy_helper.from_array(_array(rng, (9, 4)), "w")], opset=12)
    graph = _graph(model)
    split, _ = split_operator(graph, "mm", axis=SplitAxis.REDUCTION, pieces=4)
    node = split.nodes[0]
    assert node.op_type == "Split" and list(node.input) == ["x"]
    assert list(next(a.ints for a in node.attribute if a.name == "split")) == [2, 2, 2, 3]
    _check_same(graph, split, {"x": _array(rng, (2, 9))})


# -- pieces fit the budget -------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(64, 400), st.integers(64, 400),
       st.floats(0.15, 0.9), st.sampled_from([1.0, 1.5]))
def test_oversize_matmul_pieces_each_fit_and_the_estimate_is_exact(
        rows: int, k: int, n: int, share: float, weight_factor: float) -> None:
    """A budget below the node's working set: every group of the rewrite (a product with its
    Add, the last piece with the Concat) fits it, and the peak the choice predicted is the one
    the graph's own accounting gives."""
    rng = np.random.default_rng(k * n)
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "w"], ["m"], name="mm"),
                    helper.make_node("Tanh", ["m"], ["y"], name="tanh")],
                   [helper.make_tensor_value_info("x", FLOAT, [rows, k])],
                   [helper.make_tensor_value_info("y", FLOAT, [rows, n])],
                   [numpy_helper.from_array(_array(rng, (k, n)), "w")])
    graph = _graph(model)
    before = _node_working_sets(graph, weight_factor)["mm"]
    budget = SplitBudget(node_bytes=before * share, weight_factor=weight_factor)
    split, records = split_oversize_operators(graph, budget)
    if not records:  # activations alone leave no room at this budget: nothing to gain
        assert split is graph
        return
    (record,) = records
    groups = _group_working_sets(split, record.nodes, weight_factor, budget.node_bytes)
    assert max(groups) <= budget.node_bytes
    assert max(groups) == pytest.approx(record.peak_bytes, abs=1)
    assert record.pieces >= math.ceil(weight_factor * k * n * 4 / budget.node_bytes)
    if record.axis is SplitAxis.REDUCTION and record.pieces > 2:  # one fewer would not fit
        fewer, other = split_operator(graph, "mm", axis=record.axis, pieces=record.pieces - 1)
        assert max(_group_working_sets(fewer, other.nodes, weight_factor,
                                       budget.node_bytes)) > budget.node_bytes
    _check_same(graph, split, {"x": _array(rng, (rows, k))})


def test_a_concat_that_cannot_join_the_last_piece_stands_alone() -> None:
    """Room for the Concat (the output twice) but not for it and a single column more: the
    pieces fit alone, the Concat alone, and the whole output's crossing is counted."""
    rng = np.random.default_rng(4)
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", FLOAT, [16, 64])],
                   [helper.make_tensor_value_info("y", FLOAT, [16, 256])],
                   [numpy_helper.from_array(_array(rng, (64, 256)), "w")])
    graph = _graph(model)
    output_bytes = 16 * 256 * 4
    budget = SplitBudget(node_bytes=2 * output_bytes + 100)
    split, (record,) = split_oversize_operators(graph, budget)
    assert record.axis is SplitAxis.OUTPUT
    groups = _group_working_sets(split, record.nodes, 1.0, budget.node_bytes)
    assert len(groups) == record.pieces + 1 and max(groups) <= budget.node_bytes
    assert max(groups) == pytest.approx(record.peak_bytes, abs=1)
    assert record.transfer_bytes > output_bytes
    _check_same(graph, split, {"x": _array(rng, (16, 64))})


def test_a_graph_without_oversize_nodes_is_returned_as_it_is() -> None:
    graph = _graph(huge_matmul_model(64), {"x": (1, 64)})
    same, records = split_oversize_operators(graph, SplitBudget(node_bytes=1e9))
    assert same is graph and records == ()


def test_vgg_like_classifier_splits_k_and_lm_head_splits_n() -> None:
    """Long input, short output: the accumulator is small, so K. Short input, long output
    over many rows: the Concat carries far less than an accumulator, so N."""
    rng = np.random.default_rng(0)
    classifier = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
                        [helper.make_tensor_value_info("x", FLOAT, [1, 4096])],
                        [helper.make_tensor_value_info("y", FLOAT, [1, 256])],
                        [numpy_helper.from_array(_array(rng, (256, 4096)), "w"),
                         numpy_helper.from_array(_array(rng, (256,)), "b")])
    head = _model([helper.make_node("Transpose", ["wte"], ["wte_t"], name="t", perm=[1, 0]),
                   helper.make_node("MatMul", ["h", "wte_t"], ["logits"], name="head")],
                  [helper.make_tensor_value_info("h", FLOAT, [1, 8, 64])],
                  [helper.make_tensor_value_info("logits", FLOAT, [1, 8, 8192])],
                  [numpy_helper.from_array(_array(rng, (8192, 64)), "wte")])
    budget = SplitBudget(node_bytes=1.5 * 2**20)
    _, (fc,) = split_oversize_operators(_graph(classifier), budget)
    _, (lm,) = split_oversize_operators(_graph(head), budget)
    assert fc.axis is SplitAxis.REDUCTION and fc.pieces == 3
    assert lm.axis is SplitAxis.OUTPUT
    for axis in SplitAxis:  # the choice is the cheaper of the two
        _, other = split_operator(_graph(head), "head", axis=axis, pieces=lm.pieces)
        assert lm.transfer_bytes <= other.transfer_bytes


def test_tied_table_stays_for_its_lookup_and_the_transpose_goes() -> None:
    rng = np.random.default_rng(1)
    model = _model([helper.make_node("Gather", ["wte", "ids"], ["e"], name="lookup"),
                    helper.make_node("Transpose", ["wte"], ["wte_t"], name="t", perm=[1, 0]),
                    helper.make_node("MatMul", ["e", "wte_t"], ["logits"], name="head")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                   [helper.make_tensor_value_info("logits", FLOAT, [1, 8, 2000])],
                   [numpy_helper.from_array(_array(rng, (2000, 24)), "wte")])
    graph = _graph(model)
    split, (record,) = split_oversize_operators(graph, SplitBudget(node_bytes=200_000))
    assert [n.op_type for n in split.nodes][:1] == ["Gather"]
    assert "Transpose" not in [n.op_type for n in split.nodes]
    assert "wte" in split.initializer_bytes and "wte_t" not in split.tensors
    assert max(_node_working_sets(split)[n] for n in record.nodes) <= 200_000
    _check_same(graph, split, {"ids": rng.integers(0, 2000, (1, 8))})


def test_a_transposed_weight_is_counted_once_as_the_matmul_weight() -> None:
    """ONNX Runtime folds the Transpose of a weight at session start and drops the source
    (NOTE_SESSION_CONSTANTS): the copy is the MatMul's weight, never an activation, so no
    node holds the table twice and no split is needed to remove a copy."""
    rng = np.random.default_rng(3)
    model = _model([helper.make_node("Transpose", ["wte"], ["wte_t"], name="t", perm=[1, 0]),
                    helper.make_node("MatMul", ["h", "wte_t"], ["logits"], name="head")],
                   [helper.make_tensor_value_info("h", FLOAT, [1, 2, 16])],
                   [helper.make_tensor_value_info("logits", FLOAT, [1, 2, 3000])],
                   [numpy_helper.from_array(_array(rng, (3000, 16)), "wte")])
    graph = _graph(model)
    table, h, logits = 3000 * 16 * 4, 2 * 16 * 4, 2 * 3000 * 4
    sets = _node_working_sets(graph)
    assert sets["head"] == table + h + logits
    assert sets["t"] == table + h  # the source and h; the copy is not live
    split, records = split_oversize_operators(graph, SplitBudget(node_bytes=table + h + logits))
    assert split is graph and not records


@pytest.mark.parametrize("axis", list(SplitAxis))
def test_a_symbolic_batch_axis_stays_symbolic_in_the_pieces(axis: SplitAxis) -> None:
    """The batch the model keeps symbolic (the prepared model says so, a concrete copy gives
    the sizes): the pieces' tensors declare it symbolic too and run at any batch."""
    rng = np.random.default_rng(6)
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", FLOAT, ["N", 7, 24])],
                   [helper.make_tensor_value_info("y", FLOAT, ["N", 7, 40])],
                   [numpy_helper.from_array(_array(rng, (24, 40)), "w")])
    sizes = {"x": (1, 7, 24)}
    symbolic, concrete = prepare_symbolic(model, sizes, symbolic_axes(model))
    graph = ModelGraph(symbolic, concrete=concrete)
    split, record = split_operator(graph, "mm", axis=axis, pieces=3)
    new = [o for n in split.nodes if n.name in record.nodes for o in n.output if o != "y"]
    assert new and all(split.symbolic_dims[name][0] == "batch" for name in new)
    assert all(split.tensors[name].shape[0] == 1 for name in new)
    declared = {v.name: v for v in split.model.graph.value_info}
    assert all(declared[name].type.tensor_type.shape.dim[0].dim_param == "batch"
               for name in new)
    for batch in (1, 3):
        _check_same(graph, split, {"x": _array(rng, (batch, 7, 24))})


def test_measured_tensors_stay_measured_and_their_readers_unsplit() -> None:
    """A tensor whose shape had to be measured (shape inference left it open) may change
    shape with the input values: its reader keeps its node, and the rewritten graph gets
    the measured shape again (only that one: the new tensors are declared)."""
    rng = np.random.default_rng(5)
    model = _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                    helper.make_node("MatMul", ["r", "w1"], ["m"], name="mm1"),
                    helper.make_node("Tanh", ["m"], ["t"], name="tanh"),
                    helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2")],
                   [helper.make_tensor_value_info("x", FLOAT, [2, 64])],
                   [helper.make_tensor_value_info("y", FLOAT, [2, 64])],
                   [numpy_helper.from_array(_array(rng, (64, 64)), "w1"),
                    numpy_helper.from_array(_array(rng, (64, 64)), "w2")])
    prepared = prepare_model(model, {})
    known = ModelGraph(prepared).tensors
    without = [v for v in prepared.graph.value_info if v.name != "r"]
    del prepared.graph.value_info[:]
    prepared.graph.value_info.extend(without)
    graph = ModelGraph(prepared, {"r": known["r"]})
    split, records = split_oversize_operators(graph, SplitBudget(node_bytes=12_000))
    assert [r.node for r in records] == ["mm2"]
    assert "mm1" in [n.name for n in split.nodes]
    assert split.tensors["r"] == known["r"]
    assert split.data_dependent == graph.data_dependent == {"r"}


def test_nodes_that_cannot_be_split_are_left_alone() -> None:
    rng = np.random.default_rng(2)
    grouped = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="grouped", group=2,
                                       kernel_shape=[1, 1])],
                     [helper.make_tensor_value_info("x", FLOAT, [1, 4, 3, 3])],
                     [helper.make_tensor_value_info("y", FLOAT, [1, 64, 3, 3])],
                     [numpy_helper.from_array(_array(rng, (64, 2, 1, 1)), "w")])
    graph = _graph(grouped)
    assert split_oversize_operators(graph, SplitBudget(node_bytes=100)) == (graph, ())
    with pytest.raises(ValueError, match="not a MatMul, Gemm or Conv"):
        split_operator(graph, "grouped", axis=SplitAxis.OUTPUT, pieces=2)
    # Activations alone above the budget: no number of pieces helps.
    big_rows = _graph(huge_matmul_model(64), {"x": (1, 64)})
    assert split_oversize_operators(big_rows, SplitBudget(node_bytes=10))[1] == ()


def test_bad_requests_say_what_is_wrong() -> None:
    graph = _graph(huge_matmul_model(8), {"x": (1, 8)})
    with pytest.raises(ValueError, match="no node named 'nope'"):
        split_operator(graph, "nope", axis=SplitAxis.OUTPUT, pieces=2)
    with pytest.raises(ValueError, match=r"pieces must be in 2\.\.8"):
        split_operator(graph, "huge_matmul", axis=SplitAxis.OUTPUT, pieces=9)
    with pytest.raises(ValueError, match="leaves nothing"):
        SplitBudget.for_enclave(usable_epc_bytes=2**20, runtime_overhead_bytes=2**20)


def test_record_round_trips_and_names_its_stages() -> None:
    graph = _graph(huge_matmul_model(16), {"x": (1, 16)})
    _, record = split_operator(graph, "huge_matmul", axis=SplitAxis.REDUCTION, pieces=3)
    assert SplitOperator.from_dict(record.to_dict()) == record
    assert (record.start, record.end) == (1, 1 + len(record.nodes))
    assert record.stages([0, 1, record.end]) == [1]
    assert record.stages([0, 2, record.end]) == [0, 1]
    assert "3 pieces along the reduction dimension" in record.describe()
    with pytest.raises(ValueError, match="not a split operator record"):
        SplitOperator.from_dict({"node": "x"})
