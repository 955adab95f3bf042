"""A GPT-2 decoder built from a config (Radford et al. 2019; Hugging Face's GPT2LMHeadModel
layout), with the LM head tied to the token embedding.

The input is ``input_ids`` int64 [batch, sequence]; the output is ``logits`` [batch, sequence,
vocab]. The head is what exporters write for a tied head: a MatMul of the final hidden state
by ``Transpose(transformer.wte.weight)``, so the 50257 x 768 table (147 MiB in fp32) is one
initializer that both the token lookup and the head read. Dense weights are stored [in, out]
as Hugging Face's Conv1D keeps them; causal attention uses an additive mask fixed by the
sequence length the model is built for.

:class:`GPT2Blocks` holds the blocks' code; a subclass says how a block's attention sees the
other positions (here a fixed causal mask; :mod:`smlaas.zoo.gpt2_kv` adds a KV cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from smlaas.zoo.builder import GraphBuilder


@dataclass(frozen=True)
class GPT2Config:
    """The architecture's sizes; the defaults are GPT-2 small's (124M parameters)."""

    layers: int = 12
    d_model: int = 768
    heads: int = 12
    vocab_size: int = 50257
    max_positions: int = 1024
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


GPT2_SMALL_4_LAYERS = GPT2Config(layers=4)
"""GPT-2 small cut to 4 layers: 67.7M parameters, the head's 147 MiB table included."""


