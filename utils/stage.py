"""Set-up shared by the post-training stages (2-4): flags, checkpoint, data split, quantizer."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.ai_calculator import layer_table
from utils.baseline import prepare_split
from utils.checkpoint import default_checkpoint_path, load_model
from utils.cli import check_bits, resolve_device, seed_everything
from utils.data import load_dataset, subset_indices
from utils.errors import UserError
from utils.io import SCHEMA_VERSION, atomic_write_json, provenance
from utils.quantization import WeightQuantizer
from utils.train import Normalizer, to_device_uint8

DEFAULT_BITS = [8, 6, 4, 3, 2]
# --quick: a smoke test of the whole search in about a minute on 2 CPU cores.
QUICK_BITS = [8, 4, 2]
QUICK_EVAL_IMAGES = 250


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model (post-training stages)")
    g.add_argument("--checkpoint", default=None,
                   help="float checkpoint to quantize (default: <checkpoint-dir>/resnet<depth>_baseline.pt)")
    g.add_argument("--arch", default=None,
                   help="resnet20/32/44/56/110, for a checkpoint without model_args (default: the checkpoint's, else resnet20)")
    g.add_argument("--shortcut", default=None, choices=("A", "B"),
                   help="shortcut kind for a checkpoint without model_args (default: the checkpoint's, else B)")
    g.add_argument("--eval-batch-size", default=1000, type=int, help="images per evaluation batch (default: 1000)")
    g.add_argument("--force", action="store_true",
                   help="use inputs made from another checkpoint or schema, or an unfinished checkpoint (default: off)")
    return p


def add_quant_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", default=None, type=int, nargs="+",
                   help="candidate weight widths, 2-8 (default: 8 6 4 3 2; with --quick: 8 4 2)")
    g.add_argument("--granularity", default="channel", choices=("channel", "tensor"),
                   help="one scale per output channel or per tensor (default: channel)")
    g.add_argument("--clip", default="mse", choices=("mse", "maxabs"),
                   help="clipping range: MSE-optimal search or max |w| (default: mse)")
    return p


def resolve_bits(args) -> list[int]:
    """--bits as given, else the default ladder (a shorter one with --quick); validated."""
    if args.bits is None:
        args.bits = list(QUICK_BITS if args.quick else DEFAULT_BITS)
    check_bits(args.bits)
    return args.bits


def _depth_from_arch(arch):
    if arch is None:
        return None
    name = arch.lower()
    if not name.startswith("resnet") or not name[6:].isdigit():
        raise UserError(f"--arch {arch!r}: expected resnet20, resnet32, resnet44, resnet56 or resnet110.")
    return int(name[6:])


@dataclass
class Setup:
    """Everything a post-training stage evaluates with."""
    model: torch.nn.Module
    meta: dict
    checkpoint: Path
    device: torch.device
    normalize: Normalizer
    data_info: dict
    eval_x: torch.Tensor      # the search split (validation, or test when val_size is 0)
    eval_y: torch.Tensor
    eval_split: str
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    table: list
    quantizer: WeightQuantizer | None = None


def load_setup(args, need_test: bool = False, per_channel: bool = True, clip: str = "mse") -> Setup:
    """Checkpoint -> model, preprocessing and the same split stage 1 held out."""
    if getattr(args, "eval_batch_size", 1) <= 0:
        raise UserError(f"--eval-batch-size must be > 0, got {args.eval_batch_size}.")
    if hasattr(args, "bits"):
        resolve_bits(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    depth = _depth_from_arch(args.arch)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path(args.checkpoint_dir, depth or 20)
    model, meta = load_model(ckpt, {"depth": depth, "shortcut": args.shortcut}, require_finished=not args.force)
    recorded = meta["data"]
    dataset = args.dataset or recorded.get("name", "cifar10")
    if recorded.get("name") and dataset != recorded["name"] and not args.force:
        raise UserError(f"checkpoint {ckpt} was trained on {recorded['name']} data, but --dataset {dataset} "
                        f"was given. Quantization results would mix data sets: drop --dataset, or pass --force.")
    data_dir = args.data_dir or Path(recorded.get("data_dir") or meta.get("data_dir") or "data")
    data = load_dataset(dataset, data_dir)
    seed = recorded.get("seed", args.seed)
    val_size = args.val_size if args.val_size is not None else recorded.get("val_size")
    _, val_idx, val_size = prepare_split(data, seed, val_size, quick=args.quick, quick_eval=QUICK_EVAL_IMAGES)
    test_sel = subset_indices(len(data.test_y), QUICK_EVAL_IMAGES, seed) if args.quick else slice(None)
    test_x = to_device_uint8(data.test_x[test_sel], device)
    test_y = torch.from_numpy(data.test_y[test_sel]).to(device)
    if len(val_idx):
        eval_x = to_device_uint8(data.train_x[val_idx], device)
        eval_y = torch.from_numpy(data.train_y[val_idx]).to(device)
        split = "val"
    else:
        eval_x, eval_y, split = test_x, test_y, "test"
        print("note: the checkpoint was trained with --val-size 0, so the search runs on the TEST set; "
              "its test accuracies are then not held-out numbers")
    model = model.to(device)
    norm = meta["normalization"]
    info = {**data.describe(), "seed": seed, "val_size": val_size, "quick": bool(args.quick),
            "eval_split": split, "eval_images": len(eval_y), "test_images_used": len(test_y)}
    return Setup(model, meta, ckpt, device, Normalizer(norm["mean"], norm["std"], device), info,
                 eval_x, eval_y, split, test_x if need_test or split == "test" else None,
                 test_y if need_test or split == "test" else None,
                 layer_table(model, (1, 3, 32, 32)),
                 WeightQuantizer(model, per_channel=per_channel, clip=clip))


def results_header(stage: str, s: Setup) -> dict:
    """The fields every post-training results file starts with."""
    return {"stage": stage, "schema_version": SCHEMA_VERSION, "dataset": s.data_info,
            "model_args": s.meta["model_args"], "checkpoint": str(s.checkpoint), "eval_split": s.eval_split}


def write_results(result: dict, args, s: Setup, inputs: dict, t0: float, name: str) -> Path:
    """Stamp seconds and provenance, then write atomically to --results-dir/name."""
    result["seconds"] = time.time() - t0
    result["provenance"] = provenance(args, s.device, inputs=inputs, seconds=result["seconds"])
    path = Path(args.results_dir) / name
    atomic_write_json(path, result)
    return path
