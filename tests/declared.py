"""The registry's structures as they were declared by hand (kernels, tensors, segments and conv-BN pairs), frozen
as test data: the registry's models get theirs from the traced graph (models/graph.py), and tests/test_graph.py
holds the two equal for ResNet-8 through 110 (shortcuts A and B) and MobileNetV2 under both targets.

    declared_model("resnet20", "A").kernels("ort-cpu")
"""
from __future__ import annotations

import torch.nn as nn

from models.mobilenetv2 import MobileNetV2
from models.resnet import BasicBlock, CifarResNet, PadShortcut
from models.structure import (DEFAULT_TARGET, INPUT, Kernel, Read, Segment, Tensor, check_target,
                              strided_fraction)


class DeclaredCifarResNet(CifarResNet):
    """A CIFAR ResNet with its hand declarations."""

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



class DeclaredMobileNetV2(MobileNetV2):
    """MobileNetV2 with its hand declarations."""

    def _kernels_by_segment(self, target: str) -> list[tuple[str, list[Kernel]]]:
        """Stem conv+BN+ReLU; per block expand conv1+BN+ReLU, depthwise conv2+BN+ReLU, the projection
        shortcut (conv+BN) as its own kernel, project conv3+BN (+ the residual add, generic; ort-cpu:
        the add is its own kernel); the head's 1x1 conv2+BN+ReLU, pool, linear."""
        check_target(target)
        out = [("stem", [Kernel("conv1", ("conv1",), (Read(INPUT),), "conv1", ("conv1",))])]
        prev = "conv1"
        for i, b in enumerate(self.layers):
            p = f"layers.{i}"
            ks = [Kernel(f"{p}.conv1", (f"{p}.conv1",), (Read(prev),), f"{p}.conv1", (f"{p}.conv1",)),
                  Kernel(f"{p}.conv2", (f"{p}.conv2",), (Read(f"{p}.conv1"),), f"{p}.conv2", (f"{p}.conv2",))]
            conv3 = (Read(f"{p}.conv2"),)
            if not b.residual:
                ks.append(Kernel(f"{p}.conv3", (f"{p}.conv3",), conv3, f"{p}.conv3", (f"{p}.conv3",)))
            else:
                if b.projection:
                    ks.append(Kernel(f"{p}.shortcut.0", (f"{p}.shortcut.0",), (Read(prev),), f"{p}.shortcut.0",
                                     (f"{p}.shortcut.0",)))
                sc = Read(f"{p}.shortcut.0" if b.projection else prev)
                if target == "generic":
                    ks.append(Kernel(f"{p}.conv3", (f"{p}.conv3",), conv3 + (sc,), f"{p}.conv3",
                                     (f"{p}.conv3", f"{p}.add")))
                else:
                    ks += [Kernel(f"{p}.conv3", (f"{p}.conv3",), conv3, f"{p}.conv3", (f"{p}.conv3",)),
                           Kernel(f"{p}.add", (), (Read(f"{p}.conv3"), sc), f"{p}.add", (f"{p}.add",))]
            out.append((p, ks))
            prev = ks[-1].writes
        out.append(("head", [Kernel("conv2", ("conv2",), (Read(prev),), "conv2", ("conv2",)),
                             Kernel("pool", (), (Read("conv2"),), "pool", ("pool",)),
                             Kernel("linear", ("linear",), (Read("pool"),), "linear", ("linear",))]))
        return out

    def kernels(self, target: str = DEFAULT_TARGET) -> list[Kernel]:
        return [k for _, ks in self._kernels_by_segment(target) for k in ks]

    def tensors(self, target: str = DEFAULT_TARGET) -> list[Tensor]:
        check_target(target)
        ts = [Tensor(INPUT, "q_input", True), Tensor("conv1", "q_stem", False)]
        for i, b in enumerate(self.layers):
            p = f"layers.{i}"
            ts += [Tensor(f"{p}.conv1", f"{p}.q1", False), Tensor(f"{p}.conv2", f"{p}.q2", False)]
            if b.projection:
                ts.append(Tensor(f"{p}.shortcut.0", f"{p}.q_sc", True))
            if b.residual and target != "generic":
                ts += [Tensor(f"{p}.conv3", f"{p}.q_mid", True), Tensor(f"{p}.add", f"{p}.q_out", True)]
            else:
                ts.append(Tensor(f"{p}.conv3", f"{p}.q_out", True))
        return ts + [Tensor("conv2", "q_head", False), Tensor("pool", "q_pool", False),
                     Tensor("linear", "q_logits", True)]

    def segments(self, target: str = DEFAULT_TARGET) -> list[Segment]:
        fns = [self.stem, *self.layers, self.head]
        return [Segment(name, fn, tuple(k.name for k in ks))
                for fn, (name, ks) in zip(fns, self._kernels_by_segment(target))]

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("conv1", "bn1"), ("conv2", "bn2")]
        for i, b in enumerate(self.layers):
            p = f"layers.{i}"
            pairs += [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2"), (f"{p}.conv3", f"{p}.bn3")]
            if b.projection:
                pairs.append((f"{p}.shortcut.0", f"{p}.shortcut.1"))
        return pairs



def declared_model(arch: str, shortcut: str | None = None, num_classes: int = 10) -> nn.Module:
    """The registry's model `arch` (float, freshly initialized) with its frozen hand declarations."""
    if arch == "mobilenetv2":
        return DeclaredMobileNetV2(num_classes)
    return DeclaredCifarResNet(int(arch[len("resnet"):]), shortcut or "B", num_classes)
