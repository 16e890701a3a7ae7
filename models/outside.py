"""Models from outside the registry, by a spec, with their structure derived from the traced graph
(models/graph.py):

    build_outside("torchvision:resnet18", num_classes=10, input_size=32)   # any torchvision classification builder
    build_outside("path/to/file.py:build", kwargs={"width": 2})            # a user's function returning an nn.Module

Their ``model_args`` ({"arch": spec, "model_kwargs": {...}, "num_classes": n, "input_size": s}) rebuild them, so
checkpoints, stages and the export treat them as they treat registered architectures. Weights are the builder's
seeded random initialization (torchvision builders download nothing: ``weights=None``).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import torch
import torch.nn as nn

from models.graph import TracedModel, trace_model
from models.errors import UserError

TORCHVISION = "torchvision:"
DEFAULT_INPUT_SIZE = {"torchvision": 224, "file": 32}
BUILD_SEED = 0


def is_outside(arch: str | None) -> bool:
    return isinstance(arch, str) and ":" in arch


def input_size_default(spec: str) -> int:
    return DEFAULT_INPUT_SIZE["torchvision" if spec.startswith(TORCHVISION) else "file"]


def parse_kwargs(text: str | None) -> dict:
    """--model-kwargs JSON: an object of keyword arguments for the builder."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--model-kwargs {text!r} is not JSON ({e.msg}); give an object such as '{{\"width_mult\": "
                        f"0.5}}'.") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"--model-kwargs must be a JSON object of keyword arguments, not {type(kwargs).__name__}.")
    return kwargs


def _builder(spec: str):
    if spec.startswith(TORCHVISION):
        import torchvision
        name = spec[len(TORCHVISION):]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"{spec}: torchvision has no classification model {name!r}; "
                            f"torchvision.models.list_models() lists them (resnet18, mobilenet_v2, ...).")
        return lambda **kw: torchvision.models.get_model(name, weights=None, **kw)
    path, _, fn = spec.rpartition(":")
    file = Path(path)
    if not file.is_file() or not fn:
        raise UserError(f"--model {spec!r}: expected torchvision:NAME or path/to/file.py:FUNCTION with the file "
                        f"present; {file} {'is missing' if not file.is_file() else 'names no function'}.")
    module_spec = importlib.util.spec_from_file_location(f"aiqs_user_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"--model {spec}: importing {file} failed ({type(e).__name__}: {e}).") from None
    build = getattr(module, fn, None)
    if not callable(build):
        raise UserError(f"--model {spec}: {file} defines no function {fn!r}.")
    return build


def build_outside(spec: str, kwargs: dict | None = None, num_classes: int | None = None,
                  input_size: int | None = None) -> TracedModel:
    """The model `spec` names, seeded, traced at [1, 3, input_size, input_size]."""
    build, kwargs = _builder(spec), dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    torch.manual_seed(BUILD_SEED)
    try:
        model = build(**kwargs)
    except TypeError as e:
        params = ", ".join(inspect.signature(build).parameters) if not spec.startswith(TORCHVISION) else "see its docs"
        raise UserError(f"--model {spec}: its builder refused the arguments {sorted(kwargs)} ({e}); it takes: "
                        f"{params}.") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: the builder returned a {type(model).__name__}, not a torch.nn.Module.")
    size = int(input_size or input_size_default(spec))
    classes = _num_classes(model, size)
    args = {"arch": spec, "model_kwargs": {k: v for k, v in kwargs.items() if k != "num_classes"},
            "num_classes": classes, "input_size": size}
    return trace_model(model.eval(), (1, 3, size, size), model_args=args)


def _num_classes(model: nn.Module, size: int) -> int:
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, size, size))
    except Exception as e:
        raise UserError(f"the model does not run on a [1, 3, {size}, {size}] image ({type(e).__name__}: {e}); set "
                        f"--input-size to a size it takes.") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError("the model must return one tensor of logits [batch, classes]; it returned "
                        f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else list(out.shape)}.")
    return int(out.shape[1])
