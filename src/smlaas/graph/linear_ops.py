"""MatMul, Gemm and Conv nodes seen as ``y = x @ W (+ bias)``, and their rewrite into pieces
(pure). :mod:`smlaas.graph.splitting` decides what to split; this module knows the operators.

A *reduction* split cuts the reduction dimension K into pieces: one Split node slices x along
K, piece i computes ``x_i @ W[k_i]`` and adds it into an accumulator (``MatMul`` then ``Add``;
a Gemm takes the accumulator as its C input with ``beta = 1``, so the bias is added once, by
piece 0). An *output* split cuts the output dimension N (output channels of a Conv): every
piece reads the whole x and computes its columns, and a Concat joins them. The last node of
either chain produces the original output name, so consumers are unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from smlaas.graph.analysis import ModelGraph, TensorInfo, element_size


class SplitAxis(enum.Enum):
    REDUCTION = "reduction"
    """The reduction dimension K; partial products add into an accumulator."""
    OUTPUT = "output"
    """The output dimension N (output channels of a Conv); pieces are concatenated."""


Dims = tuple[int | str | None, ...]
"""A tensor's dimensions as the model declares them: a dim_param (or None) where symbolic."""


@dataclass
class Replacement:
    """What replaces one node: new nodes in order, new initializers and new tensors (sizes at
    the given input size, and the declared dims of those with a symbolic axis)."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    tensors: list[TensorInfo] = field(default_factory=list)
    symbolic_dims: dict[str, Dims] = field(default_factory=dict)


class Names:
    """Fresh node, tensor and initializer names that clash with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self._used = {n.name for n in graph.node} | {t.name for t in graph.initializer}
        self._used |= {v.name for v in list(graph.input) + list(graph.output)
                       + list(graph.value_info)}
        self._used |= {o for n in graph.node for o in n.output}

    def fresh(self, base: str) -> str:
        name, suffix = base, 1
        while name in self._used:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self._used.add(name)
        return name


