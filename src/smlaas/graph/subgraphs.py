"""Names a node reads, including the outer-scope names its If/Loop/Scan bodies read (pure)."""

from __future__ import annotations

import onnx

SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})


def node_input_names(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs followed by implicit outer-scope reads of subgraphs, in order, unique,
    empty names (omitted optional inputs) skipped."""
    names: list[str] = []
    seen: set[str] = set()
    for name in list(node.input) + _outer_scope_reads(node):
        if name and name not in seen:
            seen.add(name)
            names.append(name)
    return names


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def _outer_scope_reads(node: onnx.NodeProto) -> list[str]:
    reads: list[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            reads.extend(_free_names(graph))
    return reads


def _free_names(graph: onnx.GraphProto) -> list[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    free: list[str] = []
    for node in graph.node:
        for name in node_input_names(node):
            if name and name not in defined:
                free.append(name)
        defined.update(node.output)
    for output in graph.output:
        if output.name not in defined:
            free.append(output.name)
    return free
