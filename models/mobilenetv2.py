"""MobileNetV2 (Sandler et al. 2018, "Inverted Residuals and Linear Bottlenecks") for 32x32 inputs.

The CIFAR variant of kuangliu/pytorch-cifar, with its parameter names, so its checkpoints load:
stem conv stride 1 (not 2), the second stage's stride 1 (not 2), so a 32x32 image ends as a
4x4 map; global average pooling before the classifier. ReLU (not ReLU6), as there.

    stage  expansion  out  blocks  stride  map
    stem       -       32     1       1    32x32   3x3 conv
    1          1       16     1       1    32x32
    2          6       24     2       1    32x32
    3          6       32     3       2    16x16
    4          6       64     4       2     8x8
    5          6       96     3       1     8x8
    6          6      160     3       2     4x4
    7          6      320     1       1     4x4
    head       -     1280     1       1     4x4   1x1 conv, pool, linear

Each block is a 1x1 expansion conv, a 3x3 depthwise conv (groups = channels) and a 1x1 linear
projection (no ReLU after it); stride-1 blocks add a residual, through a 1x1 conv + BN where the
width changes (4 blocks). 17 blocks, 58 Conv2d/Linear layers (39 pointwise 1x1, 17 depthwise
3x3, the 3x3 stem, the classifier), 2,296,922 parameters, 91,154,944 MACs per 32x32 image
(checked by the tests and by ``python -m models.mobilenetv2``). The depthwise convs do 6.5% of
the MACs but read and write full activation maps for 9 MACs per output, so their arithmetic
intensity is very low: 0.8-2.2 FLOPs/byte in fp32 at batch 1, where the pointwise convs reach
up to 18 (the 3x3 convs of ResNet-20: 20-46).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.structure import Segment

PARAM_COUNT = 2_296_922
MACS = 91_154_944
# (expansion, out_planes, num_blocks, stride), kuangliu's CIFAR settings
CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class Block(nn.Module):
    """Expand (1x1) + depthwise (3x3) + project (1x1, linear)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        self.projection = stride == 1 and in_planes != out_planes
        if self.projection:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.model_args = {"arch": "mobilenetv2", "num_classes": num_classes}
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks, in_planes = [], 32
        for expansion, out_planes, num_blocks, stride in CFG:
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(Block(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)))

    def head(self, x):
        out = F.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    def segments(self) -> list[Segment]:
        segs = [Segment("stem", self.stem, ("conv1",))]
        for i, b in enumerate(self.layers):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut.0"] if b.projection else [])
            segs.append(Segment(f"layers.{i}", b, tuple(f"layers.{i}.{c}" for c in convs)))
        segs.append(Segment("head", self.head, ("conv2", "linear")))
        return segs

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("conv1", "bn1"), ("conv2", "bn2")]
        for i, b in enumerate(self.layers):
            p = f"layers.{i}"
            pairs += [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2"), (f"{p}.conv3", f"{p}.bn3")]
            if b.projection:
                pairs.append((f"{p}.shortcut.0", f"{p}.shortcut.1"))
        return pairs

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))


if __name__ == "__main__":
    from models.resnet import count_parameters
    from utils.ai_calculator import layer_table
    m = MobileNetV2()
    table = layer_table(m)
    n, macs = count_parameters(m), sum(t.macs for t in table)
    assert (n, macs) == (PARAM_COUNT, MACS), (n, macs)
    print(f"MobileNetV2 (CIFAR): {n:,} parameters, {len(table)} layers, {macs:,} MACs per image")
