"""Operator splitting: nodes whose weights do not fit one enclave become chains of pieces
that do (pure).

Before planning, every MatMul, Gemm or Conv whose working set on its own (weights times the
cost model's weight factor, plus the activations live while it runs) exceeds the per-node
budget is rewritten by :mod:`smlaas.graph.linear_ops` into a chain of ordinary nodes, which
the planners may then place in different stages.

NOTE_SPLIT_CHOICE: which split, and into how many pieces.

- *What must fit*: every group of new nodes that has to share a stage fits the budget, each
  counted the way :meth:`~smlaas.graph.analysis.ModelGraph.live_bytes_by_step` counts it after
  the rewrite (so the estimate is exact, and tested as such). A reduction piece (its product
  and, for MatMul, its Add) holds ``k/K`` of the weights, x's slices not yet consumed, the
  accumulator coming in and its updated value; an output piece holds ``n/N`` of the weights,
  the whole x and the outputs of the pieces so far, which wait for the Concat; the Concat
  holds the output twice, and shares the last piece's group when the two fit together.
- *Pieces*: along K, the fewest equal pieces (their activations are about the same). Along
  N, the fewest pieces filled from the end: the last as wide as still fits with the Concat,
  so that the whole output never crosses a cut, then each earlier one as wide as fits. That
  puts every boundary as early as it can be, and a boundary carries the outputs so far.
- *Axis*: the one that moves fewer bytes over the boundaries between groups (each piece
  nearly fills an enclave, so most of them become cuts). A reduction boundary carries the
  accumulator (the size of the output) and x's remaining slices; an output boundary carries
  the whole x and the outputs so far (and the whole output before a Concat that stands
  alone). So a classifier with a long input and a short output (VGG's 25088 x 4096) splits
  K, and an LM head with a short input and a long output (768 x 50257 over 128 tokens) splits
  N. Ties go to fewer pieces, then to the reduction split. A Conv splits by output channels
  only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import helper

from smlaas.graph.analysis import ModelGraph, TensorInfo
from smlaas.graph.linear_ops import (
    Dims,
    LinearNode,
    Names,
    Replacement,
    SplitAxis,
    linear_node,
)
from smlaas.graph.split_footprint import Footprint, even_bounds
from smlaas.graph.subgraphs import node_input_names

__all__ = ["MARGIN_FRACTION", "SPLIT_NOTE", "SplitAxis", "SplitBudget", "SplitOperator",
           "split_operator", "split_oversize_operators"]

SPLIT_NOTE = "split_operators"
"""The key under which a plan's ``notes`` record the split operators."""
MARGIN_FRACTION = 0.05
"""Share of the usable EPC a split piece leaves free. [ASSUMED] ONNX Runtime's arena and
the cost model's 8 MiB runtime figure are estimates; 5% keeps a piece that is predicted to
fit from paging when they are a little off."""
MAX_PIECES = 256


@dataclass(frozen=True)
class SplitBudget:
    """What a single node may hold: ``weight_factor * weight bytes + live activation bytes``
    at most ``node_bytes`` (the runtime's own pages already taken off)."""

    node_bytes: float
    weight_factor: float = 1.0
    max_pieces: int = MAX_PIECES

    @classmethod
    def for_enclave(cls, *, usable_epc_bytes: float, runtime_overhead_bytes: float,
                    weight_factor: float = 1.0, margin_fraction: float = MARGIN_FRACTION
                    ) -> SplitBudget:
        """The budget of one enclave: its usable EPC less a margin and the runtime."""
        node_bytes = usable_epc_bytes * (1.0 - margin_fraction) - runtime_overhead_bytes
        if node_bytes <= 0:
            raise ValueError(f"usable EPC {usable_epc_bytes:.0f} bytes leaves nothing for a "
                             f"node after the margin and {runtime_overhead_bytes:.0f} bytes "
                             f"of runtime")
        return cls(node_bytes=node_bytes, weight_factor=weight_factor)


