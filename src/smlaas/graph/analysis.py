"""The analysed graph: node order, tensor sizes, and what crosses every cut position (pure).

A *cut position* ``p`` lies between node ``p - 1`` and node ``p`` of the topological order
(0 <= p <= n). The tensors crossing it are the activations produced before ``p`` (graph inputs
count as produced at -1) and still needed at or after ``p`` (graph outputs are needed at ``n``).
A stage ``[i, j)`` receives ``cut_tensors(i)`` and emits ``cut_tensors(j)``.

A decoder's KV cache is the exception (:mod:`smlaas.graph.kv_cache`): each layer's past input
and present output belong to the stage that holds the layer, which keeps the cache in its
enclave between steps. They never cross a cut: no position inside a pair's span (from its
first reader to its last node) is a valid cut, and a stage ``[i, j)`` also takes the pasts
its nodes read and emits the presents they make (``stage_kv_pairs``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from smlaas.errors import GraphError, UnknownShapesError, UnsupportedModelError
from smlaas.graph.dims import fixed_dim, static_shape
from smlaas.graph.input_size import model_inputs
from smlaas.graph.kv_cache import KvPair, find_kv_pairs
from smlaas.graph.session_constants import (
    HALF_PRECISION_TYPES,
    constant_node_positions,
    widens_half_precision,
)
from smlaas.graph.subgraphs import has_subgraph, node_input_names


@dataclass(frozen=True)
class TensorInfo:
    """An activation tensor: its element type, static shape and size in bytes."""

    name: str
    elem_type: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.elem_type)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))


STRING_ELEMENT_BYTES = 64
"""What one string element is counted as in memory and transfer estimates: ONNX Runtime's
``std::string`` (32 bytes) and a short payload. Strings have no fixed size; real payloads are
framed with their lengths on the wire."""


def element_size(elem_type: int) -> int:
    if elem_type == onnx.TensorProto.STRING:
        return STRING_ELEMENT_BYTES
    return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)


class ModelGraph:
    """A prepared model (see :func:`smlaas.graph.prepare.prepare_model`), analysed.

    Args:
        model: the prepared model.
        observed: tensors measured by running the model, for those whose type or shape ONNX
            shape inference could not determine.
        concrete: when ``model`` was prepared with symbolic axes, the same model prepared
            with every input size fixed (see :mod:`smlaas.graph.dynamic_axes`): it gives the
            static shapes, and ``model``'s own types say which axes stay symbolic.

    Raises:
        GraphError: some activation still has no static shape.
    """

    def __init__(self, model: onnx.ModelProto,
                 observed: Mapping[str, TensorInfo] | None = None, *,
                 concrete: onnx.ModelProto | None = None) -> None:
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializer_dims: dict[str, tuple[int, ...]] = {
            t.name: tuple(t.dims) for t in graph.initializer
        }
        self.initializer_bytes: dict[str, int] = {
            t.name: math.prod(t.dims) * element_size(t.data_type) for t in graph.initializer
        }
        self._initializer_types: dict[str, int] = {t.name: t.data_type
                                                   for t in graph.initializer}
        self.input_names = [i.name for i in model_inputs(model)]
        self.output_names = [o.name for o in graph.output]
        self.node_inputs = [node_input_names(n) for n in self.nodes]
        self.kv_pairs: tuple[KvPair, ...] = tuple(find_kv_pairs(model))
        """The decoder's past/present pairs (empty for other models)."""
        self.stage_local: frozenset[str] = frozenset(
            name for pair in self.kv_pairs for name in (pair.past, pair.present))
        """Tensors that stay in one stage: KV pasts and presents."""
        self.tensors = self._collect_tensors(observed or {}, concrete)
        self.symbolic_dims: dict[str, tuple[int | str | None, ...]] = (
            self._symbolic_dims() if concrete is not None else {})
        """Tensors with an axis the model keeps symbolic (the batch, a requested sequence
        axis): their dimensions as stages declare them, ints where fixed and a dim_param (or
        None, unknown) where symbolic. ``tensors`` has their sizes at the given input size."""
        self.data_dependent: frozenset[str] = frozenset(observed or {}) & self.tensors.keys()
        """Tensors whose shape the declared input sizes do not fix (shape inference left it
        open; it was measured on one input, e.g. downstream of NonZero, NonMaxSuppression or
        a TopK with a computed k). Where one crosses a cut, both stages declare it with its
        rank only, since the next input may give it another shape; its bytes in the memory
        and transfer estimates are those measured."""
        self.producer, self.last_use = self._liveness()
        self.constant_positions: frozenset[int] = constant_node_positions(
            self.nodes, self.node_inputs, self.initializer_bytes.keys(), self.output_names)
        """Nodes ONNX Runtime folds into initializers at session start (see
        NOTE_SESSION_CONSTANTS in :mod:`smlaas.graph.session_constants`): their outputs are
        weights of the stage that reads them, not activations."""
        self.folded_names: frozenset[str] = frozenset(
            o for p in self.constant_positions for o in self.nodes[p].output if o)

    # -- construction --------------------------------------------------------------------
    def _collect_tensors(self, observed: Mapping[str, TensorInfo],
                         concrete: onnx.ModelProto | None) -> dict[str, TensorInfo]:
        types = _value_types(self.model.graph)
        if concrete is not None:
            # The concrete preparation's static types, and the dims of what it folded.
            symbolic_types, types = types, _value_types(concrete.graph)
            for tensor in concrete.graph.initializer:
                types.setdefault(tensor.name, helper.make_tensor_type_proto(
                    tensor.data_type, list(tensor.dims)))
            for name, symbolic_type in symbolic_types.items():
                types.setdefault(name, symbolic_type)
        tensors: dict[str, TensorInfo] = {}
        missing: list[str] = []
        for name in self.activation_names():
            if name in observed:
                tensors[name] = observed[name]
                continue
            type_proto = types.get(name)
            if type_proto is not None and not type_proto.HasField("tensor_type"):
                raise self._non_tensor_refusal(name, type_proto)
            elem_type = type_proto.tensor_type.elem_type if type_proto is not None else 0
            shape = static_shape(type_proto)
            if shape is None or not elem_type:
                missing.append(name)
                continue
            tensors[name] = TensorInfo(name, elem_type, shape)
        if missing:
            raise UnknownShapesError(missing)
        return tensors

    def _symbolic_dims(self) -> dict[str, tuple[int | str | None, ...]]:
        types = _value_types(self.model.graph)
        symbolic: dict[str, tuple[int | str | None, ...]] = {}
        for name, info in self.tensors.items():
            type_proto = types.get(name)
            if static_shape(type_proto) is not None:
                continue
            dims = (type_proto.tensor_type.shape.dim
                    if type_proto is not None and type_proto.tensor_type.HasField("shape")
                    else [])
            if len(dims) != len(info.shape):  # inference lost the tensor: rank only
                symbolic[name] = (None,) * len(info.shape)
                continue
            symbolic[name] = tuple(
                size if (size := fixed_dim(d)) is not None else (d.dim_param or None)
                for d in dims)
        return symbolic

    def _non_tensor_refusal(self, name: str, type_proto: onnx.TypeProto
                            ) -> UnsupportedModelError:
        node = next((n for n in self.nodes if name in n.output), None)
        what = f"{name!r}, {describe_type(type_proto)}"
        where = f"input {what}" if node is None else (
            f"node {node.name!r} ({_op_name(node)}) outputs {what}")
        hint = (" (skl2onnx: convert with options={'zipmap': False})"
                if node is not None and node.op_type == "ZipMap" else "")
        return UnsupportedModelError(
            f"{where}: unsupported by design, stages exchange tensors only, not "
            f"sequences, maps or optionals; make the model output tensors{hint}")

    def activation_names(self) -> list[str]:
        """Every non-initializer tensor: inputs, node outputs, in order of appearance."""
        names = list(self.input_names)
        seen = set(names)
        for node in self.nodes:
            for name in node.output:
                if name and name not in seen:
                    seen.add(name)
                    names.append(name)
        return names

    def _liveness(self) -> tuple[dict[str, int], dict[str, int]]:
        producer = {name: -1 for name in self.input_names}
        for position, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    producer[name] = position
        last_use = dict(producer)
        for position, names in enumerate(self.node_inputs):
            for name in names:
                if name in producer:
                    last_use[name] = position
        for name in self.output_names:
            if name in self.initializer_bytes:
                raise UnsupportedModelError(
                    f"graph output {name!r} is an initializer: unsupported by design, every "
                    f"output must come from a node of some stage")
            last_use[name] = len(self.nodes)
        for pair in self.kv_pairs:  # live where their layer runs, never beyond it
            readers = [p for p, names in enumerate(self.node_inputs) if pair.past in names]
            if not readers:
                raise UnsupportedModelError(f"KV cache input {pair.past!r} is read by no node")
            producer[pair.past] = min(readers)
            last_use[pair.past] = max(readers)
            last_use[pair.present] = max([producer[pair.present]] + [
                p for p, names in enumerate(self.node_inputs) if pair.present in names])
        return producer, last_use

    # -- queries -------------------------------------------------------------------------
    @property
    def node_count(self) -> int:
        return len(self.nodes)

    def cut_tensors(self, position: int) -> list[str]:
        """Names of the tensors crossing cut ``position``, in a stable order."""
        self._check_position(position)
        return [name for name in self.tensors if name not in self.stage_local
                and self.producer[name] < position <= self.last_use[name]]

    def cut_bytes_by_position(self) -> np.ndarray:
        """Bytes crossing each cut position 0..n, as one array."""
        return self._sum_over_crossings(lambda info: info.nbytes)

    def cut_count_by_position(self) -> np.ndarray:
        """Number of tensors crossing each cut position 0..n."""
        return self._sum_over_crossings(lambda info: 1)

    def _sum_over_crossings(self, value: Callable[[TensorInfo], int]) -> np.ndarray:
        delta = np.zeros(self.node_count + 2, dtype=np.int64)
        for name, info in self.tensors.items():
            if name in self.stage_local:
                continue
            first, last = self.producer[name] + 1, self.last_use[name]
            if first <= last:
                delta[first] += value(info)
                delta[last + 1] -= value(info)
        return np.cumsum(delta)[: self.node_count + 1]

    def live_bytes_by_step(self) -> np.ndarray:
        """Activation bytes alive while node k runs (its inputs, outputs and everything held
        for later nodes), for k in 0..n-1. Liveness within any stage equals this global one.
        Outputs of constant-folded nodes are weights (``session_weight_uses``), not counted."""
        delta = np.zeros(self.node_count + 1, dtype=np.int64)
        for name, info in self.tensors.items():
            if name in self.folded_names:  # a session constant: counted as a weight
                continue
            if name in self.stage_local:  # KV pasts and presents: held for the whole run,
                continue                  # counted per stage (``kv_step_bytes``)
            first = max(self.producer[name], 0)
            last = min(max(self.last_use[name], first), self.node_count - 1)
            delta[first] += info.nbytes
            delta[last + 1] -= info.nbytes
        return np.cumsum(delta)[: self.node_count]

    def valid_cut_positions(self) -> np.ndarray:
        """Boolean mask over positions 0..n. Nodes with subgraphs are atomic, so no cut can
        fall inside one, and a data-dependent tensor may cross a cut because stages declare
        it with its rank only (see ``data_dependent``). The one restriction: no cut inside
        a KV pair's span, so that its cache stays in one stage."""
        valid = np.ones(self.node_count + 1, dtype=bool)
        for first, last in self.kv_spans().values():
            valid[first + 1:last + 1] = False
        return valid

    def kv_spans(self) -> dict[KvPair, tuple[int, int]]:
        """For each KV pair, the positions of its first and last node (the past's first
        reader; the last reader of the past or the present, or the present's producer)."""
        return {pair: (min(self.producer[pair.past], self.producer[pair.present]),
                       max(self.last_use[pair.past], self.last_use[pair.present]))
                for pair in self.kv_pairs}

    def stage_kv_pairs(self, start: int, end: int) -> list[KvPair]:
        """The KV pairs stage ``[start, end)`` holds (those whose span starts in it)."""
        return [pair for pair, (first, _) in self.kv_spans().items() if start <= first < end]

    def kv_cache_bytes(self, pair: KvPair) -> int:
        """The cache one pair keeps at the analysed sizes: its present, which holds every
        sequence's every token (``--max-sequences`` x ``--max-context``)."""
        return self.tensors[pair.present].nbytes

    def kv_step_bytes(self, pair: KvPair) -> int:
        """What one pair takes while its stage runs a step, besides the cache it keeps: the
        past fed in and the present given out, both held for the whole run (the caller owns
        the one, ONNX Runtime returns the other)."""
        return self.tensors[pair.past].nbytes + self.tensors[pair.present].nbytes

    def subgraph_nodes(self) -> list[str]:
        return [n.name for n in self.nodes if has_subgraph(n)]

    def initializer_uses(self) -> dict[str, list[int]]:
        """For every initializer, the sorted positions of the nodes that read it."""
        uses: dict[str, list[int]] = {}
        for position, names in enumerate(self.node_inputs):
            for name in names:
                if name in self.initializer_bytes:
                    uses.setdefault(name, []).append(position)
        return uses

    def session_weight_uses(self) -> dict[str, list[int]]:
        """For every tensor a stage's ONNX Runtime session holds as a weight, the sorted
        positions of the nodes that read it per inference.

        Those tensors are the initializers and the outputs of constant-folded nodes
        (``constant_positions``) that some node outside the folded ones reads; an
        initializer that only folded nodes read is dropped by ORT after folding. See
        NOTE_SESSION_CONSTANTS in :mod:`smlaas.graph.session_constants`.
        """
        uses: dict[str, list[int]] = {}
        for position, names in enumerate(self.node_inputs):
            if position in self.constant_positions:
                continue
            for name in names:
                if name in self.initializer_bytes or name in self.folded_names:
                    uses.setdefault(name, []).append(position)
        return uses

    def is_session_weight(self, name: str) -> bool:
        """Whether ``name`` is an initializer or the output of a constant-folded node."""
        return name in self.initializer_bytes or name in self.folded_names

    def _weight_layout(self, name: str) -> tuple[int, tuple[int, ...]]:
        if name in self.initializer_bytes:
            return self._initializer_types[name], self.initializer_dims[name]
        info = self.tensors[name]
        return info.elem_type, info.shape

    def touched_initializer_bytes(self, name: str, position: int) -> int:
        """Bytes of session weight ``name`` (see ``session_weight_uses``) that node
        ``position`` reads per inference.

        A half-precision weight that ORT's CPU provider widens for this node counts at
        float32 size (see NOTE_SESSION_CONSTANTS). A Gather from a weight table (an
        embedding) reads only the rows it indexes, each rounded up to whole 4 KiB pages;
        every other use reads the whole tensor.
        """
        elem_type, table_dims = self._weight_layout(name)
        node = self.nodes[position]
        item_bytes = element_size(elem_type)
        if elem_type in HALF_PRECISION_TYPES and widens_half_precision(node):
            item_bytes = element_size(onnx.TensorProto.FLOAT)
        full = math.prod(table_dims) * item_bytes
        if node.op_type != "Gather" or node.domain or node.input[0] != name:
            return full
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        indices = self.tensors.get(node.input[1]) if len(node.input) > 1 else None
        if indices is None or axis != 0 or not table_dims:
            return full
        row_bytes = full // max(table_dims[0], 1)
        page = 4096
        touched = math.prod(indices.shape) * (-(-row_bytes // page) * page)
        return min(full, touched)

    def _check_position(self, position: int) -> None:
        if not 0 <= position <= self.node_count:
            raise GraphError(f"cut position {position} outside 0..{self.node_count}")


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    return {value.name: value.type
            for value in [*graph.input, *graph.value_info, *graph.output]}


def describe_type(type_proto: onnx.TypeProto) -> str:
    """``a sequence of maps``, ``an optional tensor``...: a value type in words."""
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        return "a sequence of " + describe_type(type_proto.sequence_type.elem_type)[2:] + "s" \
            if type_proto.sequence_type.elem_type.WhichOneof("value") else "a sequence"
    if kind == "optional_type":
        return "an optional " + describe_type(type_proto.optional_type.elem_type)[2:]
    if kind == "map_type":
        return "a map"
    if kind == "sparse_tensor_type":
        return "a sparse tensor"
    return "a tensor" if kind == "tensor_type" else f"a {kind or 'value of no type'}"


def _op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain and node.domain != "ai.onnx" \
        else node.op_type
