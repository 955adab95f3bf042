from __future__ import annotations

import itertools

import numpy as np
import pytest

from smlaas.errors import GraphError
from smlaas.graph import ModelGraph, prepare_model, segment_memory
from smlaas.zoo import build_model
from tests.models import chain_model, exporter_style_model, if_model, skip_model


def analysed(model, sizes=None) -> ModelGraph:
    return ModelGraph(prepare_model(model, sizes or {}))


def test_cut_tensors_of_a_chain_are_single() -> None:
    graph = analysed(chain_model(), {"": (1, 8)})
    assert graph.cut_tensors(0) == ["x"]
    assert graph.cut_tensors(3) == ["t0"]
    assert graph.cut_tensors(graph.node_count) == ["y"]
    assert all(graph.cut_bytes_by_position() == 32)


def test_skip_connection_and_early_output_cross_cuts() -> None:
    graph = analysed(skip_model())
    # After relu: its output (also a graph output) and x (needed by add_skip).
    assert sorted(graph.cut_tensors(1)) == ["early", "x"]
    assert sorted(graph.cut_tensors(3)) == ["early", "squashed", "x"]
    assert sorted(graph.cut_tensors(4)) == ["early", "y"]
    assert list(graph.cut_count_by_position()) == [1, 2, 3, 3, 2]


def test_if_node_reads_outer_scope_tensor() -> None:
    graph = analysed(if_model())
    if_position = [n.name for n in graph.nodes].index("if")
    # 'h' is only read inside the branches, yet it must cross the cut before the If.
    assert "h" in graph.cut_tensors(if_position)
    assert graph.subgraph_nodes() == ["if"]


def test_constant_nodes_become_initializers_and_nodes_get_names() -> None:
    graph = analysed(exporter_style_model(), {"": (2, 3, 8, 8)})
    assert all(n.op_type != "Constant" for n in graph.nodes)
    names = [n.name for n in graph.nodes]
    assert all(names) and len(set(names)) == len(names)
    assert graph.tensors["flat"].shape == (2, 256)


def test_topological_sort_repairs_order() -> None:
    model = chain_model()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    graph = analysed(model, {"": (1, 8)})
    assert [n.name for n in graph.nodes] == [n.name for n in nodes]


def test_dangling_input_is_a_graph_error() -> None:
    model = chain_model()
    model.graph.node[0].input[0] = "missing"
    with pytest.raises(GraphError, match="missing"):
        prepare_model(model, {"": (1, 8)})


def _brute_force_memory(graph: ModelGraph, i: int, j: int) -> tuple[int, int]:
    used = {n for names in graph.node_inputs[i:j] for n in names}
    weights = sum(b for name, b in graph.initializer_bytes.items() if name in used)
    live = graph.live_bytes_by_step()
    return weights, int(max(live[i:j]))


@pytest.mark.parametrize("make", [
    lambda: analysed(skip_model()),
    lambda: analysed(chain_model(), {"": (3, 8)}),
    lambda: analysed(build_model("mobilenet_v2", (1, 3, 32, 32)), {"": (1, 3, 32, 32)}),
])
def test_segment_memory_matches_brute_force(make) -> None:
    graph = make()
    memory = segment_memory(graph)
    n = graph.node_count
    pairs = list(itertools.combinations(range(n + 1), 2))
    rng = np.random.default_rng(0)
    for index in rng.choice(len(pairs), size=min(60, len(pairs)), replace=False):
        i, j = pairs[index]
        weights, peak = _brute_force_memory(graph, i, j)
        assert memory.weight_bytes[i, j] == weights
        assert memory.peak_activation_bytes[i, j] == peak


def test_live_bytes_hold_a_skip_tensor_through_the_stage() -> None:
    graph = analysed(skip_model())
    live = graph.live_bytes_by_step()
    # At 'sigmoid' (step 2): x (held for add_skip), early (graph output), doubled, squashed.
    assert live[2] == 4 * 24


def test_embedding_lookup_touches_only_its_rows() -> None:
    graph = analysed(build_model("bert_base", (1, 8)), {"": (1, 8)})
    memory = segment_memory(graph)
    n = graph.node_count
    table = graph.initializer_bytes["embeddings.word_embeddings.weight"]
    # The position and token-type lookups have constant indices: ORT folds them into the
    # rows they read and drops the tables and indices (NOTE_SESSION_CONSTANTS).
    folded = sum(graph.initializer_bytes[name] for name in (
        "embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight",
        "const.zero_start", "embeddings.seq_len", "const.token_type_zero")) - (8 + 1) * 768 * 4
    assert memory.weight_bytes[0, n] - memory.touched_weight_bytes[0, n] == \
        table - 8 * 4096 + folded
