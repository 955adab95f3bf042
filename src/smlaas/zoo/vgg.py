"""VGG 16 and 19 without batch normalisation (torchvision's vgg16 / vgg19)."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from smlaas.errors import ZooError
from smlaas.zoo.builder import GraphBuilder, image_input

_CONFIGS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


def build_vgg(name: str, image_size: int = 224) -> onnx.ModelProto:
    if image_size != 224:
        # torchvision's AdaptiveAvgPool2d(7) is an identity only at 224; ONNX has no
        # adaptive pooling, so other sizes would silently change the classifier's input.
        raise ZooError(f"{name} is defined for 224x224 inputs only, got {image_size}")
    b = GraphBuilder(name)
    x = image_input(b, 3, image_size, image_size)
    in_ch, index = 3, 0
    for item in _CONFIGS[name]:
        if item == "M":
            x = b.max_pool(x, f"features.{index}", 2, 2)
            index += 1
            continue
        x = b.conv(x, f"features.{index}", in_ch, int(item), 3, padding=1, bias=True)
        x = b.relu(x, f"features.{index + 1}")
        in_ch, index = int(item), index + 2
    x = b.node("Flatten", [x], "flatten", axis=1)
    x = b.relu(b.linear(x, "classifier.0", 512 * 7 * 7, 4096), "classifier.1")
    x = b.relu(b.linear(x, "classifier.3", 4096, 4096), "classifier.4")
    logits = b.linear(x, "classifier.6", 4096, 1000)
    b.output(logits, TensorProto.FLOAT, ["batch", 1000])
    return b.build(doc=f"torchvision-compatible {name} with seeded random weights")
