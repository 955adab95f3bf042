"""Charging ONNX Runtime's kernels back to the nodes of the model they came from.

At the serving optimisation level ORT fuses and renames nodes: ``<node>/MatMulAddFusion``,
``<node>_nchwc`` for NCHWc-blocked convolutions, ``Gelu_token_148`` for fused subgraphs,
``reorder_token_*`` for layout conversions. A kernel is charged to a model node by, in order:

1. its name being a node name, or becoming one when ``/suffix`` parts are stripped;
2. its name without ``_nchwc`` being a node name or a tensor that a node produces;
3. lineage in ORT's optimised model: a kernel producing an original tensor belongs to that
   tensor's producer; otherwise to the latest node among the producers of its inputs.

Rules 2 and 3 find where a fused chain *ends* (``features.3_nchwc`` is Conv+ReLU named after the
ReLU). The time belongs to the chain's heavy first op, so such a kernel is then moved back to
the nearest node of its own op type (a Conv for an NCHWc or fused Conv, a Gemm for a FusedGemm)
within a few nodes. Without this a cut between a Conv and its ReLU put the Conv's time in the
wrong stage (VGG-16 stages mispredicted by 100%).
"""

from __future__ import annotations

import onnx

_NCHWC_SUFFIX = "_nchwc"
# Fused kernel op types -> the op type of the node whose work dominates them.
_BASE_OP = {"FusedConv": "Conv", "NhwcConv": "Conv", "FusedGemm": "Gemm",
            "FusedMatMul": "MatMul", "MatMulNBits": "MatMul", "QLinearConv": "Conv",
            "SkipLayerNormalization": "LayerNormalization"}
# How far back from the end of a fused chain its first op may be.
_FUSED_CHAIN_MAX_NODES = 8


def kernel_owners(original: onnx.ModelProto, optimized: onnx.ModelProto | None
                  ) -> dict[str, str]:
    """Maps each kernel (optimised-model node) name to the original node it is charged to."""
    names = [n.name for n in original.graph.node]
    position = {name: index for index, name in enumerate(names)}
    producer: dict[str, int] = {}
    for node_index, original_node in enumerate(original.graph.node):
        for output in original_node.output:
            producer[output] = node_index
    owners: dict[str, str] = {}
    if optimized is None:
        return owners
    tensor_position: dict[str, int] = dict(producer)
    op_types = [n.op_type for n in original.graph.node]
    for node in optimized.graph.node:
        if node.name in position:  # an original node, unchanged
            owners[node.name] = node.name
            for output in node.output:
                tensor_position.setdefault(output, position[node.name])
            continue
        index = _by_name(node.name, position, producer)
        exact_prefix = index is not None and _strip_suffixes(node.name) in position
        if index is None:
            known = [producer[o] for o in node.output if o in producer]
            if known:
                index = max(known)
        if index is None:
            upstream = [tensor_position[i] for i in node.input if i in tensor_position]
            index = max(upstream) if upstream else 0
        if not exact_prefix:
            index = _chain_head(index, _BASE_OP.get(node.op_type, node.op_type), op_types)
        for output in node.output:
            tensor_position.setdefault(output, index)
        if names:
            owners[node.name] = names[min(index, len(names) - 1)]
    return owners


def _chain_head(index: int, op_type: str, op_types: list[str]) -> int:
    """The nearest node at or before ``index`` with ``op_type``, else ``index`` itself."""
    for candidate in range(min(index, len(op_types) - 1),
                           max(index - _FUSED_CHAIN_MAX_NODES, -1), -1):
        if op_types[candidate] == op_type:
            return candidate
    return index


def _strip_suffixes(kernel: str) -> str:
    name = kernel
    while "/" in name:
        name = name.rsplit("/", 1)[0]
    return name


def owner_by_name(kernel: str, original_names: set[str]) -> str | None:
    """Rule 1 alone, for kernels missing from the optimised model."""
    name = kernel
    while name not in original_names and "/" in name:
        name = name.rsplit("/", 1)[0]
    return name if name in original_names else None


def _by_name(kernel: str, position: dict[str, int], producer: dict[str, int]) -> int | None:
    if kernel.startswith("fused "):  # ORT's name for Gemm/Conv + activation fusions
        kernel = kernel.removeprefix("fused ")
    name = kernel
    while name not in position and "/" in name:
        name = name.rsplit("/", 1)[0]
    if name in position:
        return position[name]
    if kernel.endswith(_NCHWC_SUFFIX):
        stem = kernel[: -len(_NCHWC_SUFFIX)]
        if stem in position:
            return position[stem]
        if stem in producer:
            return producer[stem]
    return None