class GPT2Blocks:
    """GPT-2's pre-LN blocks, embedding and tied head; :meth:`attend` is the subclass's."""

    def __init__(self, builder: GraphBuilder, config: GPT2Config) -> None:
        self.b, self.config = builder, config
        c = builder.constant
        self.split_heads_shape = c("const.split_heads_shape",
                                   np.array([0, 0, config.heads, config.head_dim]))
        self.merge_heads_shape = c("const.merge_heads_shape", np.array([0, 0, config.d_model]))
        self.score_scale = c("const.score_scale",
                             np.array(math.sqrt(config.head_dim), np.float32))
        # Here, between the shared constants, so that gpt2_small4's initializers keep their
        # order and its file its bytes.
        self.add_attention_constants()
        self.half = c("const.half", np.array(0.5, np.float32))
        self.one = c("const.one", np.array(1.0, np.float32))
        self.cubic = c("const.gelu_cubic", np.array(0.044715, np.float32))
        self.three = c("const.three", np.array(3.0, np.float32))
        self.gelu_scale = c("const.gelu_scale", np.array(math.sqrt(2.0 / math.pi), np.float32))

    def add_attention_constants(self) -> None:
        """Adds the initializers :meth:`attend` reads; none by default."""

    def attend(self, q: str, k: str, v: str, prefix: str, index: int) -> str:
        """Block ``index``'s attention context [batch, heads, sequence, head_dim] from its
        queries, keys and values [batch, sequence, d_model]."""
        raise NotImplementedError

    def dense(self, x: str, prefix: str, in_features: int, out_features: int) -> str:
        return self.b.dense(x, prefix, in_features, out_features)

    def layer_norm(self, x: str, prefix: str) -> str:
        d = self.config.d_model
        scale = self.b.uniform(f"{prefix}.weight", (d,), 0.9, 1.1)
        shift = self.b.normal(f"{prefix}.bias", (d,), std=0.02)
        return self.b.node("LayerNormalization", [x, scale, shift], prefix, axis=-1,
                           epsilon=self.config.layer_norm_eps)

    def gelu(self, x: str, prefix: str) -> str:
        """GPT-2's ``gelu_new``: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
        b = self.b
        cube = b.node("Pow", [x, self.three], f"{prefix}.cube")
        inner = b.node("Add", [x, b.node("Mul", [cube, self.cubic], f"{prefix}.mul_cubic")],
                       f"{prefix}.add_cubic")
        tanh = b.node("Tanh", [b.node("Mul", [inner, self.gelu_scale], f"{prefix}.scale")],
                      f"{prefix}.tanh")
        gate = b.node("Mul", [b.node("Add", [tanh, self.one], f"{prefix}.add_one"), self.half],
                      f"{prefix}.gate")
        return b.node("Mul", [x, gate], f"{prefix}.mul")

    def heads(self, x: str, name: str, perm: list[int]) -> str:
        reshaped = self.b.node("Reshape", [x, self.split_heads_shape], f"{name}.split")
        return self.b.node("Transpose", [reshaped], f"{name}.transpose", perm=perm)

    def attention_probs(self, queries: str, keys_transposed: str, bias: str, prefix: str, *,
                        bias_node: str) -> str:
        """softmax(q k^T / sqrt(head_dim) + bias), ``keys_transposed`` [.., head_dim, keys];
        the bias is added by node ``{prefix}.attn.{bias_node}``."""
        b = self.b
        scores = b.node("MatMul", [queries, keys_transposed], f"{prefix}.attn.scores")
        scores = b.node("Div", [scores, self.score_scale], f"{prefix}.attn.scaled")
        scores = b.node("Add", [scores, bias], f"{prefix}.attn.{bias_node}")
        return b.node("Softmax", [scores], f"{prefix}.attn.probs", axis=-1)

    def block(self, x: str, index: int) -> str:
        b, d, p = self.b, self.config.d_model, f"transformer.h.{index}"
        qkv = self.dense(self.layer_norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn", d, 3 * d)
        q, k, v = b.split(qkv, f"{p}.attn.split_qkv", [d, d, d], axis=-1)
        context = self.attend(q, k, v, p, index)
        context = b.node("Transpose", [context], f"{p}.attn.merge_transpose", perm=[0, 2, 1, 3])
        context = b.node("Reshape", [context, self.merge_heads_shape], f"{p}.attn.merge")
        x = b.node("Add", [x, self.dense(context, f"{p}.attn.c_proj", d, d)],
                   f"{p}.attn.residual")
        hidden = self.gelu(self.dense(self.layer_norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc", d,
                                      4 * d), f"{p}.mlp.gelu")
        return b.node("Add", [x, self.dense(hidden, f"{p}.mlp.c_proj", 4 * d, d)],
                      f"{p}.mlp.residual")

    def token_table(self) -> str:
        """``transformer.wte.weight``, which the token lookup and the tied head share."""
        return self.b.normal("transformer.wte.weight",
                             (self.config.vocab_size, self.config.d_model), std=0.02)

    def position_table(self) -> str:
        return self.b.normal("transformer.wpe.weight",
                             (self.config.max_positions, self.config.d_model), std=0.01)

    def lm_head(self, x: str, wte: str) -> str:
        """The final layer norm and the tied head; the output tensor is ``logits``."""
        x = self.layer_norm(x, "transformer.ln_f")
        # The tied head: lm_head.weight is transformer.wte.weight.
        head = self.b.node("Transpose", [wte], "lm_head.transpose_wte", perm=[1, 0])
        return self.b.node("MatMul", [x, head], "logits")


class _CausalGPT2(GPT2Blocks):
    """Blocks for sequences of one fixed length, masked by a constant causal bias."""

    def __init__(self, builder: GraphBuilder, config: GPT2Config, sequence_length: int) -> None:
        self.sequence_length = sequence_length
        super().__init__(builder, config)

    def add_attention_constants(self) -> None:
        # 0 on and below the diagonal, -1e4 above: a position never attends to later ones.
        n = self.sequence_length
        upper = np.triu(np.ones((n, n), np.float32), 1)
        self.causal_bias = self.b.constant("const.causal_bias", (upper * -10000.0)[None, None])

    def attend(self, q: str, k: str, v: str, prefix: str, index: int) -> str:
        probs = self.attention_probs(self.heads(q, f"{prefix}.attn.q", [0, 2, 1, 3]),
                                     self.heads(k, f"{prefix}.attn.k", [0, 2, 3, 1]),
                                     self.causal_bias, prefix, bias_node="causal")
        return self.b.node("MatMul", [probs, self.heads(v, f"{prefix}.attn.v", [0, 2, 1, 3])],
                           f"{prefix}.attn.context")


def build_gpt2(name: str = "gpt2_small4", sequence_length: int = 128,
               config: GPT2Config = GPT2_SMALL_4_LAYERS) -> onnx.ModelProto:
    """A GPT-2 LM of ``config``'s sizes for sequences of ``sequence_length`` tokens."""
    if not 1 <= sequence_length <= config.max_positions:
        raise ValueError(f"sequence_length must be in 1..{config.max_positions}, got "
                         f"{sequence_length}")
    b = GraphBuilder(name)
    net = _CausalGPT2(b, config, sequence_length)
    ids = b.input("input_ids", TensorProto.INT64, ["batch", sequence_length])
    c = b.constant
    wte = net.token_table()
    tokens = b.node("Gather", [wte, ids], "transformer.wte")
    positions = b.node("Slice", [net.position_table(),
                                 c("const.zero_start", np.array([0])),
                                 c("const.seq_end", np.array([sequence_length]))],
                       "transformer.wpe")
    x = b.node("Add", [tokens, positions], "transformer.add_positions")
    for index in range(config.layers):
        x = net.block(x, index)
    logits = net.lm_head(x, wte)
    b.output(logits, TensorProto.FLOAT, ["batch", sequence_length, config.vocab_size])
    return b.build(doc=f"GPT-2 LM ({config.layers} layers, d_model {config.d_model}, tied "
                       f"{config.vocab_size}x{config.d_model} head) with seeded random weights")
