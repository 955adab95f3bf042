"""Folding shape computations once the inputs are fixed (pure).

Exporters write ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains so that the batch
dimension can vary. With the inputs fixed those chains are constants; folding them (as
onnx-simplifier does) keeps tiny int64 tensors from crossing every cut and lets shape
inference see through the Reshape. Nodes are evaluated with onnx's reference evaluator.

An If whose condition folding made constant (an exporter's guard on a static shape) is
replaced by the branch it takes, as onnx-simplifier does. Branches themselves are not folded:
ONNX Runtime type-checks the branch not taken too, and folding it with shapes it never runs
at can make it ill-typed (silero-vad's 8 kHz branch at 16 kHz sizes).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

# Only small results are folded: folding must never turn computation into stored weights.
_MAX_FOLDED_ELEMENTS = 1024
_NEVER_FOLD = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli", "If", "Loop", "Scan"})


def fold_shape_computations(model: onnx.ModelProto,
                            static_shapes: dict[str, tuple[int, ...]]) -> int:
    """Replaces, in place, nodes computable from constants and static shapes by initializers.

    Args:
        model: the model, changed in place.
        static_shapes: tensor name -> static shape (graph inputs and inferred tensors).

    Returns:
        The number of nodes folded.
    """
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    constants: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in graph.initializer
        if t.name not in graph_inputs and math.prod(t.dims) <= _MAX_FOLDED_ELEMENTS
    }
    opsets = {o.domain: o.version for o in model.opset_import}
    kept: list[onnx.NodeProto] = []
    folded: list[onnx.TensorProto] = []
    for node in graph.node:
        values = _evaluate(node, constants, static_shapes, opsets)
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            constants[name] = value
            folded.append(numpy_helper.from_array(value, name))
    if folded:
        _replace_nodes(graph, kept, folded)
    return len(folded)


def _replace_nodes(graph: onnx.GraphProto, kept: list[onnx.NodeProto],
                   folded: list[onnx.TensorProto]) -> None:
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(folded)
    # Folded tensors are initializers now; stale value_info for them would conflict.
    names = {t.name for t in folded}
    kept_info = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


def inline_constant_branches(graph: onnx.GraphProto) -> int:
    """Replaces, in place, every top-level If whose condition is an initializer by the nodes
    of the branch it takes, so that they can be profiled and cut like any others.

    Returns:
        The number of If nodes inlined.
    """
    constants = {t.name: t for t in graph.initializer}
    count = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        taken = _taken_branch(node, constants)
        if taken is None:
            nodes.append(node)
            continue
        count += 1
        nodes.extend(taken.node)
        graph.initializer.extend(taken.initializer)
        constants.update((t.name, t) for t in taken.initializer)
        for inner, output in zip(taken.output, node.output):
            if output:
                nodes.append(helper.make_node("Identity", [inner.name], [output],
                                              name=f"{output}__inlined"))
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _taken_branch(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]
                  ) -> onnx.GraphProto | None:
    if node.op_type != "If" or node.domain not in ("", "ai.onnx") or \
            node.input[0] not in constants:
        return None
    condition = numpy_helper.to_array(constants[node.input[0]])
    if condition.size != 1:
        return None
    wanted = "then_branch" if bool(condition.reshape(-1)[0]) else "else_branch"
    return next((a.g for a in node.attribute if a.name == wanted), None)


def _evaluate(node: onnx.NodeProto, constants: dict[str, np.ndarray],
              static_shapes: dict[str, tuple[int, ...]], opsets: dict[str, int]
              ) -> list[np.ndarray] | None:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NEVER_FOLD:
        return None
    if node.op_type == "Shape":
        shape = static_shapes.get(node.input[0])
        if shape is None:
            return None
        start = next((a.i for a in node.attribute if a.name == "start"), 0)
        end = next((a.i for a in node.attribute if a.name == "end"), None)
        return [np.array(shape[start:end], dtype=np.int64)]
    inputs = [name for name in node.input if name]
    if (not inputs and node.op_type != "Constant") or any(name not in constants
                                                          for name in inputs):
        return None
    try:
        single = helper.make_model(
            helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(o)
                                                    for o in node.output if o]),
            opset_imports=[helper.make_opsetid("", opsets.get("", 17))])
        evaluator = ReferenceEvaluator(single)
        feeds = {name: constants[name] for name in inputs}
        results = evaluator.run(None, feeds)
    except Exception:  # the reference evaluator lacks some ops; leave such nodes be
        return None
    arrays = [np.asarray(r) for r in results]
    if any(a.size > _MAX_FOLDED_ELEMENTS or a.dtype == object for a in arrays):
        return None
    return arrays
