"""DenseNet-BC 121 / 169 / 201 (torchvision layout, growth rate 32, bottleneck width 4).

Each dense layer concatenates its output onto the running feature map, which computes the same
as torchvision's concatenation of the whole list and leaves one tensor between layers.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from smlaas.zoo.builder import GraphBuilder, image_input

_BLOCKS = {
    "densenet121": (6, 12, 24, 16),
    "densenet169": (6, 12, 32, 32),
    "densenet201": (6, 12, 48, 32),
}
GROWTH_RATE = 32
BOTTLENECK_WIDTH = 4


def build_densenet(name: str, image_size: int = 224) -> onnx.ModelProto:
    b = GraphBuilder(name)
    x = image_input(b, 3, image_size, image_size)
    x = b.conv(x, "features.conv0", 3, 64, 7, stride=2, padding=3)
    x = b.relu(b.batch_norm(x, "features.norm0", 64), "features.relu0")
    x = b.max_pool(x, "features.pool0", 3, 2, 1)
    channels = 64
    blocks = _BLOCKS[name]
    for block_index, layers in enumerate(blocks, start=1):
        for layer in range(1, layers + 1):
            p = f"features.denseblock{block_index}.denselayer{layer}"
            inner = BOTTLENECK_WIDTH * GROWTH_RATE
            y = b.relu(b.batch_norm(x, f"{p}.norm1", channels), f"{p}.relu1")
            y = b.conv(y, f"{p}.conv1", channels, inner, 1)
            y = b.relu(b.batch_norm(y, f"{p}.norm2", inner), f"{p}.relu2")
            y = b.conv(y, f"{p}.conv2", inner, GROWTH_RATE, 3, padding=1)
            x = b.node("Concat", [x, y], f"{p}.concat", axis=1)
            channels += GROWTH_RATE
        if block_index != len(blocks):
            p = f"features.transition{block_index}"
            y = b.relu(b.batch_norm(x, f"{p}.norm", channels), f"{p}.relu")
            y = b.conv(y, f"{p}.conv", channels, channels // 2, 1)
            x = b.avg_pool(y, f"{p}.pool", 2, 2)
            channels //= 2
    x = b.relu(b.batch_norm(x, "features.norm5", channels), "features.relu5")
    logits = b.classifier_head(x, channels, "classifier")
    b.output(logits, TensorProto.FLOAT, ["batch", 1000])
    return b.build(doc=f"torchvision-compatible {name} with seeded random weights")
