"""What ONNX Runtime holds as weights for a session's life, as opposed to what the file stores
(pure). See NOTE_SESSION_CONSTANTS.

NOTE_SESSION_CONSTANTS: a stage's resident weights are the tensors its ONNX Runtime session
keeps as initializers after graph optimisation, which differ from the file's initializers in
two ways that matter for the working set (issue 19, measured by ``smlaas bench working-set``):

1. **Constant folding.** ORT's ConstantFolding runs every deterministic node whose inputs are
   all constant (initializers or outputs of nodes folded before it) once, at session start,
   and keeps its outputs as initializers; inputs that nothing else reads are dropped. So the
   output of a ``ConstantOfShape`` (the onnx wheel's ``light_*`` models build every weight
   that way: ~97 MiB for ResNet-50), of a ``Transpose``/``Reshape``/``Cast`` of a weight, is a
   weight held for the session's life, not a short-lived activation. Not folded, as in ORT
   (``onnxruntime/core/optimizer/constant_folding.cc``): nodes with subgraphs,
   non-deterministic ops, nodes producing a graph output, and ``DequantizeLinear``, which ORT
   leaves for its QDQ fusions (a QDQ model's int8 weights stay int8, dequantized per
   inference right before their consumer).
2. **Half-precision weights widened.** ORT's CPU provider has no float16 kernel for most
   compute ops; its InsertCastTransformer puts Casts around such a node and constant folding
   then turns each Cast of a float16 weight into a float32 copy, so the stage holds twice the
   stored bytes. Checked with ``SessionOptions.optimized_model_filepath`` on one-node float16
   models (ONNX Runtime 1.32, x86-64, ``ORT_ENABLE_ALL``): the weights of MatMul, Gemm, Conv,
   ConvTranspose, BatchNormalization, InstanceNormalization, Add, Sub, Mul, Div, Pow, Sum,
   PRelu, Where, Pad, Tile and Einsum came out float32; those of the ops in
   ``_HALF_PRECISION_CPU_OPS`` stayed float16. The rule: a float16 or bfloat16 weight read by
   an ONNX-domain op outside that set counts at float32 size. Unlisted ops are widened, so
   an op we did not check errs toward a larger working set, the safe side for the EPC.
   bfloat16 follows the same rule by analogy (unchecked; ORT's CPU provider has fewer bf16
   kernels still).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import onnx

from smlaas.graph.subgraphs import has_subgraph

_NOT_FOLDED = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                         "RandomUniformLike", "Multinomial", "Bernoulli", "DequantizeLinear"})
"""Ops ORT's constant folding leaves alone: non-deterministic ones, and DequantizeLinear
(kept for the QDQ fusions)."""

HALF_PRECISION_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})

_HALF_PRECISION_CPU_OPS = frozenset({
    # Checked (ORT 1.32, x86-64): float16 weights stay float16.
    "Gather", "GatherElements", "Expand", "Concat", "Slice", "Split", "Squeeze", "Reshape",
    "ScatterND", "Max", "Min", "Clip", "LayerNormalization",
    # Type-generic data movement, as the checked ones above.
    "GatherND", "ScatterElements", "Unsqueeze", "Flatten", "Identity", "Transpose", "Cast",
    "Shape", "Size",
})
"""ONNX-domain ops that ORT's CPU provider runs in float16 itself (see
NOTE_SESSION_CONSTANTS); a half-precision weight read by any other op is widened."""


def constant_node_positions(nodes: Sequence[onnx.NodeProto],
                            node_inputs: Sequence[Sequence[str]],
                            initializers: Collection[str], outputs: Collection[str]
                            ) -> frozenset[int]:
    """Positions of the nodes ORT folds into initializers at session start.

    Args:
        nodes: the graph's nodes in topological order.
        node_inputs: for each node, the names it reads (including from its subgraphs).
        initializers: names of the graph's initializers.
        outputs: names of the graph's outputs.

    Returns:
        Every node that reads only initializers and outputs of such nodes (transitively),
        is neither random nor a DequantizeLinear, has no subgraph and produces no graph
        output.
    """
    constant = set(initializers)
    positions = set()
    for position, (node, names) in enumerate(zip(nodes, node_inputs)):
        if node.op_type in _NOT_FOLDED or has_subgraph(node) or any(
                o in outputs for o in node.output):
            continue
        if (names or node.op_type == "Constant") and all(n in constant for n in names):
            positions.add(position)
            constant.update(o for o in node.output if o)
    return frozenset(positions)


def widens_half_precision(node: onnx.NodeProto) -> bool:
    """Whether ORT's CPU provider holds a float32 copy of a half-precision weight ``node``
    reads (see NOTE_SESSION_CONSTANTS)."""
    if node.domain not in ("", "ai.onnx"):
        return False  # contrib ops: their own kernels, not checked; counted as stored
    return node.op_type not in _HALF_PRECISION_CPU_OPS
