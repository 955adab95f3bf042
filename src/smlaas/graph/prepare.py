"""Normalising a model before analysis (pure): fixed inputs, named nodes, topological order.

The prepared model is what gets profiled and cut, so its node names are the names that the
profile, the plan and the sub-models share.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from smlaas.errors import GraphError, ModelError
from smlaas.graph.dims import clear_negative_dims, static_shape
from smlaas.graph.folding import fold_shape_computations, inline_constant_branches
from smlaas.graph.input_size import fix_input_sizes, resolve_input_sizes
from smlaas.graph.subgraphs import has_subgraph, node_input_names

# Initializers up to this many elements stay in the shape-inference copy of the model, because
# shape computations (Reshape targets, Slice bounds) read their values; larger ones are weights.
_SHAPE_DATA_MAX_ELEMENTS = 1024
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli"})
# Each round folds what the previous round's shape inference made static.
_MAX_FOLDING_ROUNDS = 8


def prepare_model(model: onnx.ModelProto, input_sizes: Mapping[str, tuple[int, ...]], *,
                  symbolic_axes: Mapping[str, Mapping[int, str]] | None = None
                  ) -> onnx.ModelProto:
    """Fixes input sizes, folds Constant nodes into initializers, names every node uniquely,
    orders nodes topologically and runs ONNX shape inference.

    ``symbolic_axes`` (input name -> {axis: dim_param}) stay symbolic, so that no shape
    computation depending on them is folded (see :mod:`smlaas.graph.dynamic_axes`).

    Raises:
        InputSizeError: ``input_sizes`` does not fit the model's inputs.
        GraphError: the graph has a cycle or uses a tensor nothing produces.
    """
    shapes = resolve_input_sizes(model, input_sizes)
    prepared = fix_input_sizes(model, shapes, symbolic_axes=symbolic_axes)
    graph = prepared.graph
    clear_negative_dims(graph)
    _fold_constant_nodes(graph)
    _name_nodes(graph)
    _sort_topologically(graph)
    static = _infer_shapes(prepared)
    for _ in range(_MAX_FOLDING_ROUNDS):
        changed = fold_shape_computations(prepared, static) + inline_constant_branches(graph)
        if not changed:
            break
        _name_nodes(graph)
        static = _infer_shapes(prepared)
    if _produce_constant_outputs(graph):
        _infer_shapes(prepared)
    _schedule_weight_nodes(graph)
    return prepared


def _produce_constant_outputs(graph: onnx.GraphProto) -> bool:
    """A graph output that folding turned into an initializer (a Shape of a static tensor, a
    Constant) gets produced again by an Identity at the end, so that every output comes from
    a node and can leave a stage like any other tensor."""
    initializers = {t.name: t for t in graph.initializer}
    constant_outputs = [o.name for o in graph.output if o.name in initializers]
    for name in constant_outputs:
        source = f"{name}__constant"
        initializers[name].name = source
        graph.node.append(helper.make_node("Identity", [source], [name],
                                           name=f"{name}__constant_output"))
    return bool(constant_outputs)


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in list(graph.input) + list(graph.value_info):
        shape = static_shape(value.type)
        if shape is not None:
            shapes[value.name] = shape
    return shapes


def _fold_constant_nodes(graph: onnx.GraphProto) -> None:
    """Turns top-level Constant nodes into initializers, so they are weights, not activations
    that would cross every cut between the Constant and its consumer."""
    kept = []
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and not node.domain else None
        if value is None:
            kept.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants stay as nodes


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Gives every node a unique, non-empty name (profiles and plans refer to nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name
        if not name or name in seen:
            base = node.name or f"{node.op_type}_{index}"
            name, suffix = base, 1
            while name in seen:
                name, suffix = f"{base}__{suffix}", suffix + 1
            node.name = name
        seen.add(name)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Kahn's algorithm that keeps the file's order whenever it is already valid."""
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for output in node.output:
            if output:
                producer[output] = index
    waiting_on: list[set[int]] = []
    dependents: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for index, node in enumerate(nodes):
        deps = set()
        for name in node_input_names(node):
            if name in available:
                continue
            if name not in producer:
                raise GraphError(f"node {node.name!r} ({node.op_type}) reads tensor {name!r}, "
                                 f"which no node, input or initializer provides")
            deps.add(producer[name])
        deps.discard(index)
        waiting_on.append(deps)
        for dep in deps:
            dependents[dep].append(index)
    ready = [i for i, deps in enumerate(waiting_on) if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for dependent in dependents[index]:
            waiting_on[dependent].discard(index)
            if not waiting_on[dependent]:
                heapq.heappush(ready, dependent)
    if len(order) != len(nodes):
        stuck = sorted(set(range(len(nodes))) - set(order))[:3]
        raise GraphError("the graph has a cycle through nodes "
                         + ", ".join(repr(nodes[i].name) for i in stuck))
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _schedule_weight_nodes(graph: onnx.GraphProto) -> None:
    """Moves every node that computes from initializers only (a weight's DequantizeLinear
    in a QDQ model, a Transpose of a weight) to just before its first consumer.

    Quantisers write all weight DequantizeLinear nodes first; kept there, their float32
    outputs would be activations live from the top of the graph to their Conv, counted in
    every stage's working set and carried across every cut (a QDQ ResNet-50: 97 MiB).
    Scheduled next to its consumer a dequantized weight lives for one step, as it does in
    ONNX Runtime, which fuses or runs it right before the node that reads it.
    """
    available = {t.name for t in graph.initializer}
    weight_nodes: dict[str, onnx.NodeProto] = {}  # output name -> weight-only node
    for node in graph.node:
        names = node_input_names(node)
        if names and not has_subgraph(node) and node.op_type not in _RANDOM_OPS and all(
                name in available or name in weight_nodes for name in names):
            for output in node.output:
                if output:
                    weight_nodes[output] = node
    if not weight_nodes:
        return
    emitted: set[int] = set()
    order: list[onnx.NodeProto] = []

    def emit_producers(names: list[str]) -> None:
        for name in names:
            producer = weight_nodes.get(name)
            if producer is not None and id(producer) not in emitted:
                emit_producers(node_input_names(producer))
                emitted.add(id(producer))
                order.append(producer)

    weight_ids = {id(n) for n in weight_nodes.values()}
    for node in graph.node:
        if id(node) in weight_ids:
            continue
        emit_producers(node_input_names(node))
        order.append(node)
    order.extend(n for n in graph.node if id(n) in weight_ids and id(n) not in emitted)
    if [id(n) for n in order] != [id(n) for n in graph.node]:
        del graph.node[:]
        graph.node.extend(order)


def _infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """ONNX shape inference on a copy without the large weights (so models of any size work);
    the inferred top-level value_info is copied back. Returns the static shapes inferred."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    graph = light.graph
    del graph.value_info[:]
    weights = [t for t in graph.initializer if np.prod(t.dims) > _SHAPE_DATA_MAX_ELEMENTS]
    kept = [t for t in graph.initializer if np.prod(t.dims) <= _SHAPE_DATA_MAX_ELEMENTS]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    existing_inputs = {i.name for i in graph.input}
    for tensor in weights:
        if tensor.name not in existing_inputs:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                             list(tensor.dims)))
    for output in graph.output:  # declared symbolic output dims would only conflict
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except onnx.shape_inference.InferenceError as err:
        raise ModelError(f"ONNX shape inference failed: {str(err).splitlines()[0]}") from err
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    inferred_outputs = {o.name: o for o in inferred.graph.output}
    for output in model.graph.output:
        if output.name in inferred_outputs and inferred_outputs[output.name].type.HasField(
                "tensor_type") and inferred_outputs[output.name].type.tensor_type.HasField("shape"):
            output.type.CopyFrom(inferred_outputs[output.name].type)
    return _static_shapes(inferred.graph)
