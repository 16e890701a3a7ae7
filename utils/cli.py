"""What every stage script shares: common flags, device choice, seeding, error handling."""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from models import ARCHS, arch_names, takes_shortcut
from utils import distributed
from utils.errors import UserError, error_paragraph
from utils.machine import keep_freed_memory


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("common options (shared by all stages)")
    g.add_argument("--data-dir", default=None, type=Path,
                   help="CIFAR-10 location: a folder with cifar-10-batches-py/, an image-folder tree "
                        "(train/<class>/*, test/<class>/*), or a .tar/.tar.gz of such a tree; "
                        "downloaded here if none is found (default: data; stages 2-4: the checkpoint's)")
    g.add_argument("--dataset", default=None, choices=("cifar10", "synthetic"),
                   help="cifar10, or a small deterministic synthetic set for offline demos "
                        "(default: cifar10; stages 2-4: the checkpoint's)")
    g.add_argument("--results-dir", default="results", type=Path, help="where JSON results go (default: results)")
    g.add_argument("--checkpoint-dir", default="checkpoints", type=Path,
                   help="where checkpoints go (default: checkpoints)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda if available, else cpu (default: auto)")
    g.add_argument("--seed", default=None, type=int,
                   help="seeds data order, augmentation, validation split and initialization (stage 1 default: 0; "
                        "stages 2-4: the checkpoint's, and a different value is an error)")
    g.add_argument("--val-size", default=None, type=int,
                   help="images held out of the 50,000 training images for validation; stage 1 default "
                        "5000, 0 = train on all (stages 2-4 then search on half of the test set); stages "
                        "2-4: the checkpoint's, and a different value is an error")
    g.add_argument("--quick", action="store_true",
                   help="smoke-test setting, about a minute per stage on CPU: stage 1 trains 1 epoch on 2,000 images "
                        "at batch 32 and evaluates at most 1,000; stages 2-4 evaluate at most 250 images, weight "
                        "widths 8 4 2, and stage 3 at most 40 evaluations; heavier models than ResNet-20 get "
                        "proportionally fewer images, at least 50 (default: off)")
    return parser


def add_arch_args(parser: argparse.ArgumentParser, training: bool) -> argparse.ArgumentParser:
    g = parser.add_argument_group("model")
    default = "resnet20" if training else "the checkpoint's; for a checkpoint without model_args, resnet20"
    g.add_argument("--arch", default=None, choices=arch_names(), metavar="ARCH",
                   help=f"architecture: {', '.join(arch_names())} (default: {default})")
    g.add_argument("--depth", default=None, type=int,
                   help="ResNet depth, an alias: --depth 56 is --arch resnet56 (default: none)")
    g.add_argument("--shortcut", default=None, choices=("A", "B"),
                   help="ResNets only: A = zero-pad identity (the paper's), B = 1x1 conv projection "
                        f"(default: {'B' if training else 'the checkpoint' + chr(39) + 's, else B'})")
    if not training:
        add_outside_args(g, "the model of a --checkpoint without model_args (a plain state_dict); a checkpoint "
                            "that records its model must agree")
    return parser


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def add_outside_args(g, what: str):
    """--model, --model-kwargs, --input-size, --num-classes: a model from outside the registry (models/outside.py)."""
    g.add_argument("--model", default=None, metavar="SPEC",
                   help="a model from outside the registry, its structure derived from its traced graph: "
                        f"torchvision:NAME (any torchvision classification builder) or path/to/file.py:FUNCTION; "
                        f"{what} (default: none; the registry's --arch)")
    g.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="with --model: keyword arguments of its builder, a JSON object (default: none)")
    g.add_argument("--input-size", type=positive_int, default=None,
                   help="with --model: the image's height and width (default: 224 for torchvision, else 32)")
    g.add_argument("--num-classes", type=positive_int, default=None,
                   help="with --model: classes of its classifier (default: the builder's)")


