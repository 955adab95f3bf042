"""A BERT-base encoder (Devlin et al. 2019; Hugging Face's BertModel layout).

Inputs ``input_ids`` and ``attention_mask`` are int64 [batch, sequence]; outputs are the last
hidden state and the pooled first token. Weights of dense layers are stored [in, out] so that
they feed MatMul directly; the parameter count is that of ``bert-base-uncased``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto

from smlaas.zoo.builder import GraphBuilder

VOCAB_SIZE = 30522
MAX_POSITIONS = 512
HIDDEN = 768
LAYERS = 12
HEADS = 12
INTERMEDIATE = 3072
LAYER_NORM_EPS = 1e-12


class _Bert:
    def __init__(self, builder: GraphBuilder) -> None:
        self.b = builder
        head_dim = HIDDEN // HEADS
        c = builder.constant
        self.split_heads_shape = c("const.split_heads_shape", np.array([0, 0, HEADS, head_dim]))
        self.merge_heads_shape = c("const.merge_heads_shape", np.array([0, 0, HIDDEN]))
        self.score_scale = c("const.score_scale", np.array(math.sqrt(head_dim), np.float32))
        self.one = c("const.one", np.array(1.0, np.float32))
        self.half = c("const.half", np.array(0.5, np.float32))
        self.sqrt2 = c("const.sqrt2", np.array(math.sqrt(2.0), np.float32))
        self.mask_value = c("const.mask_value", np.array(-10000.0, np.float32))

    def dense(self, x: str, prefix: str, in_features: int, out_features: int) -> str:
        return self.b.dense(x, prefix, in_features, out_features)

    def layer_norm(self, x: str, prefix: str) -> str:
        scale = self.b.uniform(f"{prefix}.weight", (HIDDEN,), 0.9, 1.1)
        shift = self.b.normal(f"{prefix}.bias", (HIDDEN,), std=0.02)
        return self.b.node("LayerNormalization", [x, scale, shift], prefix, axis=-1,
                           epsilon=LAYER_NORM_EPS)

    def gelu(self, x: str, prefix: str) -> str:
        """GELU in its exact erf form, as BertModel computes it."""
        b = self.b
        erf = b.node("Erf", [b.node("Div", [x, self.sqrt2], f"{prefix}.div")], f"{prefix}.erf")
        inner = b.node("Add", [erf, self.one], f"{prefix}.add_one")
        return b.node("Mul", [b.node("Mul", [x, inner], f"{prefix}.mul"), self.half],
                      f"{prefix}.mul_half")

    def heads(self, x: str, name: str, perm: list[int]) -> str:
        reshaped = self.b.node("Reshape", [x, self.split_heads_shape], f"{name}.split")
        return self.b.node("Transpose", [reshaped], f"{name}.transpose", perm=perm)

    def layer(self, x: str, mask_bias: str, index: int) -> str:
        b, p = self.b, f"encoder.layer.{index}"
        q = self.heads(self.dense(x, f"{p}.attention.self.query", HIDDEN, HIDDEN),
                       f"{p}.attention.q", [0, 2, 1, 3])
        k = self.heads(self.dense(x, f"{p}.attention.self.key", HIDDEN, HIDDEN),
                       f"{p}.attention.k", [0, 2, 3, 1])
        v = self.heads(self.dense(x, f"{p}.attention.self.value", HIDDEN, HIDDEN),
                       f"{p}.attention.v", [0, 2, 1, 3])
        scores = b.node("Div", [b.node("MatMul", [q, k], f"{p}.attention.scores"),
                                self.score_scale], f"{p}.attention.scaled")
        scores = b.node("Add", [scores, mask_bias], f"{p}.attention.masked")
        probs = b.node("Softmax", [scores], f"{p}.attention.probs", axis=-1)
        context = b.node("MatMul", [probs, v], f"{p}.attention.context")
        context = b.node("Transpose", [context], f"{p}.attention.merge_transpose",
                         perm=[0, 2, 1, 3])
        context = b.node("Reshape", [context, self.merge_heads_shape], f"{p}.attention.merge")
        attn = self.dense(context, f"{p}.attention.output.dense", HIDDEN, HIDDEN)
        attn = self.layer_norm(b.node("Add", [attn, x], f"{p}.attention.residual"),
                               f"{p}.attention.output.LayerNorm")
        hidden = self.gelu(self.dense(attn, f"{p}.intermediate.dense", HIDDEN, INTERMEDIATE),
                           f"{p}.intermediate.gelu")
        out = self.dense(hidden, f"{p}.output.dense", INTERMEDIATE, HIDDEN)
        return self.layer_norm(b.node("Add", [out, attn], f"{p}.output.residual"),
                               f"{p}.output.LayerNorm")


def build_bert_base(name: str = "bert_base", sequence_length: int | str = "sequence", *,
                    layers: int = LAYERS, vocab_size: int = VOCAB_SIZE) -> onnx.ModelProto:
    """BERT-base; fewer ``layers`` and a smaller ``vocab_size`` give light variants for
    tests."""
    b = GraphBuilder(name)
    net = _Bert(b)
    ids = b.input("input_ids", TensorProto.INT64, ["batch", sequence_length])
    mask = b.input("attention_mask", TensorProto.INT64, ["batch", sequence_length])
    c = b.constant

    words = b.node("Gather", [b.normal("embeddings.word_embeddings.weight",
                                       (vocab_size, HIDDEN), std=0.02), ids],
                   "embeddings.word_lookup")
    # Positions 0..S-1: slice the position table by the runtime sequence length.
    seq_len = b.node("Gather", [b.node("Shape", [ids], "embeddings.ids_shape"),
                                c("const.seq_axis", np.array([1]))], "embeddings.seq_len")
    positions = b.node("Slice", [b.normal("embeddings.position_embeddings.weight",
                                          (MAX_POSITIONS, HIDDEN), std=0.02),
                                 c("const.zero_start", np.array([0])), seq_len],
                       "embeddings.position_slice")
    token_type = b.node("Gather", [b.normal("embeddings.token_type_embeddings.weight",
                                            (2, HIDDEN), std=0.02),
                                   c("const.token_type_zero", np.array(0))],
                        "embeddings.token_type_lookup")
    x = b.node("Add", [b.node("Add", [words, positions], "embeddings.add_positions"),
                       token_type], "embeddings.add_token_type")
    x = net.layer_norm(x, "embeddings.LayerNorm")

    # (1 - mask) * -10000 as [B, 1, 1, S], added to every layer's attention scores.
    mask_f = b.node("Cast", [mask], "mask.cast", to=TensorProto.FLOAT)
    mask_f = b.node("Unsqueeze", [mask_f, c("const.mask_axes", np.array([1, 2]))],
                    "mask.unsqueeze")
    mask_bias = b.node("Mul", [b.node("Sub", [net.one, mask_f], "mask.invert"),
                               net.mask_value], "mask.bias")

    for index in range(layers):
        x = net.layer(x, mask_bias, index)
    last_hidden = b.node("Identity", [x], "last_hidden_state")

    first = b.node("Gather", [x, c("const.first_token", np.array(0))], "pooler.first_token",
                   axis=1)
    pooled = b.node("Tanh", [net.dense(first, "pooler.dense", HIDDEN, HIDDEN)],
                    "pooler_output")
    b.output(last_hidden, TensorProto.FLOAT, ["batch", sequence_length, HIDDEN])
    b.output(pooled, TensorProto.FLOAT, ["batch", HIDDEN])
    return b.build(doc="BERT-base encoder (12 layers, hidden 768) with seeded random weights")
