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
(checked by the tests; ``python -m utils.ai_calculator --arch mobilenetv2`` prints the FLOPs). The depthwise convs do 6.5% of
the MACs but read and write full activation maps for 9 MACs per output, so their arithmetic
intensity is very low: 0.8-2.2 FLOPs/byte in fp32 at batch 1, where the pointwise convs reach
up to 18 (the 3x3 convs of ResNet-20: 20-46).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.structure import Add, Slot

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
        self.q1 = Slot()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.q2 = Slot()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.q_mid = Slot()      # the projection's output before the add: a tensor only where the add is its own kernel
        self.shortcut = nn.Sequential()
        self.residual = stride == 1
        self.projection = stride == 1 and in_planes != out_planes
        if self.projection:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False),
                                          nn.BatchNorm2d(out_planes))
            self.q_sc = Slot()
        if self.residual:
            self.add = Add()
        self.q_out = Slot()

    def forward(self, x):
        out = self.q1(F.relu(self.bn1(self.conv1(x))))
        out = self.q2(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        if not self.residual:
            return self.q_out(out)
        sc = self.q_sc(self.shortcut(x)) if self.projection else self.shortcut(x)
        return self.q_out(self.add(self.q_mid(out), sc))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.model_args = {"arch": "mobilenetv2", "num_classes": num_classes}
        self.q_input = Slot()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.q_stem = Slot()
        blocks, in_planes = [], 32
        for expansion, out_planes, num_blocks, stride in CFG:
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(Block(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(320, 1280, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.q_head = Slot()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.q_pool = Slot()
        self.linear = nn.Linear(1280, num_classes)
        self.q_logits = Slot()

    def stem(self, x):
        return self.q_stem(F.relu(self.bn1(self.conv1(self.q_input(x)))))

    def head(self, x):
        out = self.q_head(F.relu(self.bn2(self.conv2(x))))
        return self.q_logits(self.linear(self.q_pool(torch.flatten(self.pool(out), 1))))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))
