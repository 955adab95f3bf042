"""Inception v3 (torchvision's inception_v3 without the auxiliary classifier), 3x299x299."""

from __future__ import annotations

import onnx
from onnx import TensorProto

from smlaas.zoo.builder import GraphBuilder, image_input


class _Inception:
    def __init__(self, builder: GraphBuilder) -> None:
        self.b = builder

    def basic(self, x: str, name: str, in_ch: int, out_ch: int, kernel: int | tuple[int, int],
              *, stride: int = 1, padding: int | tuple[int, int] = 0) -> str:
        """torchvision's BasicConv2d: conv (no bias), BN (eps 1e-3), ReLU."""
        y = self.b.conv(x, f"{name}.conv", in_ch, out_ch, kernel, stride=stride, padding=padding)
        return self.b.relu(self.b.batch_norm(y, f"{name}.bn", out_ch, epsilon=1e-3),
                           f"{name}.relu")

    def concat(self, name: str, branches: list[str]) -> str:
        return self.b.node("Concat", branches, f"{name}.concat", axis=1)

    def block_a(self, x: str, n: str, in_ch: int, pool_features: int) -> str:
        b1 = self.basic(x, f"{n}.branch1x1", in_ch, 64, 1)
        b5 = self.basic(x, f"{n}.branch5x5_1", in_ch, 48, 1)
        b5 = self.basic(b5, f"{n}.branch5x5_2", 48, 64, 5, padding=2)
        b3 = self.basic(x, f"{n}.branch3x3dbl_1", in_ch, 64, 1)
        b3 = self.basic(b3, f"{n}.branch3x3dbl_2", 64, 96, 3, padding=1)
        b3 = self.basic(b3, f"{n}.branch3x3dbl_3", 96, 96, 3, padding=1)
        bp = self.b.avg_pool(x, f"{n}.avg_pool", 3, 1, 1)
        bp = self.basic(bp, f"{n}.branch_pool", in_ch, pool_features, 1)
        return self.concat(n, [b1, b5, b3, bp])

    def block_b(self, x: str, n: str, in_ch: int) -> str:
        b3 = self.basic(x, f"{n}.branch3x3", in_ch, 384, 3, stride=2)
        bd = self.basic(x, f"{n}.branch3x3dbl_1", in_ch, 64, 1)
        bd = self.basic(bd, f"{n}.branch3x3dbl_2", 64, 96, 3, padding=1)
        bd = self.basic(bd, f"{n}.branch3x3dbl_3", 96, 96, 3, stride=2)
        bp = self.b.max_pool(x, f"{n}.max_pool", 3, 2)
        return self.concat(n, [b3, bd, bp])

    def block_c(self, x: str, n: str, in_ch: int, c7: int) -> str:
        b1 = self.basic(x, f"{n}.branch1x1", in_ch, 192, 1)
        b7 = self.basic(x, f"{n}.branch7x7_1", in_ch, c7, 1)
        b7 = self.basic(b7, f"{n}.branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
        b7 = self.basic(b7, f"{n}.branch7x7_3", c7, 192, (7, 1), padding=(3, 0))
        bd = self.basic(x, f"{n}.branch7x7dbl_1", in_ch, c7, 1)
        bd = self.basic(bd, f"{n}.branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
        bd = self.basic(bd, f"{n}.branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
        bd = self.basic(bd, f"{n}.branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
        bd = self.basic(bd, f"{n}.branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))
        bp = self.b.avg_pool(x, f"{n}.avg_pool", 3, 1, 1)
        bp = self.basic(bp, f"{n}.branch_pool", in_ch, 192, 1)
        return self.concat(n, [b1, b7, bd, bp])

    def block_d(self, x: str, n: str, in_ch: int) -> str:
        b3 = self.basic(x, f"{n}.branch3x3_1", in_ch, 192, 1)
        b3 = self.basic(b3, f"{n}.branch3x3_2", 192, 320, 3, stride=2)
        b7 = self.basic(x, f"{n}.branch7x7x3_1", in_ch, 192, 1)
        b7 = self.basic(b7, f"{n}.branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3))
        b7 = self.basic(b7, f"{n}.branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0))
        b7 = self.basic(b7, f"{n}.branch7x7x3_4", 192, 192, 3, stride=2)
        bp = self.b.max_pool(x, f"{n}.max_pool", 3, 2)
        return self.concat(n, [b3, b7, bp])

    def block_e(self, x: str, n: str, in_ch: int) -> str:
        b1 = self.basic(x, f"{n}.branch1x1", in_ch, 320, 1)
        b3 = self.basic(x, f"{n}.branch3x3_1", in_ch, 384, 1)
        b3 = self.b.node("Concat", [
            self.basic(b3, f"{n}.branch3x3_2a", 384, 384, (1, 3), padding=(0, 1)),
            self.basic(b3, f"{n}.branch3x3_2b", 384, 384, (3, 1), padding=(1, 0)),
        ], f"{n}.branch3x3.concat", axis=1)
        bd = self.basic(x, f"{n}.branch3x3dbl_1", in_ch, 448, 1)
        bd = self.basic(bd, f"{n}.branch3x3dbl_2", 448, 384, 3, padding=1)
        bd = self.b.node("Concat", [
            self.basic(bd, f"{n}.branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1)),
            self.basic(bd, f"{n}.branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0)),
        ], f"{n}.branch3x3dbl.concat", axis=1)
        bp = self.b.avg_pool(x, f"{n}.avg_pool", 3, 1, 1)
        bp = self.basic(bp, f"{n}.branch_pool", in_ch, 192, 1)
        return self.concat(n, [b1, b3, bd, bp])


def build_inception_v3(name: str = "inception_v3", image_size: int = 299) -> onnx.ModelProto:
    b = GraphBuilder(name)
    net = _Inception(b)
    x = image_input(b, 3, image_size, image_size)
    x = net.basic(x, "Conv2d_1a_3x3", 3, 32, 3, stride=2)
    x = net.basic(x, "Conv2d_2a_3x3", 32, 32, 3)
    x = net.basic(x, "Conv2d_2b_3x3", 32, 64, 3, padding=1)
    x = b.max_pool(x, "maxpool1", 3, 2)
    x = net.basic(x, "Conv2d_3b_1x1", 64, 80, 1)
    x = net.basic(x, "Conv2d_4a_3x3", 80, 192, 3)
    x = b.max_pool(x, "maxpool2", 3, 2)
    x = net.block_a(x, "Mixed_5b", 192, 32)
    x = net.block_a(x, "Mixed_5c", 256, 64)
    x = net.block_a(x, "Mixed_5d", 288, 64)
    x = net.block_b(x, "Mixed_6a", 288)
    x = net.block_c(x, "Mixed_6b", 768, 128)
    x = net.block_c(x, "Mixed_6c", 768, 160)
    x = net.block_c(x, "Mixed_6d", 768, 160)
    x = net.block_c(x, "Mixed_6e", 768, 192)
    x = net.block_d(x, "Mixed_7a", 768)
    x = net.block_e(x, "Mixed_7b", 1280)
    x = net.block_e(x, "Mixed_7c", 2048)
    logits = b.classifier_head(x, 2048, "fc")
    b.output(logits, TensorProto.FLOAT, ["batch", 1000])
    return b.build(doc="torchvision-compatible inception_v3 (no aux logits), seeded weights")
