"""ResNet v1.5 (torchvision's layout: stride on the 3x3 convolution of a bottleneck)."""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto

from smlaas.zoo.builder import GraphBuilder, image_input

_LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def build_resnet(name: str, image_size: int = 224) -> onnx.ModelProto:
    block_kind, layers = _LAYOUTS[name]
    expansion = 4 if block_kind == "bottleneck" else 1
    # Scale the last BN of every residual branch so the residual sum stays O(1) in depth
    # (the role torchvision's zero_init_residual plays for training).
    branch_gamma = 1.0 / math.sqrt(sum(layers))
    b = GraphBuilder(name)
    x = image_input(b, 3, image_size, image_size)
    x = b.conv(x, "conv1", 3, 64, 7, stride=2, padding=3)
    x = b.relu(b.batch_norm(x, "bn1", 64), "relu")
    x = b.max_pool(x, "maxpool", 3, 2, 1)
    in_ch = 64
    for layer_index, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            stride = 2 if (layer_index > 1 and block == 0) else 1
            prefix = f"layer{layer_index}.{block}"
            identity = x
            if block_kind == "bottleneck":
                y = b.relu(b.batch_norm(b.conv(x, f"{prefix}.conv1", in_ch, width, 1),
                                        f"{prefix}.bn1", width), f"{prefix}.relu1")
                y = b.relu(b.batch_norm(b.conv(y, f"{prefix}.conv2", width, width, 3,
                                               stride=stride, padding=1),
                                        f"{prefix}.bn2", width), f"{prefix}.relu2")
                y = b.batch_norm(b.conv(y, f"{prefix}.conv3", width, width * 4, 1),
                                 f"{prefix}.bn3", width * 4, gamma=branch_gamma)
            else:
                y = b.relu(b.batch_norm(b.conv(x, f"{prefix}.conv1", in_ch, width, 3,
                                               stride=stride, padding=1),
                                        f"{prefix}.bn1", width), f"{prefix}.relu1")
                y = b.batch_norm(b.conv(y, f"{prefix}.conv2", width, width, 3, padding=1),
                                 f"{prefix}.bn2", width, gamma=branch_gamma)
            out_ch = width * expansion
            if stride != 1 or in_ch != out_ch:
                identity = b.batch_norm(
                    b.conv(x, f"{prefix}.downsample.0", in_ch, out_ch, 1, stride=stride),
                    f"{prefix}.downsample.1", out_ch)
            x = b.relu(b.node("Add", [y, identity], f"{prefix}.add"), f"{prefix}.relu")
            in_ch = out_ch
    logits = b.classifier_head(x, in_ch, "fc")
    b.output(logits, TensorProto.FLOAT, ["batch", 1000])
    return b.build(doc=f"torchvision-compatible {name} with seeded random weights")