@dataclass(frozen=True)
class SplitOperator:
    """One operator that was split: what it was and what replaced it."""

    node: str
    op_type: str
    axis: SplitAxis
    pieces: int
    weight_bytes: int
    """The operator's weights (and bias), all pieces together."""
    largest_piece_weight_bytes: int
    transfer_bytes: int
    """Bytes the new tensors put on the boundaries between consecutive pieces, summed."""
    peak_bytes: int
    """The largest working set of one of its new nodes on its own (weights times the
    weight factor, plus live activations; the runtime's pages not included)."""
    nodes: tuple[str, ...]
    """The nodes that replace it, in order."""
    start: int = 0
    end: int = 0
    """Positions ``[start, end)`` of those nodes in the rewritten graph's order."""

    def stages(self, cuts: Sequence[int]) -> list[int]:
        """Indices of the stages (boundaries ``cuts``) that hold some of its pieces."""
        return [k for k, (low, high) in enumerate(zip(cuts, cuts[1:]))
                if low < self.end and self.start < high]

    def describe(self) -> str:
        mib = 1024 * 1024
        along = ("the reduction dimension (partial products into an accumulator)"
                 if self.axis is SplitAxis.REDUCTION else
                 "the output dimension (pieces concatenated)")
        return (f"{self.node} ({self.op_type}, {self.weight_bytes / mib:.1f} MiB of weights) "
                f"into {self.pieces} pieces along {along}, at most "
                f"{self.largest_piece_weight_bytes / mib:.1f} MiB each")

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "axis": self.axis.value,
                "pieces": self.pieces, "weight_bytes": self.weight_bytes,
                "largest_piece_weight_bytes": self.largest_piece_weight_bytes,
                "transfer_bytes": self.transfer_bytes, "peak_bytes": self.peak_bytes,
                "nodes": list(self.nodes),
                "start": self.start, "end": self.end}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitOperator:
        try:
            return cls(node=str(data["node"]), op_type=str(data["op_type"]),
                       axis=SplitAxis(data["axis"]), pieces=int(data["pieces"]),
                       weight_bytes=int(data["weight_bytes"]),
                       largest_piece_weight_bytes=int(data["largest_piece_weight_bytes"]),
                       transfer_bytes=int(data["transfer_bytes"]),
                       peak_bytes=int(data["peak_bytes"]),
                       nodes=tuple(str(n) for n in data.get("nodes", ())),
                       start=int(data.get("start", 0)), end=int(data.get("end", 0)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a split operator record: {err}") from err


@dataclass(frozen=True)
class _Choice:
    op: LinearNode
    axis: SplitAxis
    bounds: list[int]
    peak_bytes: float
    transfer_bytes: int


def split_oversize_operators(graph: ModelGraph, budget: SplitBudget
                             ) -> tuple[ModelGraph, tuple[SplitOperator, ...]]:
    """Splits every MatMul/Gemm/Conv that alone exceeds ``budget`` and can be split into
    pieces that fit (NOTE_SPLIT_CHOICE). Nodes that cannot are left as they are.

    Returns:
        The analysed rewritten model (``graph`` itself when nothing was split) and one record
        per split operator, in node order.
    """
    splitter = _Splitter(graph)
    live = graph.live_bytes_by_step()
    choices = []
    for position in range(graph.node_count):
        if not splitter.is_oversize(position, live, budget):
            continue
        op = splitter.linear_node(position)
        if op is None:
            continue
        choice = _choose(graph, op, live, budget)
        if choice is not None:
            choices.append(choice)
    if not choices:
        return graph, ()
    return splitter.rewrite(choices)


def split_operator(graph: ModelGraph, node: str, *, axis: SplitAxis, pieces: int
                   ) -> tuple[ModelGraph, SplitOperator]:
    """Splits the node named ``node`` into ``pieces`` equal pieces along ``axis``.

    Raises:
        ValueError: no such node, it cannot be split that way, or ``pieces`` is out of range.
    """
    names = [n.name for n in graph.nodes]
    if node not in names:
        raise ValueError(f"no node named {node!r} in the graph")
    splitter = _Splitter(graph)
    op = splitter.linear_node(names.index(node))
    if op is None:
        raise ValueError(f"node {node!r} is not a MatMul, Gemm or Conv (group 1) of an "
                         f"activation by a constant weight")
    if axis not in op.axes():
        raise ValueError(f"node {node!r} ({op.op_type}) cannot be split along the "
                         f"{axis.value} dimension")
    size = op.split_size(axis)
    if not 2 <= pieces <= size:
        raise ValueError(f"pieces must be in 2..{size} for {node!r}, got {pieces}")
    footprint = Footprint(graph, op, graph.live_bytes_by_step(), 1.0)
    bounds = even_bounds(size, pieces)
    choice = _Choice(op, axis, bounds, footprint.peak(axis, bounds),
                     footprint.transfer(axis, bounds))
    rewritten, records = splitter.rewrite([choice])
    return rewritten, records[0]


# -- choosing --------------------------------------------------------------------------------
def _node_bytes(graph: ModelGraph, position: int, live: np.ndarray,
                weight_factor: float) -> float:
    """The node's working set on its own, as the cost model counts segment [p, p + 1)."""
    touched = sum(graph.touched_initializer_bytes(name, position)
                  for name in graph.node_inputs[position] if graph.is_session_weight(name))
    return weight_factor * touched + float(live[position])


def _choose(graph: ModelGraph, op: LinearNode, live: np.ndarray, budget: SplitBudget
            ) -> _Choice | None:
    footprint = Footprint(graph, op, live, budget.weight_factor)
    limit = budget.node_bytes
    candidates = []
    for axis in op.axes():
        bounds = footprint.reduction_bounds(limit, budget.max_pieces) \
            if axis is SplitAxis.REDUCTION else footprint.output_bounds(limit)
        if bounds is not None and len(bounds) - 1 <= budget.max_pieces:
            candidates.append(_Choice(op, axis, bounds, footprint.peak(axis, bounds, limit),
                                      footprint.transfer(axis, bounds, limit)))
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.transfer_bytes, len(c.bounds),
                                          c.axis is not SplitAxis.REDUCTION))


