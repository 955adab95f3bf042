"""MobileNet v1 (Howard et al. 2017, width 1.0) and v2 (torchvision's mobilenet_v2)."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from smlaas.zoo.builder import GraphBuilder, image_input

# (output channels, stride) of the 13 depthwise-separable blocks of MobileNet v1.
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
# (expansion t, channels c, repeats n, stride s) of MobileNet v2.
_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def build_mobilenet_v1(name: str = "mobilenet_v1", image_size: int = 224) -> onnx.ModelProto:
    b = GraphBuilder(name)
    x = image_input(b, 3, image_size, image_size)
    x = b.conv(x, "model.0.conv", 3, 32, 3, stride=2, padding=1)
    x = b.relu(b.batch_norm(x, "model.0.bn", 32), "model.0.relu")
    in_ch = 32
    for index, (out_ch, stride) in enumerate(_V1_BLOCKS, start=1):
        p = f"model.{index}"
        x = b.conv(x, f"{p}.dw", in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch)
        x = b.relu(b.batch_norm(x, f"{p}.dw_bn", in_ch), f"{p}.dw_relu")
        x = b.conv(x, f"{p}.pw", in_ch, out_ch, 1)
        x = b.relu(b.batch_norm(x, f"{p}.pw_bn", out_ch), f"{p}.pw_relu")
        in_ch = out_ch
    logits = b.classifier_head(x, in_ch, "fc")
    b.output(logits, TensorProto.FLOAT, ["batch", 1000])
    return b.build(doc="MobileNet v1 (1.0, 224) with seeded random weights")


def build_mobilenet_v2(name: str = "mobilenet_v2", image_size: int = 224) -> onnx.ModelProto:
    b = GraphBuilder(name)
    x = image_input(b, 3, image_size, image_size)
    x = b.conv(x, "features.0.0", 3, 32, 3, stride=2, padding=1)
    x = b.relu6(b.batch_norm(x, "features.0.1", 32), "features.0.2")
    in_ch, index = 32, 1
    for expansion, channels, repeats, first_stride in _V2_SETTINGS:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            p = f"features.{index}.conv"
            hidden = in_ch * expansion
            y, layer = x, 0
            if expansion != 1:
                y = b.conv(y, f"{p}.{layer}.0", in_ch, hidden, 1)
                y = b.relu6(b.batch_norm(y, f"{p}.{layer}.1", hidden), f"{p}.{layer}.2")
                layer += 1
            y = b.conv(y, f"{p}.{layer}.0", hidden, hidden, 3, stride=stride, padding=1,
                       groups=hidden)
            y = b.relu6(b.batch_norm(y, f"{p}.{layer}.1", hidden), f"{p}.{layer}.2")
            y = b.conv(y, f"{p}.{layer + 1}", hidden, channels, 1)
            y = b.batch_norm(y, f"{p}.{layer + 2}", channels, gamma=0.5)
            if stride == 1 and in_ch == channels:
                y = b.node("Add", [x, y], f"features.{index}.add")
            x, in_ch, index = y, channels, index + 1
    x = b.conv(x, f"features.{index}.0", in_ch, 1280, 1)
    x = b.relu6(b.batch_norm(x, f"features.{index}.1", 1280), f"features.{index}.2")
    logits = b.classifier_head(x, 1280, "classifier.1")
    b.output(logits, TensorProto.FLOAT, ["batch", 1000])
    return b.build(doc="torchvision-compatible mobilenet_v2 with seeded random weights")
