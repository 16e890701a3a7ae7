"""Stage 1 as an importable function: train (or resume) the float baseline, save checkpoint
and results. 1_train_baseline.py is a thin command-line shell over train_baseline()."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from models.resnet import CifarResNet, count_parameters
from utils.checkpoint import default_checkpoint_path, read_checkpoint, save_checkpoint
from utils.cli import resolve_device, seed_everything
from utils.data import channel_stats, default_val_size, load_dataset, stratified_split, subset_indices
from utils.errors import UserError
from utils.io import SCHEMA_VERSION, atomic_write_json, jsonable_args, provenance
from utils.train import PAD, Normalizer, WarmupCosine, evaluate, to_device_uint8, train_one_epoch

QUICK_TRAIN_IMAGES = 2000
QUICK_EVAL_IMAGES = 1000
QUICK_BATCH_SIZE = 32  # 62 steps instead of 15: enough for the synthetic set to be learned
# Flags that shape the trained weights: a resumed run takes them from the checkpoint.
TRAINING_FLAGS = ("depth", "shortcut", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                  "warmup_epochs", "nesterov", "seed", "val_size", "dataset", "quick")


def check_args(args):
    for flag in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "eval_batch_size"):
        v = getattr(args, flag)
        if v is not None and (v < 0 or (flag in ("batch_size", "eval_batch_size") and v == 0)):
            raise UserError(f"--{flag.replace('_', '-')} must be {'> 0' if 'batch' in flag else '>= 0'}, got {v}.")
    if args.depth < 8 or (args.depth - 2) % 6:
        raise UserError(f"--depth {args.depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110).")
    if args.eval_every < 0:
        raise UserError(f"--eval-every must be >= 0, got {args.eval_every}.")
    if not 0 <= args.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {args.momentum}.")
    if args.val_size is not None and args.val_size < 0:
        raise UserError(f"--val-size must be >= 0, got {args.val_size}.")


def prepare_split(data, seed: int, val_size, quick: bool, quick_eval: int = QUICK_EVAL_IMAGES):
    """The train/val split stage 1 trains on and stages 2-4 search on (same seed, same size)."""
    if val_size is None:
        val_size = default_val_size(len(data.train_y))
    train_idx, val_idx = stratified_split(data.train_y, val_size, seed)
    if quick:
        train_idx = train_idx[subset_indices(len(train_idx), QUICK_TRAIN_IMAGES, seed)]
        val_idx = val_idx[subset_indices(len(val_idx), quick_eval, seed)]
    return train_idx, val_idx, val_size


def _resume_args(args, path: Path):
    ckpt = read_checkpoint(path)
    if "model_args" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a stage-1 training checkpoint (it has no optimizer state), so it "
                        f"cannot be resumed. Start a new run without --resume.")
    saved = ckpt["args"]
    changed = {f: (saved.get(f), getattr(args, f)) for f in TRAINING_FLAGS
               if f in saved and getattr(args, f, None) != saved.get(f) and getattr(args, f, None) is not None}
    if changed:
        print(f"note: resuming with the checkpoint's settings; ignoring command-line values {changed}")
    for f in TRAINING_FLAGS:
        if f in saved:
            setattr(args, f, saved[f])
    if args.data_dir is None and saved.get("data_dir"):
        args.data_dir = Path(saved["data_dir"])
    return ckpt


def train_baseline(args) -> dict:
    """Train ResNet on CIFAR-10 (or synthetic data); returns the results dict it writes."""
    t_start = time.time()
    check_args(args)
    device = resolve_device(args.device)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else default_checkpoint_path(args.checkpoint_dir, args.depth)
    resume_state = _resume_args(args, ckpt_path) if args.resume else None
    args.dataset = args.dataset or "cifar10"
    args.data_dir = args.data_dir or Path("data")
    if args.quick:
        args.epochs = min(args.epochs, 1)
        args.batch_size = min(args.batch_size, QUICK_BATCH_SIZE)
    seed_everything(args.seed)

    data = load_dataset(args.dataset, args.data_dir)
    train_idx, val_idx, val_size = prepare_split(data, args.seed, args.val_size, args.quick)
    test_idx = subset_indices(len(data.test_y), QUICK_EVAL_IMAGES, args.seed) if args.quick else None
    mean, std = channel_stats(data.train_x[train_idx])
    normalize = Normalizer(mean, std, device)

    padded = to_device_uint8(data.train_x[train_idx], device)
    padded = torch.nn.functional.pad(padded, (0, 0, PAD, PAD, PAD, PAD))  # NHWC: pad H and W with zeros
    train_y = torch.from_numpy(data.train_y[train_idx]).to(device)
    val_x, val_y = (to_device_uint8(data.train_x[val_idx], device), torch.from_numpy(data.train_y[val_idx]).to(device))
    test_sel = test_idx if test_idx is not None else slice(None)
    test_x, test_y = to_device_uint8(data.test_x[test_sel], device), torch.from_numpy(data.test_y[test_sel]).to(device)

    model = CifarResNet(args.depth, args.shortcut, len(data.classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    lr = args.lr * args.batch_size / 128  # linear scaling: --lr is per 128 images
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, nesterov=args.nesterov,
                                weight_decay=args.weight_decay)
    steps_per_epoch = max(1, len(train_idx) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch))
    start_epoch, history = 0, []
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch, history = int(resume_state["epoch"]), list(resume_state.get("history", []))
        print(f"resuming {ckpt_path} after epoch {start_epoch} of {args.epochs}")
    step_fn = torch.compile(model) if args.compile else model
    use_amp = device.type == "cuda" and not args.no_amp

    data_info = {**data.describe(), "data_dir": str(args.data_dir), "seed": args.seed, "val_size": val_size,
                 "quick": bool(args.quick),
                 "train_split_images": len(train_idx), "val_split_images": len(val_idx),
                 "test_images_used": len(test_y), "search_split": "val" if len(val_idx) else "test"}
    model_args = dict(model.model_args)

    def checkpoint_state(epoch, finished, final=None):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "epochs": args.epochs,
                "finished": finished, "rng": {"torch": torch.get_rng_state()},
                "args": jsonable_args(args), "model_args": model_args,
                "normalization": {"mean": mean, "std": std}, "data": data_info, "history": history,
                "final": final}

    print(f"training {len(train_idx)} images ({data.source}), validating on {len(val_idx)}, "
          f"{args.epochs} epochs at batch {args.batch_size}, lr {lr:g}, on {device}")
    epoch, saved = start_epoch, start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            t0 = time.perf_counter()
            stats = train_one_epoch(step_fn, optimizer, scheduler, padded, train_y, normalize, args.batch_size,
                                    args.seed, epoch, use_amp, desc=f"epoch {epoch + 1}/{args.epochs}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            val = (evaluate(model, val_x, val_y, normalize, args.eval_batch_size)
                   if len(val_y) and args.eval_every and ((epoch + 1) % args.eval_every == 0) else None)
            history.append({"epoch": epoch + 1, **stats, "lr": scheduler.get_last_lr()[0],
                            "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
                            "seconds": seconds})
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {stats['train_loss']:.4f}  "
                  f"train {stats['train_acc']:.2f}%  " + (f"val {val['acc']:.2f}%  " if val else "") +
                  f"lr {history[-1]['lr']:.4f}  {seconds:.1f}s")
            save_checkpoint(ckpt_path, checkpoint_state(epoch + 1, finished=False))
            saved = epoch + 1
        # The final evaluation is inside too: a Ctrl-C there must also say how to resume.
        val = evaluate(model, val_x, val_y, normalize, args.eval_batch_size) if len(val_y) else None
        test = evaluate(model, test_x, test_y, normalize, args.eval_batch_size)
        final = {"val_acc": val["acc"] if val else None, "test_acc": test["acc"]}
        save_checkpoint(ckpt_path, checkpoint_state(args.epochs, finished=True, final=final))
    except KeyboardInterrupt:
        when = f"during epoch {epoch + 1}" if saved < args.epochs else "during the final evaluation"
        print(f"\ninterrupted {when}; {ckpt_path} holds the {saved} complete epoch(s). "
              f"Resume with: python 1_train_baseline.py --resume "
              f"--checkpoint-dir {args.checkpoint_dir}" + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
              # not a training flag, so not restored from the checkpoint: the results must land where asked
              + (f" --results-dir {args.results_dir}" if str(args.results_dir) != "results" else ""),
              file=sys.stderr)
        raise SystemExit(130)

    train_seconds = sum(h["seconds"] for h in history)

    results = {
        "stage": "1", "schema_version": SCHEMA_VERSION,
        "dataset": data_info, "model_args": model_args, "params": count_parameters(model),
        "checkpoint": str(ckpt_path),
        "test_acc": test["acc"], "val_acc": final["val_acc"], "test_loss": test["loss"],
        "val_loss": val["loss"] if val else None,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr,
        "seconds_per_epoch": train_seconds / max(1, len(history)), "train_seconds": train_seconds,
        "normalization": {"mean": mean, "std": std},
        "history": history,
    }
    results["provenance"] = provenance(args, device, inputs={"checkpoint": ckpt_path},
                                       seconds=time.time() - t_start)
    out = Path(args.results_dir) / "01_baseline.json"
    atomic_write_json(out, results)
    label = " (synthetic data)" if data.synthetic else ""
    print(f"\nbaseline{label}: test {test['acc']:.2f}%" + (f", val {val['acc']:.2f}%" if val else "") +
          f", {train_seconds / max(1, len(history)):.2f} s/epoch, {train_seconds:.1f} s training")
    print(f"wrote {ckpt_path} and {out}")
    return results
