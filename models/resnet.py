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

from models.structure import Segment, module_name

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


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        self.projection = (stride != 1 or in_planes != planes) and shortcut == "B"
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(planes - in_planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in place, as torchvision: saves a full activation copy
        return F.relu(out, inplace=True)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, shortcut: str = "B", num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.model_args = {"arch": f"resnet{depth}", "shortcut": shortcut, "num_classes": num_classes}
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if (i == 0 and stage > 1) else 1
                blocks.append(BasicBlock(planes_in, planes, stride, shortcut))
                planes_in = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def stem(self, x):
        return F.relu(self.bn1(self.conv1(x)), inplace=True)

    def head(self, x):
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def blocks(self):
        return [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]

    def segments(self) -> list[Segment]:
        """Stem, every block, head (see models/structure.py)."""
        segs = [Segment("stem", self.stem, ("conv1",))]
        for b in self.blocks():
            name = module_name(self, b)
            convs = ["conv1", "conv2"] + (["shortcut.0"] if b.projection else [])
            segs.append(Segment(name, b, tuple(f"{name}.{c}" for c in convs)))
        segs.append(Segment("head", self.head, ("linear",)))
        return segs

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("conv1", "bn1")]
        for b in self.blocks():
            name = module_name(self, b)
            pairs += [(f"{name}.conv1", f"{name}.bn1"), (f"{name}.conv2", f"{name}.bn2")]
            if b.projection:
                pairs.append((f"{name}.shortcut.0", f"{name}.shortcut.1"))
        return pairs

    def forward(self, x):
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(x)


def resnet20(shortcut: str = "B", num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, shortcut, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _self_check():
    for (depth, shortcut), expected in PARAM_COUNTS.items():
        got = count_parameters(CifarResNet(depth, shortcut))
        assert got == expected, f"resnet{depth}{shortcut}: {got} parameters, expected {expected}"
    print("parameter counts match:", ", ".join(f"resnet{d}{s}={n:,}" for (d, s), n in PARAM_COUNTS.items()))


if __name__ == "__main__":
    _self_check()
