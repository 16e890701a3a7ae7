"""The model registry: every architecture the pipeline trains, quantizes and plots, by name.

    from models import build_model
    build_model("resnet56", shortcut="A")
    build_model("mobilenetv2")

A checkpoint's ``model_args`` ({"arch": "resnet20", "shortcut": "B", "num_classes": 10}) rebuild
its model through ``build_from_args``; the older form {"arch": "resnet", "depth": 20} still does.
Every model gets its structure (models/structure.py) from its traced graph (models/graph.py), the registry's
(a ``TracedModel`` over the module, with the module's parameter names and Slots) as well as those from outside
it (``"arch": "torchvision:resnet18"`` or ``"path/file.py:build"``, models/outside.py). The structures the
registry's models once declared by hand are test data (tests/declared.py) that the derived ones equal.
"""
from __future__ import annotations

import json

import torch.nn as nn

from models.graph import TracedModel, trace_model
from models.mobilenetv2 import MobileNetV2
from models.outside import build_outside, is_outside
from models.resnet import DEPTHS, SHORTCUTS, CifarResNet
from models.structure import DEFAULT_INPUT_SHAPE

DEFAULT_ARCH = "resnet20"
DEFAULT_SHORTCUT = "B"
# name -> (constructor(num_classes, shortcut), takes a shortcut)
ARCHS = {**{f"resnet{d}": ((lambda d: lambda nc, sc: CifarResNet(d, sc, nc))(d), True) for d in DEPTHS},
         "mobilenetv2": (lambda nc, sc: MobileNetV2(nc), False)}


def arch_names() -> list[str]:
    return list(ARCHS)


def takes_shortcut(arch: str) -> bool:
    return ARCHS[arch][1]


def resnet_depth(arch: str) -> int | None:
    return int(arch[len("resnet"):]) if arch.startswith("resnet") and arch in ARCHS else None


def build_model(arch: str, shortcut: str | None = None, num_classes: int = 10) -> TracedModel:
    """A freshly initialized model, its structure derived from its traced graph; ValueError names the choices for
    an unknown arch or shortcut."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    make, has_shortcut = ARCHS[arch]
    if not has_shortcut and shortcut is not None:
        raise ValueError(f"--shortcut applies to ResNets only, not to {arch}")
    if has_shortcut and shortcut not in (None, *SHORTCUTS):
        raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
    return trace_model(make(int(num_classes), shortcut or DEFAULT_SHORTCUT), DEFAULT_INPUT_SHAPE)


def resnet20(shortcut: str = "B", num_classes: int = 10) -> TracedModel:
    """The reference work's network (build_model("resnet20", ...))."""
    return build_model("resnet20", shortcut, num_classes)


def normalize_model_args(model_args: dict) -> dict:
    """Today's form of a checkpoint's model_args; accepts the pre-registry {"arch": "resnet", "depth": N}."""
    args = dict(model_args)
    if is_outside(args.get("arch")):   # a model from outside the registry (models/outside.py): as recorded
        return {"arch": args["arch"], "model_kwargs": dict(args.get("model_kwargs") or {}),
                "num_classes": int(args["num_classes"]), "input_size": int(args["input_size"])}
    if args.get("arch", "resnet") == "resnet":
        args["arch"] = f"resnet{int(args.pop('depth', 20))}"
    args.pop("depth", None)
    arch = args["arch"]
    if arch in ARCHS and takes_shortcut(arch):
        args.setdefault("shortcut", DEFAULT_SHORTCUT)
    args.setdefault("num_classes", 10)
    return {"arch": arch, **({"shortcut": args["shortcut"]} if "shortcut" in args else {}),
            "num_classes": int(args["num_classes"])}


def build_from_args(model_args: dict) -> nn.Module:
    a = normalize_model_args(model_args)
    if is_outside(a["arch"]):
        return build_outside(a["arch"], a["model_kwargs"], a["num_classes"], a["input_size"])
    return build_model(a["arch"], a.get("shortcut"), a["num_classes"])


def describe(model_args: dict) -> str:
    """'resnet20 (shortcut B)' or 'mobilenetv2'."""
    a = normalize_model_args(model_args)
    if is_outside(a["arch"]):
        return f"{a['arch']} ({a['input_size']}x{a['input_size']}, structure from its traced graph)"
    return a["arch"] + (f" (shortcut {a['shortcut']})" if "shortcut" in a else "")


def arch_flags(model_args: dict) -> str:
    """The command-line flags that select this architecture: '--arch resnet20 --shortcut B'."""
    a = normalize_model_args(model_args)
    if is_outside(a["arch"]):
        kw = f" --model-kwargs '{json.dumps(a['model_kwargs'])}'" if a["model_kwargs"] else ""
        return f"--model {a['arch']}{kw} --input-size {a['input_size']} --num-classes {a['num_classes']}"
    return f"--arch {a['arch']}" + (f" --shortcut {a['shortcut']}" if "shortcut" in a else "")


def closest_architectures(state_dict: dict, num_classes: int = 10) -> list[tuple[dict, float]]:
    """Registered (model_args, share of the checkpoint's tensors it fits by name and shape), best
    first; 1.0 means the keys fit exactly."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    scores = []
    for arch, (_, has_shortcut) in ARCHS.items():
        for sc in (SHORTCUTS if has_shortcut else (None,)):
            own = {k: tuple(v.shape) for k, v in build_model(arch, sc, num_classes).state_dict().items()
                   if not k.endswith("num_batches_tracked")}
            fit = sum(1 for k, s in shapes.items() if own.get(k) == s)
            scores.append((normalize_model_args({"arch": arch, "num_classes": num_classes,
                                                 **({"shortcut": sc} if sc else {})}),
                           fit / max(len(shapes.keys() | own.keys()), 1)))
    return sorted(scores, key=lambda t: -t[1])
