"""GPT-2 with a KV cache, in the layout of Hugging Face and ONNX Runtime GenAI exports.

Inputs: ``input_ids`` int64 [batch, sequence]; ``attention_mask`` int64 [batch,
total_sequence] (1 attend, 0 padding; total = past + sequence); ``position_ids`` int64 [batch,
sequence]; per layer i ``past_key_values.{i}.key`` and ``.value`` float32 [batch, heads,
past_sequence, head_dim]. Outputs: ``logits`` [batch, sequence, vocab] and per layer
``present.{i}.key`` / ``.value`` [batch, heads, total_sequence, head_dim], the past followed by
this call's keys and values. The blocks are :class:`~smlaas.zoo.gpt2.GPT2Blocks`' (pre-LN,
``gelu_new``, the head tied to the token embedding).

Note (where the cache is read): the attention bias is computed once, at the graph start, from
``attention_mask`` and the two lengths (past = total - sequence, from the shapes of
``attention_mask`` and ``input_ids``), and every layer reads that one tensor. Only layer i's
nodes (named ``transformer.h.{i}.``) read ``past_key_values.{i}.*`` or write ``present.{i}.*``,
so a partition that cuts between layers keeps each layer's cache in its own stage.

Query j sits at key position past + j and attends the keys 0..past + j whose mask is 1. A
masked key gets -1e9, not -inf: a padding query, which has no key to attend, then gets a
uniform softmax instead of NaNs, and a real query's masked keys weigh exactly 0 in float32, so
a left-padded row's logits are those it gets alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from smlaas.zoo.builder import GraphBuilder
from smlaas.zoo.gpt2 import GPT2Blocks, GPT2Config

MASKED_KEY_BIAS = -1e9
"""Added to a masked key's score (see the module note)."""


class _CacheGraphBuilder(GraphBuilder):
    def node_into(self, op_type: str, inputs: Sequence[str], name: str, output: str,
                  **attrs: Any) -> str:
        """Like :meth:`node`, but the output tensor is ``output``: a present's name is fixed
        by the layout while its node is named after its layer."""
        if name in self._used_names:
            raise ValueError(f"duplicate node name {name!r} in zoo model {self.model_name}")
        self._used_names.add(name)
        self._nodes.append(helper.make_node(op_type, list(inputs), [output], name=name,
                                            **attrs))
        return output


class _CachedGPT2(GPT2Blocks):
    """Blocks whose attention reads the past keys and values and writes the presents."""

    def __init__(self, builder: _CacheGraphBuilder, config: GPT2Config, bias: str) -> None:
        super().__init__(builder, config)
        self.cache_builder, self.bias = builder, bias

    def attend(self, q: str, k: str, v: str, prefix: str, index: int) -> str:
        b, heads = self.cache_builder, [0, 2, 1, 3]
        keys = b.node_into("Concat", [past_name(index, "key"),
                                      self.heads(k, f"{prefix}.attn.k", heads)],
                           f"{prefix}.attn.present_key", present_name(index, "key"), axis=2)
        values = b.node_into("Concat", [past_name(index, "value"),
                                        self.heads(v, f"{prefix}.attn.v", heads)],
                             f"{prefix}.attn.present_value", present_name(index, "value"),
                             axis=2)
        keys_transposed = b.node("Transpose", [keys], f"{prefix}.attn.keys_transposed",
                                 perm=[0, 1, 3, 2])
        probs = self.attention_probs(self.heads(q, f"{prefix}.attn.q", heads), keys_transposed,
                                     self.bias, prefix, bias_node="mask")
        return b.node("MatMul", [probs, values], f"{prefix}.attn.context")


def past_name(layer: int, kind: str) -> str:
    """The graph input holding layer ``layer``'s past ``kind`` ("key" or "value")."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The graph output holding layer ``layer``'s present ``kind`` ("key" or "value")."""
    return f"present.{layer}.{kind}"


def _attention_bias(b: GraphBuilder, ids: str, mask: str) -> str:
    """The additive bias [batch, 1, sequence, total_sequence]: 0 where query j may attend key
    t (t <= past + j and the mask is 1), MASKED_KEY_BIAS elsewhere."""
    p, c = "transformer.attention_bias", b.constant
    sequence = b.node("Shape", [ids], f"{p}.sequence", start=1, end=2)
    total = b.node("Shape", [mask], f"{p}.total", start=1, end=2)
    past = b.node("Sub", [total, sequence], f"{p}.past")
    axis_0 = c(f"{p}.axis_0", np.array([0], np.int64))
    total_scalar = b.node("Squeeze", [total, axis_0], f"{p}.total_scalar")
    past_scalar = b.node("Squeeze", [past, axis_0], f"{p}.past_scalar")
    step = c(f"{p}.step", np.array(1, np.int64))
    key_positions = b.node("Range", [c(f"{p}.zero", np.array(0, np.int64)), total_scalar, step],
                           f"{p}.key_positions")
    query_positions = b.node("Range", [past_scalar, total_scalar, step], f"{p}.query_positions")
    query_column = b.node("Unsqueeze", [query_positions, c(f"{p}.axis_1", np.array([1]))],
                          f"{p}.query_column")
    causal = b.node("LessOrEqual", [key_positions, query_column], f"{p}.causal")
    kept = b.node("Cast", [mask], f"{p}.kept", to=TensorProto.BOOL)
    kept = b.node("Unsqueeze", [kept, c(f"{p}.axes_1_2", np.array([1, 2]))],
                  f"{p}.kept_per_query")
    allowed = b.node("And", [causal, kept], f"{p}.allowed")
    return b.node("Where", [allowed, c(f"{p}.attend", np.array(0.0, np.float32)),
                            c(f"{p}.masked", np.array(MASKED_KEY_BIAS, np.float32))], p)


def build_gpt2_kv(name: str, config: GPT2Config) -> onnx.ModelProto:
    """A GPT-2 LM of ``config``'s sizes with a KV cache; every axis but heads, head_dim and
    vocab is symbolic (see the module docstring for the layout)."""
    if config.d_model % config.heads:
        raise ValueError(f"d_model {config.d_model} is not a multiple of heads {config.heads}")
    b = _CacheGraphBuilder(name)
    ids = b.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = b.input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    positions = b.input("position_ids", TensorProto.INT64, ["batch", "sequence"])
    cache_dims: list[int | str] = ["batch", config.heads, "past_sequence", config.head_dim]
    for layer in range(config.layers):
        for kind in ("key", "value"):
            b.input(past_name(layer, kind), TensorProto.FLOAT, cache_dims)
    net = _CachedGPT2(b, config, _attention_bias(b, ids, mask))
    wte = net.token_table()
    tokens = b.node("Gather", [wte, ids], "transformer.wte")
    x = b.node("Add", [tokens, b.node("Gather", [net.position_table(), positions],
                                      "transformer.wpe")], "transformer.add_positions")
    for layer in range(config.layers):
        x = net.block(x, layer)
    logits = net.lm_head(x, wte)
    b.output(logits, TensorProto.FLOAT, ["batch", "sequence", config.vocab_size])
    present_dims: list[int | str] = ["batch", config.heads, "total_sequence", config.head_dim]
    for layer in range(config.layers):
        for kind in ("key", "value"):
            b.output(present_name(layer, kind), TensorProto.FLOAT, present_dims)
    return b.build(doc=f"GPT-2 LM with a KV cache ({config.layers} layers, d_model "
                       f"{config.d_model}, tied {config.vocab_size}x{config.d_model} head) "
                       f"with seeded random weights")
