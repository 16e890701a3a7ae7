"""Export a fine-tuned configuration as integers: int8 weight levels with per-channel scales, float
biases (BN already folded), and the scale and zero point of every quantized layer input.

    python -m utils.export --checkpoint checkpoints/qat_greedy.pt --out greedy_int.pt

The file holds only tensors and plain values (``torch.load(..., weights_only=True)``). Float layers
(w = 32) keep their float weights. ``load_exported`` rebuilds a model that computes with exactly
these integers (weights = levels x scale), and gives the same predictions as the fine-tuned model.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from models import build_from_args
from utils.checkpoint import read_checkpoint
from utils.config import FLOAT_BITS
from utils.errors import UserError, error_paragraph
from utils.evaluation import FoldedModel
from utils.io import atomic_torch_save
from utils.qat import load_qat
from utils.quantization import SCALE_EPS

EXPORT_FORMAT = "ai-qs-int-v1"


def export_model(qat_checkpoint) -> dict:
    """The integer form of a fine-tuned checkpoint (see module docstring)."""
    qat, ck = load_qat(qat_checkpoint)
    layers = {}
    for name, (w, a) in ((n, tuple(v)) for n, v in ck["config"].items()):
        m = qat.get_submodule(name)
        entry = {"w_bits": w, "a_bits": a, "bias": m.bias.detach().clone() if m.bias is not None else None}
        if w != FLOAT_BITS:
            p = m.parametrizations.weight
            lsq = p[0]
            entry["weight_int8"] = lsq.integers(p.original.detach())
            entry["weight_scale"] = lsq.scale.detach().clamp_min(SCALE_EPS).clone()
        else:
            entry["weight"] = m.weight.detach().clone()
        if a != FLOAT_BITS:
            q = m.input_quant
            entry.update(input_scale=float(q.scale.detach().clamp_min(SCALE_EPS)), input_zero_point=0,
                         input_qmin=q.qmin, input_qmax=q.qmax)
        layers[name] = entry
    return {"format": EXPORT_FORMAT, "model_args": ck["model_args"], "normalization": ck["normalization"],
            "config": ck["config"], "layers": layers, "source": {"key": ck["key"], "epochs": ck["epoch"]}}


def _input_hook(scale, zero_point, qmin, qmax):
    def hook(_m, inputs):
        return (torch.fake_quantize_per_tensor_affine(inputs[0], scale, zero_point, qmin, qmax),)
    return hook


def load_exported(path) -> nn.Module:
    """A float model that computes with the exported integers: weights = int8 levels x scale."""
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is not an AI-QS integer export ({EXPORT_FORMAT}); write one with "
                        f"python -m utils.export --checkpoint <qat checkpoint> --out FILE.")
    model = FoldedModel(build_from_args(obj["model_args"])).model
    with torch.no_grad():
        for name, e in obj["layers"].items():
            m = model.get_submodule(name)
            if "weight_int8" in e:
                s = e["weight_scale"].view(-1, *([1] * (e["weight_int8"].dim() - 1)))
                m.weight.copy_(e["weight_int8"].float() * s)
            else:
                m.weight.copy_(e["weight"])
            if e["bias"] is not None:
                m.bias.copy_(e["bias"])
            if e["a_bits"] != FLOAT_BITS:
                m.register_forward_pre_hook(_input_hook(e["input_scale"], e["input_zero_point"], e["input_qmin"],
                                                        e["input_qmax"]))
    return model.eval()


def get_args_parser():
    p = argparse.ArgumentParser(description="Write a fine-tuned configuration as int8 weights, per-channel "
                                            "scales and activation scales.")
    p.add_argument("--checkpoint", required=True, help="a fine-tuning checkpoint, <checkpoint-dir>/qat_<name>.pt")
    p.add_argument("--out", required=True, help="the file to write (a weights_only-loadable torch file)")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        obj = export_model(args.checkpoint)
        atomic_torch_save(obj, args.out)
    except UserError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    n_int = sum(1 for e in obj["layers"].values() if "weight_int8" in e)
    n_act = sum(1 for e in obj["layers"].values() if e["a_bits"] != FLOAT_BITS)
    print(f"wrote {args.out}: {n_int} layers with int8 weights, {n_act} with quantized inputs, "
          f"{len(obj['layers']) - n_int} with float weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