@dataclass(frozen=True)
class LinearNode:
    """One splittable node. ``weight`` is the logical [K, N] matrix for MatMul and Gemm (a view
    of the stored initializer, transposed where the node transposes it) and the stored
    [Cout, Cin, ...] kernel for Conv."""

    node: onnx.NodeProto
    position: int
    x: TensorInfo
    y: TensorInfo
    weight: np.ndarray
    weight_name: str
    weight_elem_type: int
    x_axis: int
    """Axis of x along K (reduction splits slice x there)."""
    y_axis: int
    """Axis of y along N (output splits concatenate there)."""
    bias: np.ndarray | None = None
    """Gemm's C or Conv's B when it is an initializer."""
    bias_input: str = ""
    """Gemm's C or Conv's B as named in the node ('' if absent)."""
    bias_varies_along_output: bool = False
    """An activation C (not an initializer) whose last axis is N: each output piece would
    need a run-time slice of it, so the output split is not offered."""
    transpose_node: str | None = None
    """A Transpose node that only turns an initializer into this MatMul's B; it goes too."""
    x_dims: Dims = ()
    y_dims: Dims = ()
    """x's and y's declared dims where an axis is symbolic (the batch), else empty. K and N
    are weight dimensions, so they are always fixed and the pieces keep the other axes."""

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def reduction_size(self) -> int | None:
        return None if self.op_type == "Conv" else int(self.weight.shape[0])

    @property
    def output_size(self) -> int:
        return int(self.weight.shape[0] if self.op_type == "Conv" else self.weight.shape[1])

    @property
    def weight_bytes(self) -> int:
        return int(self.weight.size) * element_size(self.weight_elem_type)

    @property
    def bias_bytes(self) -> int:
        return 0 if self.bias is None else int(self.bias.nbytes)

    def split_size(self, axis: SplitAxis) -> int:
        """K or N: the size of the dimension ``axis`` splits."""
        if axis is SplitAxis.OUTPUT:
            return self.output_size
        if self.reduction_size is None:
            raise ValueError(f"{self.op_type} node {self.name!r} has no reduction split")
        return self.reduction_size

    def axes(self) -> list[SplitAxis]:
        """The splits this node allows, the reduction split first."""
        axes = []
        if self.reduction_size is not None and self.reduction_size > 1:
            axes.append(SplitAxis.REDUCTION)
        if self.output_size > 1 and self._bias_allows_output_split():
            axes.append(SplitAxis.OUTPUT)
        return axes

    def _bias_allows_output_split(self) -> bool:
        return not (self.bias is None and self.bias_varies_along_output)

    def piece_weight_bytes(self, axis: SplitAxis, low: int, high: int, index: int) -> int:
        """Initializer bytes piece ``index`` (covering ``[low, high)`` of the split
        dimension) holds, its share of the bias included."""
        share = (high - low) / self.split_size(axis)
        weight = round(self.weight_bytes * share)
        if axis is SplitAxis.REDUCTION:
            return weight + (self.bias_bytes if index == 0 else 0)
        return weight + (round(self.bias_bytes * share) if self._bias_sliced() else
                         self.bias_bytes)

    def _bias_sliced(self) -> bool:
        if self.bias is None:
            return False
        if self.op_type == "Conv":
            return True
        return self.bias.ndim >= 1 and self.bias.shape[-1] == self.output_size

    # -- rewriting -----------------------------------------------------------------------
    def rewrite(self, axis: SplitAxis, bounds: list[int], names: Names, opset: int
                ) -> Replacement:
        """The nodes that compute this node's output in ``len(bounds) - 1`` pieces, piece i
        covering ``[bounds[i], bounds[i + 1])`` of the split dimension."""
        if axis is SplitAxis.REDUCTION:
            return self._rewrite_reduction(bounds, names, opset)
        return self._rewrite_output(bounds, names)

    def _rewrite_reduction(self, bounds: list[int], names: Names, opset: int) -> Replacement:
        out = Replacement()
        pieces = len(bounds) - 1
        sizes = np.diff(np.array(bounds, dtype=np.int64))
        slices = [self._tensor(out, names.fresh(f"{self.x.name}__{self.name}_k{i}"), self.x,
                               self.x_axis, int(sizes[i])) for i in range(pieces)]
        split_name = names.fresh(f"{self.name}__split_input")
        if opset >= 13:
            sizes_name = names.fresh(f"{self.name}__split_sizes")
            out.initializers.append(numpy_helper.from_array(sizes, sizes_name))
            out.nodes.append(helper.make_node("Split", [self.x.name, sizes_name], slices,
                                              name=split_name, axis=self.x_axis))
        else:
            out.nodes.append(helper.make_node("Split", [self.x.name], slices, name=split_name,
                                              axis=self.x_axis, split=sizes.tolist()))
        accumulator = ""
        for i in range(pieces):
            last = i == pieces - 1
            weight = self._piece_initializer(out, names, SplitAxis.REDUCTION, bounds, i)
            product = self.y.name if last and (self.op_type == "Gemm" or i == 0) else \
                self._tensor(out, names.fresh(f"{self.y.name}__{self.name}_part{i}"), self.y)
            node_name = names.fresh(f"{self.name}__part{i}")
            if self.op_type == "Gemm":
                bias = self.bias_input if i == 0 else accumulator
                attributes = self._attributes()
                if i:
                    attributes["beta"] = 1.0
                out.nodes.append(helper.make_node(
                    "Gemm", [slices[i], weight] + ([bias] if bias else []), [product],
                    name=node_name, **attributes))
                accumulator = product
                continue
            out.nodes.append(helper.make_node("MatMul", [slices[i], weight], [product],
                                              name=node_name))
            if i == 0:
                accumulator = product
                continue
            total = self.y.name if last else self._tensor(
                out, names.fresh(f"{self.y.name}__{self.name}_sum{i}"), self.y)
            out.nodes.append(helper.make_node("Add", [accumulator, product], [total],
                                              name=names.fresh(f"{self.name}__add{i}")))
            accumulator = total
        return out

    def _rewrite_output(self, bounds: list[int], names: Names) -> Replacement:
        out = Replacement()
        parts = []
        for i in range(len(bounds) - 1):
            weight = self._piece_initializer(out, names, SplitAxis.OUTPUT, bounds, i)
            part = self._tensor(out, names.fresh(f"{self.y.name}__{self.name}_part{i}"),
                                self.y, self.y_axis, bounds[i + 1] - bounds[i])
            inputs = [self.x.name, weight]
            bias = self._piece_bias(out, names, bounds, i)
            if bias:
                inputs.append(bias)
            out.nodes.append(helper.make_node(self.op_type, inputs, [part],
                                              name=names.fresh(f"{self.name}__part{i}"),
                                              **self._attributes()))
            parts.append(part)
        out.nodes.append(helper.make_node("Concat", parts, [self.y.name],
                                          name=names.fresh(f"{self.name}__concat"),
                                          axis=self.y_axis))
        return out

    def _piece_initializer(self, out: Replacement, names: Names, axis: SplitAxis,
                           bounds: list[int], index: int) -> str:
        low, high = bounds[index], bounds[index + 1]
        if self.op_type == "Conv":
            stored = self.weight[low:high]
        else:
            logical = self.weight[low:high, :] if axis is SplitAxis.REDUCTION else \
                self.weight[:, low:high]
            stored = logical.T if self._attribute("transB", 0) else logical
        name = names.fresh(f"{self.weight_name}__{self.name}_part{index}")
        out.initializers.append(numpy_helper.from_array(np.ascontiguousarray(stored), name))
        return name

    def _piece_bias(self, out: Replacement, names: Names, bounds: list[int], index: int
                    ) -> str:
        if not self._bias_sliced() or self.bias is None:
            return self.bias_input
        low, high = bounds[index], bounds[index + 1]
        name = names.fresh(f"{self.bias_input}__{self.name}_part{index}")
        piece = self.bias[low:high] if self.op_type == "Conv" else self.bias[..., low:high]
        out.initializers.append(numpy_helper.from_array(np.ascontiguousarray(piece), name))
        return name

    def _tensor(self, out: Replacement, name: str, like: TensorInfo, axis: int | None = None,
                size: int = 0) -> str:
        shape = list(like.shape)
        declared = list(self.x_dims if like is self.x else self.y_dims)
        if axis is not None:
            shape[axis] = size
            if declared:
                declared[axis] = size
        out.tensors.append(TensorInfo(name, like.elem_type, tuple(shape)))
        if declared:
            out.symbolic_dims[name] = tuple(declared)
        return name

    def _attributes(self) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in self.node.attribute}

    def _attribute(self, name: str, default: Any) -> Any:
        return self._attributes().get(name, default)