# -- rewriting -------------------------------------------------------------------------------
class _Splitter:
    """Reads the graph's lookups once; rewrites the chosen nodes in one pass."""

    def __init__(self, graph: ModelGraph) -> None:
        self._graph = graph
        self._initializers = {t.name: t for t in graph.model.graph.initializer}
        self._producers = {o: n for n in graph.nodes for o in n.output if o}
        self._positions = {n.name: position for position, n in enumerate(graph.nodes)}
        self._measured = set(graph.data_dependent)
        self._consumers: dict[str, list[int]] = {}
        for position, names in enumerate(graph.node_inputs):
            for name in names:
                self._consumers.setdefault(name, []).append(position)

    def is_oversize(self, position: int, live: np.ndarray, budget: SplitBudget) -> bool:
        """A MatMul, Gemm or Conv above the budget, or one whose weight comes from a
        Transpose above it (the Transpose holds the table and its transposed copy)."""
        node = self._graph.nodes[position]
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            return False
        positions = [position]
        weight_producer = self._producers.get(node.input[1])
        if weight_producer is not None and weight_producer.op_type == "Transpose":
            positions.append(self._positions[weight_producer.name])
        return any(_node_bytes(self._graph, p, live, budget.weight_factor) > budget.node_bytes
                   for p in positions)

    def linear_node(self, position: int) -> LinearNode | None:
        """The node as a splittable one, unless an activation it reads or writes had to be
        measured (``ModelGraph.data_dependent``): a measured shape may depend on input
        values, a split's sizes may not."""
        node = self._graph.nodes[position]
        if self._measured & {*node.input, *node.output}:
            return None
        return linear_node(self._graph, position, self._initializers, self._producers,
                           self._consumers)

    def rewrite(self, choices: Sequence[_Choice]
                ) -> tuple[ModelGraph, tuple[SplitOperator, ...]]:
        graph = self._graph
        model = onnx.ModelProto()
        model.CopyFrom(graph.model)
        names = Names(model)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     1)
        by_position: dict[int, Replacement] = {}
        records = []
        dropped = {c.op.transpose_node for c in choices if c.op.transpose_node is not None}
        for choice in choices:
            replacement = choice.op.rewrite(choice.axis, choice.bounds, names, opset)
            by_position[choice.op.position] = replacement
            records.append(self._record(choice, replacement))
        nodes: list[onnx.NodeProto] = []
        new_tensors: dict[str, TensorInfo] = {}
        declared: dict[str, Dims] = {}
        for position, node in enumerate(graph.nodes):
            if node.name in dropped:
                continue
            if position not in by_position:
                nodes.append(node)
                continue
            replacement = by_position[position]
            nodes.extend(replacement.nodes)
            model.graph.initializer.extend(replacement.initializers)
            new_tensors.update({t.name: t for t in replacement.tensors})
            declared.update(replacement.symbolic_dims)
        gone = {o for n in graph.nodes if n.name in dropped for o in n.output}
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        _drop_unused(model, gone)
        model.graph.value_info.extend(
            helper.make_tensor_value_info(t.name, t.elem_type, list(declared.get(t.name, t.shape)))
            for t in new_tensors.values())
        position_of = {node.name: position for position, node in enumerate(nodes)}
        records = [replace(r, start=position_of[r.nodes[0]], end=position_of[r.nodes[-1]] + 1)
                   for r in records]
        # The new tensors are declared in value_info; what was measured stays measured. With
        # symbolic axes the sizes come from a concrete copy: here, types of every tensor at
        # the given input size (nothing else of it is read).
        observed = {name: graph.tensors[name] for name in self._measured}
        concrete = _static_types([*graph.tensors.values(), *new_tensors.values()], gone) \
            if graph.symbolic_dims else None
        return ModelGraph(model, observed, concrete=concrete), tuple(records)

    def _record(self, choice: _Choice, replacement: Replacement) -> SplitOperator:
        op, bounds = choice.op, choice.bounds
        pieces = [op.piece_weight_bytes(choice.axis, bounds[i], bounds[i + 1], i)
                  for i in range(len(bounds) - 1)]
        return SplitOperator(node=op.name, op_type=op.op_type, axis=choice.axis,
                             pieces=len(pieces), weight_bytes=op.weight_bytes + op.bias_bytes,
                             largest_piece_weight_bytes=max(pieces),
                             transfer_bytes=choice.transfer_bytes,
                             peak_bytes=round(choice.peak_bytes),
                             nodes=tuple(n.name for n in replacement.nodes))


def _static_types(tensors: Sequence[TensorInfo], gone: set[str]) -> onnx.ModelProto:
    """A weightless model whose value_info gives each tensor's size at the given input size:
    what :class:`ModelGraph` reads from a ``concrete`` preparation."""
    static = onnx.ModelProto()
    static.graph.value_info.extend(
        helper.make_tensor_value_info(t.name, t.elem_type, list(t.shape))
        for t in tensors if t.name not in gone)
    return static


def _drop_unused(model: onnx.ModelProto, gone_tensors: set[str]) -> None:
    """Removes initializers no node reads any more (the split weights), with their
    graph-input entries, and the value_info of ``gone_tensors``, which nothing produces."""
    graph = model.graph
    read = {name for node in graph.node for name in node_input_names(node)}
    read |= {o.name for o in graph.output}
    # Deleted in place: copying the remaining weights again would double the rewrite's time.
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in read:
            unused = graph.initializer[index].name
            del graph.initializer[index]
            for position in reversed(range(len(graph.input))):
                if graph.input[position].name == unused:
                    del graph.input[position]
    if gone_tensors:
        value_info = [v for v in graph.value_info if v.name not in gone_tensors]
        del graph.value_info[:]
        graph.value_info.extend(value_info)