def outside_model(opts) -> dict | None:
    """What --model and its flags ask for ({"arch", and "model_kwargs" / "num_classes" / "input_size" where given}),
    or None without --model; registry flags beside --model, or its flags without it, are errors."""
    from models.outside import parse_kwargs
    if opts.model is None:
        if opts.model_kwargs or opts.input_size or opts.num_classes:
            raise UserError("--model-kwargs, --input-size and --num-classes go with --model (a model from outside "
                            "the registry); the registry's models take 32x32 images and --arch.")
        return None
    if opts.arch or getattr(opts, "depth", None) or opts.shortcut:
        raise UserError("--model names a model from outside the registry; it takes no --arch, --depth or "
                        "--shortcut. Give one of them.")
    given = {"model_kwargs": parse_kwargs(opts.model_kwargs) if opts.model_kwargs else None,
             "num_classes": opts.num_classes, "input_size": opts.input_size}
    return {"arch": opts.model, **{k: v for k, v in given.items() if v is not None}}


def resolve_arch(arch: str | None, depth: int | None, shortcut: str | None) -> tuple[str | None, str | None]:
    """(--arch, --shortcut) after the --depth alias; None where no flag was given."""
    if depth is not None:
        alias = f"resnet{depth}"
        if alias not in ARCHS:
            raise UserError(f"--depth {depth}: a CIFAR ResNet has depth 6n+2, and the registered ones are "
                            f"8, 20, 32, 44, 56 and 110. Or name the whole architecture with --arch.")
        if arch is not None and arch != alias:
            raise UserError(f"--depth {depth} (= {alias}) conflicts with --arch {arch}; give one of them.")
        arch = alias
    if shortcut is not None and arch is not None and not takes_shortcut(arch):
        raise UserError(f"--shortcut applies to ResNets only; {arch} has no shortcut choice. Drop --shortcut.")
    return arch, shortcut


_SCRIPTS = {}


def script_module(script: str):
    """A numbered stage script imported as a module (for its parser and main), once per process; for
    tests and benchmarks, which run stages in-process."""
    if script not in _SCRIPTS:
        import importlib.util
        root = Path(__file__).resolve().parent.parent
        spec = importlib.util.spec_from_file_location(f"stage_{Path(script).stem}", root / script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _SCRIPTS[script] = mod
    return _SCRIPTS[script]


def run_stage(script: str, argv) -> tuple[dict, float]:
    """Run a numbered stage in-process with these arguments (any type; made strings): (its results JSON, seconds)."""
    import time
    mod = script_module(script)
    args = mod.get_args_parser().parse_args([str(a) for a in argv])
    t = time.perf_counter()
    out = mod.main(args).json
    return out, time.perf_counter() - t


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here "
                        f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                        "Run with --device cpu (or auto), or check the driver with nvidia-smi.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    # under torchrun each process has its own GPU (utils.distributed.init set it current)
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_non_negative(value, flag):
    if value is not None and value < 0:
        raise UserError(f"{flag} must be >= 0, got {value}.")


def run(main, parser: argparse.ArgumentParser, argv=None):
    """Parse args, run `main(args)`, and turn expected failures into one-paragraph messages.

    Exit codes: 0 ok, 2 bad input (UserError), 130 interrupted by Ctrl-C.
    """
    args = parser.parse_args(argv)
    stdout = sys.stdout
    keep_freed_memory()   # evaluation's large blocks are reused, not faulted in afresh (utils/machine.py)
    try:
        if distributed.launched():   # torchrun: join the group; only rank 0 prints progress and writes files
            if distributed.init(getattr(args, "device", "auto"))[0] > 0:
                sys.stdout = open(os.devnull, "w")
        print(args)
        main(args)
        # every rank leaves the group together, after rank 0 has written: a rank that tears its gloo group down
        # while another still works can abort in C++ teardown (CI saw rank 1 of stage 2 abort once, "terminate
        # called without an active exception")
        distributed.barrier()
    except UserError as e:
        print("\n" + error_paragraph(e), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): no partial output was written.", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.shutdown()
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
