"""A small decoder in the layout of Hugging Face optimum's GPT-2 export with a KV cache, built
with ``onnx.helper`` alone (not the zoo's builder), for tests that must not only pass on the
zoo's own graphs.

Names and axes follow optimum: dim_params ``batch_size``, ``sequence_length``,
``past_sequence_length`` and ``past_sequence_length + sequence_length``; inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``; outputs ``logits``,
``present.{i}.key|value``; nodes named like torch's exporter (``/transformer/h.0/attn/Shape``)
with outputs ``<node>_output_0``.

Inside it differs from the zoo: separate Q, K and V projections (MatMul + Add), scores scaled
by a Mul, the mask applied with Where (float32's lowest value where a key is hidden), erf GELU,
an untied head. Like real exports, the past length is read as
``Shape(past_key_values.0.key)[2]`` by layer 0's nodes, whose boolean mask [batch, 1,
sequence, total] every layer then reads: layer 0's past is read before layer 0 starts its
attention.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"
MAX_POSITIONS = 128


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def op(self, op_type: str, inputs: list[str], name: str, *, output: str | None = None,
           **attrs: Any) -> str:
        output = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name, **attrs))
        return output

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def linear(self, x: str, prefix: str, name: str, d_in: int, d_out: int) -> str:
        w = self.weight(f"{name}.weight", (d_in, d_out), 1.0 / math.sqrt(d_in))
        b = self.weight(f"{name}.bias", (d_out,), 0.02)
        return self.op("Add", [self.op("MatMul", [x, w], f"{prefix}/MatMul"), b],
                       f"{prefix}/Add")

    def layer_norm(self, x: str, prefix: str, name: str, d: int) -> str:
        scale = self.const(f"{name}.weight",
                           self.rng.uniform(0.9, 1.1, (d,)).astype(np.float32))
        shift = self.weight(f"{name}.bias", (d,), 0.02)
        return self.op("LayerNormalization", [x, scale, shift],
                       f"{prefix}/LayerNormalization", axis=-1, epsilon=1e-5)


def build_hf_decoder(layers: int = 2, d_model: int = 64, heads: int = 4, vocab: int = 300,
                     seed: int = 0) -> onnx.ModelProto:
    """The decoder, with weights drawn from ``seed``."""
    g, head_dim = _Graph(seed), d_model // heads
    cache: list[str | int] = [BATCH, heads, PAST, head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQUENCE]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                            [BATCH, SEQUENCE])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             [BATCH, SEQUENCE, vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}",
                                                        TensorProto.FLOAT, cache))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, [BATCH, heads, TOTAL, head_dim]))
    tokens = g.op("Gather", [g.weight("transformer.wte.weight", (vocab, d_model), 0.5),
                             "input_ids"], "/transformer/wte/Gather")
    positions = g.op("Gather", [g.weight("transformer.wpe.weight", (MAX_POSITIONS, d_model),
                                         0.1), "position_ids"], "/transformer/wpe/Gather")
    x = g.op("Add", [tokens, positions], "/transformer/Add")
    key_visible = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], "/transformer/Cast",
                                          to=TensorProto.BOOL),
                                     g.const("/transformer/axes_1_2", np.array([1, 2]))],
                       "/transformer/Unsqueeze")
    allowed = _layer0_mask(g, x, key_visible)
    for i in range(layers):
        x = _block(g, x, i, allowed, d_model, heads)
    x = g.layer_norm(x, "/transformer/ln_f", "transformer.ln_f", d_model)
    g.op("MatMul", [x, g.weight("lm_head.weight", (d_model, vocab), 1.0 / math.sqrt(d_model))],
         "/lm_head/MatMul", output="logits")
    graph = helper.make_graph(g.nodes, "hf_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="pytorch")
    model.ir_version = 8
    return model


def _layer0_mask(g: _Graph, x: str, key_visible: str) -> str:
    """Layer 0's nodes that read the past length from its past key: the boolean mask [batch,
    1, sequence, total], true where query j (at past + j) may see key t."""
    p = "/transformer/h.0/attn"
    past = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"], f"{p}/Shape"),
                           g.const(f"{p}/two", np.array(2))], f"{p}/Gather", axis=0)
    sequence = g.op("Gather", [g.op("Shape", [x], f"{p}/Shape_1"),
                               g.const(f"{p}/one", np.array(1))], f"{p}/Gather_1", axis=0)
    total = g.op("Add", [past, sequence], f"{p}/Add")
    step = g.const(f"{p}/step", np.array(1))
    keys = g.op("Range", [g.const(f"{p}/zero", np.array(0)), total, step], f"{p}/Range")
    queries = g.op("Range", [past, total, step], f"{p}/Range_1")
    causal = g.op("LessOrEqual", [keys, g.op("Unsqueeze", [queries, g.const(
        f"{p}/axis_1", np.array([1]))], f"{p}/Unsqueeze")], f"{p}/LessOrEqual")
    return g.op("And", [causal, key_visible], f"{p}/And")


def _block(g: _Graph, x: str, i: int, allowed: str, d: int, heads: int) -> str:
    p, w = f"/transformer/h.{i}", f"transformer.h.{i}"
    head_dim = d // heads
    split = g.const(f"{p}/attn/split_shape", np.array([0, 0, heads, head_dim]))
    h = g.layer_norm(x, f"{p}/ln_1", f"{w}.ln_1", d)

    def heads_of(name: str) -> str:
        projected = g.linear(h, f"{p}/attn/{name}", f"{w}.attn.{name}", d, d)
        return g.op("Transpose", [g.op("Reshape", [projected, split],
                                       f"{p}/attn/{name}/Reshape")],
                    f"{p}/attn/{name}/Transpose", perm=[0, 2, 1, 3])

    q = heads_of("q_proj")
    keys = g.op("Concat", [f"past_key_values.{i}.key", heads_of("k_proj")],
                f"{p}/attn/Concat", output=f"present.{i}.key", axis=2)
    values = g.op("Concat", [f"past_key_values.{i}.value", heads_of("v_proj")],
                  f"{p}/attn/Concat_1", output=f"present.{i}.value", axis=2)
    scores = g.op("MatMul", [q, g.op("Transpose", [keys], f"{p}/attn/Transpose",
                                     perm=[0, 1, 3, 2])], f"{p}/attn/MatMul")
    scores = g.op("Mul", [scores, g.const(f"{p}/attn/scale",
                                          np.array(1 / math.sqrt(head_dim), np.float32))],
                  f"{p}/attn/Mul")
    lowest = g.const(f"{p}/attn/lowest", np.array(np.finfo(np.float32).min, np.float32))
    scores = g.op("Where", [allowed, scores, lowest], f"{p}/attn/Where")
    context = g.op("MatMul", [g.op("Softmax", [scores], f"{p}/attn/Softmax", axis=-1), values],
                   f"{p}/attn/MatMul_1")
    context = g.op("Reshape", [g.op("Transpose", [context], f"{p}/attn/Transpose_1",
                                    perm=[0, 2, 1, 3]),
                               g.const(f"{p}/attn/merge_shape", np.array([0, 0, d]))],
                   f"{p}/attn/Reshape")
    x = g.op("Add", [x, g.linear(context, f"{p}/attn/out_proj", f"{w}.attn.out_proj", d, d)],
             f"{p}/Add")
    hidden = g.linear(g.layer_norm(x, f"{p}/ln_2", f"{w}.ln_2", d), f"{p}/mlp/fc",
                      f"{w}.mlp.fc", d, 4 * d)
    hidden = _erf_gelu(g, hidden, f"{p}/mlp/act")
    return g.op("Add", [x, g.linear(hidden, f"{p}/mlp/proj", f"{w}.mlp.proj", 4 * d, d)],
                f"{p}/Add_1")


def _erf_gelu(g: _Graph, x: str, p: str) -> str:
    """0.5 x (1 + erf(x / sqrt 2))."""
    erf = g.op("Erf", [g.op("Mul", [x, g.const(f"{p}/inv_sqrt2", np.array(
        1 / math.sqrt(2), np.float32))], f"{p}/Mul")], f"{p}/Erf")
    gate = g.op("Add", [erf, g.const(f"{p}/one", np.array(1.0, np.float32))], f"{p}/Add")
    half = g.op("Mul", [x, g.const(f"{p}/half", np.array(0.5, np.float32))], f"{p}/Mul_1")
    return g.op("Mul", [half, gate], f"{p}/Mul_2")
