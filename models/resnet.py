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

from models.structure import (DEFAULT_TARGET, INPUT, Add, Kernel, Read, Segment, Slot, Tensor, check_target,
                              strided_fraction)

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
        self.extra = extra_channels
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

    def blocks(self):
        return [b for stage in (self.layer1, self.layer2, self.layer3) for b in stage]

    def named_blocks(self) -> list[tuple[str, BasicBlock]]:
        return [(f"layer{s}.{i}", b) for s, stage in enumerate((self.layer1, self.layer2, self.layer3), start=1)
                for i, b in enumerate(stage)]

    def _block_kernels(self, p: str, b: BasicBlock, prev: str, target: str) -> list[Kernel]:
        """The kernels of block `b` (named `p`), which reads tensor `prev`; the last one writes the block output."""
        ks = [Kernel(f"{p}.conv1", (f"{p}.conv1",), (Read(prev),), f"{p}.conv1", (f"{p}.conv1",))]
        sc_ops = ()
        if b.projection:
            ks.append(Kernel(f"{p}.shortcut.0", (f"{p}.shortcut.0",), (Read(prev, strided_fraction(b.shortcut[0])),),
                             f"{p}.shortcut.0", (f"{p}.shortcut.0",)))   # 1x1 stride 2: a quarter of its input
            sc = Read(f"{p}.shortcut.0")
        elif isinstance(b.shortcut, PadShortcut) and target == "generic":   # fused into the add's kernel
            sc, sc_ops = Read(prev, 0.25), (f"{p}.shortcut.subsample", f"{p}.shortcut.pad")
        elif isinstance(b.shortcut, PadShortcut):   # ort-cpu: the Slice and the Pad are kernels of their own
            sub, pad = f"{p}.shortcut.subsample", f"{p}.shortcut.pad"
            ks += [Kernel(sub, (), (Read(prev, 0.25),), sub, (sub,)), Kernel(pad, (), (Read(sub),), pad, (pad,))]
            sc = Read(pad)
        else:
            sc = Read(prev)
        if target == "generic":
            ks.append(Kernel(f"{p}.conv2", (f"{p}.conv2",), (Read(f"{p}.conv1"), sc), f"{p}.conv2",
                             (f"{p}.conv2", f"{p}.add") + sc_ops))
        else:
            ks.append(Kernel(f"{p}.conv2", (f"{p}.conv2",), (Read(f"{p}.conv1"),), f"{p}.conv2", (f"{p}.conv2",)))
            ks.append(Kernel(f"{p}.add", (), (Read(f"{p}.conv2"), sc), f"{p}.add", (f"{p}.add",) + sc_ops))
        return ks

    def _kernels_by_segment(self, target: str) -> list[tuple[str, list[Kernel]]]:
        check_target(target)
        out = [("stem", [Kernel("conv1", ("conv1",), (Read(INPUT),), "conv1", ("conv1",))])]
        prev = "conv1"
        for p, b in self.named_blocks():
            ks = self._block_kernels(p, b, prev, target)
            out.append((p, ks))
            prev = ks[-1].writes
        out.append(("head", [Kernel("pool", (), (Read(prev),), "pool", ("pool",)),
                             Kernel("linear", ("linear",), (Read("pool"),), "linear", ("linear",))]))
        return out

    def kernels(self, target: str = DEFAULT_TARGET) -> list[Kernel]:
        """Stem conv+BN+ReLU; per block conv1+BN+ReLU, the projection (conv+BN) as its own kernel,
        conv2+BN+add+ReLU (generic) or conv2+BN, then add+ReLU (ort-cpu); pool; linear."""
        return [k for _, ks in self._kernels_by_segment(target) for k in ks]

    def tensors(self, target: str = DEFAULT_TARGET) -> list[Tensor]:
        check_target(target)
        ts = [Tensor(INPUT, "q_input", True), Tensor("conv1", "q_stem", False)]
        prev = "conv1"   # the block input
        for p, b in self.named_blocks():
            ts.append(Tensor(f"{p}.conv1", f"{p}.q1", False))
            if b.projection:
                ts.append(Tensor(f"{p}.shortcut.0", f"{p}.q_sc", True))
            elif isinstance(b.shortcut, PadShortcut) and target == "ort-cpu":
                ts += [Tensor(f"{p}.shortcut.{step}", f"{p}.shortcut.q_{step}", False, follows=prev)
                       for step in ("subsample", "pad")]
            if target == "generic":
                ts.append(Tensor(f"{p}.conv2", f"{p}.q_out", False))
            else:
                ts += [Tensor(f"{p}.conv2", f"{p}.q_mid", True), Tensor(f"{p}.add", f"{p}.q_out", False)]
            prev = ts[-1].name
        return ts + [Tensor("pool", "q_pool", False), Tensor("linear", "q_logits", True)]

    def segments(self, target: str = DEFAULT_TARGET) -> list[Segment]:
        """Stem, every block, head (see models/structure.py)."""
        fns = [self.stem, *self.blocks(), self.head]
        return [Segment(name, fn, tuple(k.name for k in ks))
                for fn, (name, ks) in zip(fns, self._kernels_by_segment(target))]

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("conv1", "bn1")]
        for name, b in self.named_blocks():
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