# -- recognising splittable nodes ------------------------------------------------------------
def linear_node(graph: ModelGraph, position: int,
                initializers: Mapping[str, onnx.TensorProto],
                producers: Mapping[str, onnx.NodeProto],
                consumers: Mapping[str, Iterable[int]]) -> LinearNode | None:
    """The node at ``position`` as a :class:`LinearNode`, or None when it is not a MatMul,
    Gemm or Conv (group 1) of an activation with a constant weight."""
    node = graph.nodes[position]
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    x_name = node.input[0] if node.input else ""
    if x_name not in graph.tensors or node.output[0] not in graph.tensors:
        return None
    x, y = graph.tensors[x_name], graph.tensors[node.output[0]]
    op = None
    if node.op_type == "MatMul":
        op = _matmul(graph, position, x, y, initializers, producers, consumers)
    elif node.op_type == "Gemm":
        op = _gemm(graph, position, x, y, initializers)
    elif node.op_type == "Conv":
        op = _conv(graph, position, x, y, initializers)
    if op is None:
        return None
    return dataclasses.replace(op, x_dims=graph.symbolic_dims.get(x.name, ()),
                               y_dims=graph.symbolic_dims.get(y.name, ()))


def _matmul(graph: ModelGraph, position: int, x: TensorInfo, y: TensorInfo,
            initializers: Mapping[str, onnx.TensorProto],
            producers: Mapping[str, onnx.NodeProto],
            consumers: Mapping[str, Iterable[int]]) -> LinearNode | None:
    node = graph.nodes[position]
    source, transpose = node.input[1], None
    if source not in initializers:
        # B = Transpose(initializer), as a tied LM head reads the embedding table.
        producer = producers.get(source)
        if producer is None or producer.op_type != "Transpose" or producer.domain not in (
                "", "ai.onnx") or producer.input[0] not in initializers:
            return None
        perm = [list(a.ints) for a in producer.attribute if a.name == "perm"]
        if perm and perm[0] != [1, 0]:
            return None
        if list(consumers.get(source, ())) != [position] or source in graph.output_names:
            return None
        source, transpose = producer.input[0], producer.name
    tensor = initializers[source]
    if len(tensor.dims) != 2 or not x.shape or x.shape[-1] == 0:
        return None
    stored = numpy_helper.to_array(tensor)
    weight = stored.T if transpose else stored
    if weight.shape[0] != x.shape[-1]:
        return None
    return LinearNode(node, position, x, y, weight, source, tensor.data_type,
                      x_axis=len(x.shape) - 1, y_axis=len(y.shape) - 1,
                      transpose_node=transpose)


def _gemm(graph: ModelGraph, position: int, x: TensorInfo, y: TensorInfo,
          initializers: Mapping[str, onnx.TensorProto]) -> LinearNode | None:
    node = graph.nodes[position]
    if len(node.input) < 2 or node.input[1] not in initializers or len(x.shape) != 2:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tensor = initializers[node.input[1]]
    stored = numpy_helper.to_array(tensor)
    weight = stored.T if attributes.get("transB", 0) else stored
    bias_input = node.input[2] if len(node.input) > 2 else ""
    bias = numpy_helper.to_array(initializers[bias_input]) if bias_input in initializers \
        else None
    if bias_input and bias is None and bias_input not in graph.tensors:
        return None
    varies = bias is None and bool(bias_input) and graph.tensors[bias_input].shape[-1:] == (
        y.shape[1],) and y.shape[1] > 1
    return LinearNode(node, position, x, y, weight, node.input[1], tensor.data_type,
                      x_axis=0 if attributes.get("transA", 0) else 1, y_axis=1, bias=bias,
                      bias_input=bias_input, bias_varies_along_output=varies)


def _conv(graph: ModelGraph, position: int, x: TensorInfo, y: TensorInfo,
          initializers: Mapping[str, onnx.TensorProto]) -> LinearNode | None:
    node = graph.nodes[position]
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if group != 1 or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    bias_input = node.input[2] if len(node.input) > 2 else ""
    if bias_input and bias_input not in initializers:
        return None
    tensor = initializers[node.input[1]]
    bias = numpy_helper.to_array(initializers[bias_input]) if bias_input else None
    return LinearNode(node, position, x, y, numpy_helper.to_array(tensor), node.input[1],
                      tensor.data_type, x_axis=1, y_axis=1, bias=bias, bias_input=bias_input)
