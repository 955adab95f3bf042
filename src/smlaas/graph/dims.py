"""Reading tensor dimensions the way ONNX Runtime reads them (pure).

A dimension is *fixed* when it has a ``dim_value`` >= 0. PaddlePaddle's exporter writes
``dim_value: -1`` for a dynamic axis; ONNX Runtime treats any negative value as symbolic (its
``get_inputs()`` reports ``None``), and so does smlaas: every place that reads a dimension goes
through :func:`fixed_dim`, and :func:`clear_negative_dims` rewrites such dimensions as plain
unknown ones before ONNX shape inference, which would otherwise take ``-1`` for a size and
report conflicts with the sizes it infers.
"""

from __future__ import annotations

import onnx


def fixed_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """The dimension's size when fixed; None when symbolic (a name, nothing, or < 0)."""
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return int(dim.dim_value)
    return None


def static_shape(type_proto: onnx.TypeProto | None) -> tuple[int, ...] | None:
    """The shape of a tensor type when every dimension is fixed, else None."""
    if type_proto is None or not type_proto.HasField("tensor_type") or \
            not type_proto.tensor_type.HasField("shape"):
        return None
    dims = [fixed_dim(d) for d in type_proto.tensor_type.shape.dim]
    if any(d is None for d in dims):
        return None
    return tuple(d for d in dims if d is not None)


def clear_negative_dims(graph: onnx.GraphProto) -> int:
    """Turns, in place, every negative ``dim_value`` of ``graph``'s inputs, outputs and
    value_info, and of its subgraphs', into an unknown dimension. Returns how many."""
    cleared = 0
    for value in [*graph.input, *graph.output, *graph.value_info]:
        cleared += _clear_type(value.type)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                cleared += clear_negative_dims(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                cleared += sum(clear_negative_dims(g) for g in attr.graphs)
    return cleared


def _clear_type(type_proto: onnx.TypeProto) -> int:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        cleared = 0
        for dim in type_proto.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
                cleared += 1
        return cleared
    if kind == "sequence_type":
        return _clear_type(type_proto.sequence_type.elem_type)
    if kind == "optional_type":
        return _clear_type(type_proto.optional_type.elem_type)
    if kind == "map_type":
        return _clear_type(type_proto.map_type.value_type)
    return 0


def loosen_for_control_flow(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as ONNX Runtime should load it: when it has If/Loop/Scan nodes, a copy whose
    inputs keep their rank but not their sizes and whose value_info is dropped; otherwise the
    model itself.

    ONNX Runtime type-checks every branch of an If against the types of what it reads from
    the outer scope, the branch not taken included. Exporters guard squeezes and unsqueezes
    with Ifs on shapes whose branches have different ranks (silero-vad); with symbolic sizes
    ORT types them loosely and the model loads, with fixed sizes it types a later LSTM's input
    with the wrong rank and refuses the model. Sizes are fixed for smlaas's analysis only; the
    sessions get them from the tensors they are fed.
    """
    if not any(_has_subgraph(node) for node in model.graph.node):
        return model
    loose = onnx.ModelProto()
    loose.CopyFrom(model)
    for value in loose.graph.input:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            for dim in value.type.tensor_type.shape.dim:
                dim.Clear()
    del loose.graph.value_info[:]
    return loose


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)
