"""CIFAR ResNets of He et al. 2015, "Deep Residual Learning for Image Recognition", Sec. 4.2.

The network is a 3x3 stem conv, then three stages of n basic blocks each (16, 32 and 64
filters on 32x32, 16x16 and 8x8 maps), global average pooling and a 10-way linear layer:
depth = 6n + 2 weighted layers.

    name        n   params (shortcut A, paper's table 6)   params (shortcut B)
    resnet8     1      75,290   (not in the paper: a smoke-test size)   78,042
    resnet20    3     269,722   (paper: 0.27M)               272,474
    resnet32    5     464,154   (paper: 0.46M)               466,906
    resnet44    7     658,586   (paper: 0.66M)               661,338
    resnet56    9     853,018   (paper: 0.85M)               855,770
    resnet110  18   1,727,962   (paper: 1.7M)              1,730,714

Shortcut A pads the identity with zero channels where the shape changes (the paper's
choice, and that of the widely used pretrained CIFAR checkpoints); shortcut B uses a 1x1
conv + BN projection there (the reference work's FP32 AI of 29.85 FLOPs/byte is for B).
Parameter names follow the common CIFAR ResNet convention (conv1, bn1, layer1.0.conv1,
layer2.0.shortcut.0, linear) so that those checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.structure import Add, Slot

DEPTHS = (8, 20, 32, 44, 56, 110)
SHORTCUTS = ("A", "B")
# Checked by _self_check() and the tests; (depth, shortcut) -> parameter count.
PARAM_COUNTS = {
    (8, "A"): 75_290, (8, "B"): 78_042,
    (20, "A"): 269_722, (20, "B"): 272_474,
    (32, "A"): 464_154, (32, "B"): 466_906,
    (44, "A"): 658_586, (44, "B"): 661_338,
    (56, "A"): 853_018, (56, "B"): 855_770,
    (110, "A"): 1_727_962, (110, "B"): 1_730_714,
}


class Subsample(nn.Module):
    """Every other row and column (no parameters)."""

    @staticmethod
    def read_view(x):
        """The elements of `x` it reads: the ones it keeps."""
        return x[:, :, ::2, ::2]

    def forward(self, x):
        return self.read_view(x)


class ChannelPad(nn.Module):
    """Zero channels either side of the input's (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    @staticmethod
    def read_view(x):
        """It reads all of its input."""
        return x

    def forward(self, x):
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters). The two steps are modules, each
    with a Slot after it: under ``ort-cpu`` the export's Slice and Pad write tensors ONNX Runtime materializes,
    at the width of the block input (the Slots then hold no quantizer: the values are already on its grid)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.subsample, self.q_subsample = Subsample(), Slot()
        self.pad, self.q_pad = ChannelPad(extra_channels), Slot()

    def forward(self, x):
        return self.q_pad(self.pad(self.q_subsample(self.subsample(x))))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.q1 = Slot()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.q_mid = Slot()      # the conv2 output before the add: a tensor only where the add is its own kernel
        self.shortcut = nn.Sequential()
        self.projection = (stride != 1 or in_planes != planes) and shortcut == "B"
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                self.q_sc = Slot()
        self.add = Add()
        self.q_out = Slot()

    def forward(self, x):
        out = self.q1(F.relu(self.bn1(self.conv1(x)), inplace=True))
        sc = self.q_sc(self.shortcut(x)) if self.projection else self.shortcut(x)
        out = self.q_mid(self.bn2(self.conv2(out)))
        return self.q_out(F.relu(self.add(out, sc), inplace=True))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, shortcut: str = "B", num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.model_args = {"arch": f"resnet{depth}", "shortcut": shortcut, "num_classes": num_classes}
        self.q_input = Slot()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.q_stem = Slot()
        planes_in = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if (i == 0 and stage > 1) else 1
                blocks.append(BasicBlock(planes_in, planes, stride, shortcut))
                planes_in = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.q_pool = Slot()
        self.linear = nn.Linear(64, num_classes)
        self.q_logits = Slot()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def stem(self, x):
        return self.q_stem(F.relu(self.bn1(self.conv1(self.q_input(x))), inplace=True))

    def head(self, x):
        return self.q_logits(self.linear(self.q_pool(torch.flatten(self.pool(x), 1))))

    def forward(self, x):
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _self_check():
    for (depth, shortcut), expected in PARAM_COUNTS.items():
        got = count_parameters(CifarResNet(depth, shortcut))
        assert got == expected, f"resnet{depth}{shortcut}: {got} parameters, expected {expected}"
    print("parameter counts match:", ", ".join(f"resnet{d}{s}={n:,}" for (d, s), n in PARAM_COUNTS.items()))


if __name__ == "__main__":
    _self_check()
