"""A small graph builder for the zoo: ONNX nodes with seeded, deterministic weights.

Weights are drawn from a generator seeded by the model name and the tensor name, so the same
model name always gives byte-identical files, and tensors can be added in any order.
Initializer names follow the torchvision / Hugging Face state-dict names, which keeps the
parameter counts comparable with the reference implementations.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
BN_RUNNING_STATS = (".running_mean", ".running_var")


def _seeded_rng(model_name: str, tensor_name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{model_name}/{tensor_name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class GraphBuilder:
    """Accumulates nodes and initializers and turns them into a ModelProto."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._used_names: set[str] = set()

    # -- tensors -------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self._inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        self._outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def constant(self, name: str, array: np.ndarray) -> str:
        self._initializers.append(numpy_helper.from_array(array, name))
        return name

    def normal(self, name: str, shape: Sequence[int], *, std: float, mean: float = 0.0) -> str:
        rng = _seeded_rng(self.model_name, name)
        values = rng.standard_normal(tuple(shape), dtype=np.float32)
        values *= np.float32(std)
        if mean:
            values += np.float32(mean)
        return self.constant(name, values)

    def uniform(self, name: str, shape: Sequence[int], low: float, high: float) -> str:
        rng = _seeded_rng(self.model_name, name)
        return self.constant(name, rng.uniform(low, high, tuple(shape)).astype(np.float32))

    # -- nodes ---------------------------------------------------------------------------
    def node(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """Adds a single-output node named ``name`` whose output tensor is also ``name``."""
        if name in self._used_names:
            raise ValueError(f"duplicate node name {name!r} in zoo model {self.model_name}")
        self._used_names.add(name)
        self._nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def dense(self, x: str, prefix: str, in_features: int, out_features: int, *,
              std: float = 0.02) -> str:
        """``x @ W + b``, a transformer's linear layer as exporters write it (MatMul, Add)."""
        weight = self.normal(f"{prefix}.weight", (in_features, out_features), std=std)
        bias = self.normal(f"{prefix}.bias", (out_features,), std=std)
        return self.node("Add", [self.node("MatMul", [x, weight], f"{prefix}.matmul"), bias],
                         f"{prefix}.add_bias")

    def split(self, x: str, name: str, sizes: Sequence[int], *, axis: int) -> list[str]:
        """Splits ``x`` into pieces of ``sizes`` along ``axis``; outputs ``name.0``, ...."""
        if name in self._used_names:
            raise ValueError(f"duplicate node name {name!r} in zoo model {self.model_name}")
        self._used_names.add(name)
        sizes_name = self.constant(f"{name}.sizes", np.array(list(sizes), dtype=np.int64))
        outputs = [f"{name}.{index}" for index in range(len(sizes))]
        self._nodes.append(helper.make_node("Split", [x, sizes_name], outputs, name=name,
                                            axis=axis))
        return outputs

    def conv(
        self,
        x: str,
        prefix: str,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = False,
        gain: float = 2.0,
    ) -> str:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        fan_in = in_channels // groups * kh * kw
        inputs = [x, self.normal(f"{prefix}.weight", (out_channels, in_channels // groups, kh, kw),
                                 std=math.sqrt(gain / fan_in))]
        if bias:
            inputs.append(self.normal(f"{prefix}.bias", (out_channels,), std=0.01))
        return self.node(
            "Conv", inputs, prefix, kernel_shape=[kh, kw], strides=[stride, stride],
            pads=[ph, pw, ph, pw], group=groups,
        )

    def batch_norm(self, x: str, prefix: str, channels: int, *, gamma: float = 1.0,
                   epsilon: float = 1e-5) -> str:
        scale = self.uniform(f"{prefix}.weight", (channels,), 0.9 * gamma, 1.1 * gamma)
        shift = self.normal(f"{prefix}.bias", (channels,), std=0.05)
        mean = self.normal(f"{prefix}.running_mean", (channels,), std=0.05)
        var = self.uniform(f"{prefix}.running_var", (channels,), 0.9, 1.1)
        return self.node("BatchNormalization", [x, scale, shift, mean, var], prefix,
                         epsilon=epsilon)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        low = self._scalar("relu6.min", 0.0)
        high = self._scalar("relu6.max", 6.0)
        return self.node("Clip", [x, low, high], name)

    def linear(self, x: str, prefix: str, in_features: int, out_features: int) -> str:
        """torch.nn.Linear on a [N, in] tensor, as Gemm with a [out, in] weight."""
        weight = self.normal(f"{prefix}.weight", (out_features, in_features),
                             std=1.0 / math.sqrt(in_features))
        bias = self.normal(f"{prefix}.bias", (out_features,), std=0.01)
        return self.node("Gemm", [x, weight, bias], prefix, transB=1)

    def max_pool(self, x: str, name: str, kernel: int, stride: int, padding: int = 0) -> str:
        return self.node("MaxPool", [x], name, kernel_shape=[kernel, kernel],
                         strides=[stride, stride], pads=[padding] * 4)

    def avg_pool(self, x: str, name: str, kernel: int, stride: int, padding: int = 0) -> str:
        # torch's default count_include_pad=True.
        return self.node("AveragePool", [x], name, kernel_shape=[kernel, kernel],
                         strides=[stride, stride], pads=[padding] * 4, count_include_pad=1)

    def classifier_head(self, x: str, in_features: int, fc_name: str,
                        num_classes: int = 1000) -> str:
        pooled = self.node("GlobalAveragePool", [x], "avgpool")
        flat = self.node("Flatten", [pooled], "flatten", axis=1)
        return self.linear(flat, fc_name, in_features, num_classes)

    def _scalar(self, name: str, value: float) -> str:
        if name not in self._used_names:
            self._used_names.add(name)
            self.constant(name, np.array(value, dtype=np.float32))
        return name

    def build(self, *, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self._nodes, self.model_name, self._inputs, self._outputs,
                                  self._initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="smlaas-zoo", doc_string=doc)
        model.ir_version = 8
        return model


def image_input(builder: GraphBuilder, channels: int, height: int, width: int) -> str:
    """The zoo's image input: NCHW float32 with a symbolic batch dimension."""
    return builder.input("input", TensorProto.FLOAT, ["batch", channels, height, width])


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of trainable parameters, counted as torch does (BN running stats excluded)."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name.endswith(BN_RUNNING_STATS) or not tensor.name.endswith(
            (".weight", ".bias")
        ):
            continue
        total += math.prod(tensor.dims)
    return total
