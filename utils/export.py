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
from quant.fold import fold_bn
from quant.place import slots, tensor_quantizers, weight_quantizers
from quant.quantizer import Quantizer
from utils.checkpoint import read_checkpoint
from utils.errors import UserError, error_paragraph
from utils.io import atomic_torch_save
from utils.qat import load_qat

EXPORT_FORMAT = "ai-qs-int-v2"


def export_model(qat_checkpoint) -> dict:
    """The integer form of a fine-tuned checkpoint (see module docstring)."""
    qat, ck = load_qat(qat_checkpoint)
    target = ck["target"]
    layers = {}
    wq = weight_quantizers(qat, [n for (k, n), _ in ck["config"] if k == "w"])
    for (kind, name), bits in ck["config"]:
        if kind != "w":
            continue
        m = qat.get_submodule(name)
        entry = {"w_bits": bits, "bias": m.bias.detach().clone() if m.bias is not None else None}
        if name in wq:
            original = m.parametrizations.weight.original.detach()
            entry["weight_int8"] = wq[name].integers(original).to(torch.int8)
            entry["weight_scale"] = wq[name].qparams()["scale"].clone()
        else:
            entry["weight"] = m.weight.detach().clone()
        layers[name] = entry
    tensors = {n: {k: v for k, v in q.qparams().items() if k != "axis"}
               for n, q in tensor_quantizers(qat, target).items()}
    return {"format": EXPORT_FORMAT, "model_args": ck["model_args"], "normalization": ck["normalization"],
            "target": target, "config": ck["config"], "layers": layers, "tensors": tensors,
            "source": {"key": ck["key"], "epochs": ck["epoch"]}}


def load_exported(path) -> nn.Module:
    """A float model that computes with the exported integers: weights = int8 levels x scale, and each
    quantized tensor fake-quantized with its exported scale where it is written."""
    obj = read_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is not an AI-QS integer export ({EXPORT_FORMAT}); write one with "
                        f"python -m utils.export --checkpoint <qat checkpoint> --out FILE.")
    model = fold_bn(build_from_args(obj["model_args"]))
    by_slot = slots(model, obj["target"])
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
        for name, t in obj["tensors"].items():
            by_slot[name].quant = Quantizer(torch.tensor([t["scale"]]), t["qmin"], t["qmax"]).eval()
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
    print(f"wrote {args.out}: {n_int} layers with int8 weights, {len(obj['layers']) - n_int} with float weights, "
          f"{len(obj['tensors'])} quantized tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
