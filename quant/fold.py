"""BatchNorm folding: the inference form of a model, in which every declared conv-BN pair is one conv.

Weights fold as w' = w * gamma / sigma per output channel, and the bias as
b' = beta + (b - mu) * gamma / sigma (a conv without bias gets one). Weights are quantized *after*
folding, since the folded weights are what a deployment stores: per channel the grid is then the
same as before folding, and per tensor it is one grid for the whole folded tensor. A BN the model
does not pair with a conv (e.g. in front of one, as in pre-activation blocks) stays a BN.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def bn_scale(bn: nn.Module) -> torch.Tensor:
    """gamma / sigma = gamma / sqrt(running_var + eps), per channel: what folding multiplies a conv's weights by."""
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """A folded copy of `model` in eval mode (the source is left as it is)."""
    folded = copy.deepcopy(model).eval()
    for conv_name, bn_name in model.conv_bn_pairs():
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        scale = bn_scale(bn)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = bn.bias + (bias - bn.running_mean) * scale
        conv.weight.copy_(conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(new_bias.detach().clone().to(conv.weight.dtype))
        parent, _, leaf = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, leaf, nn.Identity())
    return folded


def fold_bias_elements(model: nn.Module, layer: str) -> int:
    """Bias elements layer `layer` has once BN is folded (what a deployment reads in fp32)."""
    m = model.get_submodule(layer)
    paired = {c for c, _ in model.conv_bn_pairs()}
    if m.bias is not None:
        return m.bias.numel()
    return m.out_channels if layer in paired else 0
