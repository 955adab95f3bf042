"""Extracting a stage's sub-model from the prepared model (pure).

``onnx.utils.Extractor`` walks dataflow backwards from the outputs, which loses two things a
pipeline stage needs: tensors that only pass through a stage (a skip connection spanning it),
and names that If/Loop/Scan bodies read from the outer scope. Stages here are contiguous
ranges of the topological order, so extraction takes the node range as it is, with onnx's
helpers, and lists pass-through tensors as both input and output (ONNX allows it).
"""

from __future__ import annotations

import onnx
from onnx import helper

from smlaas.graph.analysis import ModelGraph, TensorInfo
from smlaas.graph.dims import loosen_for_control_flow


class StageExtractor:
    """Cuts sub-models out of one prepared model; lookups are built once."""

    def __init__(self, model: onnx.ModelProto, graph: ModelGraph) -> None:
        self._model = model
        self._graph = graph
        self._initializers = {t.name: t for t in model.graph.initializer}
        self._value_info = {v.name: v for v in model.graph.value_info}
        self._declared = {v.name: v for v in [*model.graph.input, *model.graph.output]}

    def extract(self, start: int, end: int, *, name: str) -> onnx.ModelProto:
        """The sub-model of nodes ``[start, end)`` with inputs ``cut_tensors(start)`` and
        outputs ``cut_tensors(end)``, each with its fixed type and shape, and the KV pasts
        and presents of the layers it holds."""
        graph = self._graph
        nodes = graph.nodes[start:end]
        cache = graph.stage_kv_pairs(start, end)  # its KV pasts in, presents out
        inputs = [self._boundary_value(t)
                  for t in [*graph.cut_tensors(start), *(p.past for p in cache)]]
        outputs = [self._boundary_value(t)
                   for t in [*graph.cut_tensors(end), *(p.present for p in cache)]]
        used = {n for names in graph.node_inputs[start:end] for n in names}
        initializers = [self._initializers[n] for n in sorted(used & self._initializers.keys())]
        produced = {o for node in nodes for o in node.output}
        boundary = {v.name for v in inputs} | {v.name for v in outputs}
        value_info = [self._value_info[n] for n in sorted(produced - boundary)
                      if n in self._value_info]
        sub_graph = helper.make_graph(nodes, name, inputs, outputs, initializers,
                                      value_info=value_info)
        sub_model = helper.make_model(sub_graph, opset_imports=list(self._model.opset_import),
                                      producer_name="smlaas",
                                      doc_string=f"nodes {start}..{end - 1} of "
                                                 f"{self._model.graph.name}")
        sub_model.ir_version = self._model.ir_version
        sub_model.functions.extend(self._model.functions)
        # A stage with an If/Loop/Scan keeps its inputs' rank only (see the function).
        return loosen_for_control_flow(sub_model)

    def _boundary_value(self, name: str) -> onnx.ValueInfoProto:
        """A stage input or output: its type and fixed shape, except that a data-dependent
        tensor keeps its rank only (its sizes vary with the input values) and the axes the
        model keeps symbolic (the batch) stay symbolic."""
        graph = self._graph
        info: TensorInfo = graph.tensors[name]
        shape: list[int | str | None]
        declared = self._declared.get(name)
        if name in graph.stage_local and name in graph.data_dependent and \
                declared is not None and _agrees(declared, info):
            # A KV past or present whose shape inference left open (real exporters'
            # reshapes from computed shapes): the prepared model's declaration (the graph
            # input or output it is) names its axes, which the stage's cache needs to tell
            # its sequence axis; the same declaration found the pair in the whole model.
            kept = onnx.ValueInfoProto()
            kept.CopyFrom(declared)
            return kept
        if name in graph.data_dependent:
            shape = [None] * len(info.shape)
        else:
            shape = list(graph.symbolic_dims.get(name, info.shape))
        return helper.make_tensor_value_info(info.name, info.elem_type, shape)


def _agrees(declared: onnx.ValueInfoProto, info: TensorInfo) -> bool:
    """Whether a declaration has the measured tensor's element type and rank, and its fixed
    dimensions where it fixes them."""
    tensor = declared.type.tensor_type
    dims = tensor.shape.dim
    return tensor.elem_type == info.elem_type and len(dims) == len(info.shape) and all(
        not d.HasField("dim_value") or d.dim_value == size for d, size in zip(dims, info.shape))
