"""Stage 1 as an importable function: train (or resume) the float baseline, save checkpoint
and results. 1_train_baseline.py is a thin command-line shell over train_baseline()."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from models import build_model, normalize_model_args, takes_shortcut
from models.resnet import count_parameters
from utils.checkpoint import default_checkpoint_path, read_checkpoint, save_checkpoint
from utils import distributed as dist
from utils.cli import resolve_arch, resolve_device, seed_everything
from utils.data import channel_stats, load_dataset, subset_indices
from utils.errors import UserError
from utils.options import TrainOptions
from utils.io import RESULTS_FILES, SCHEMA_VERSIONS, atomic_write_json, provenance
from quant.cost import layer_table
from utils.split import (QUICK_EVAL_IMAGES, QUICK_TRAIN_IMAGES, indices_sha256, quick_images, quick_subset,
                         split_identity, train_val_split)
from utils.train import (PAD, GraphStep, Normalizer, WarmupCosine, check_graph_mode, evaluate, load_optimizer_state,
                         param_groups, to_device_uint8, train_one_epoch)

QUICK_BATCH_SIZE = 32  # 62 steps instead of 15: enough for the synthetic set to be learned
# Flags that shape the trained weights: a resumed run takes them from the checkpoint.
TRAINING_FLAGS = ("arch", "shortcut", "epochs", "batch_size", "lr", "momentum", "weight_decay",
                  "decay_norm_and_bias", "warmup_epochs", "nesterov", "seed", "val_size", "dataset", "quick", "sync_bn")


def check_args(opts: TrainOptions):
    for flag in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "eval_batch_size"):
        v = getattr(opts, flag)
        if v is not None and (v < 0 or (flag in ("batch_size", "eval_batch_size") and v == 0)):
            raise UserError(f"--{flag.replace('_', '-')} must be {'> 0' if 'batch' in flag else '>= 0'}, got {v}.")
    if opts.eval_every < 0:
        raise UserError(f"--eval-every must be >= 0, got {opts.eval_every}.")
    if not 0 <= opts.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {opts.momentum}.")
    if opts.val_size is not None and opts.val_size < 0:
        raise UserError(f"--val-size must be >= 0, got {opts.val_size}.")
    if opts.graph != "off" and opts.compile:
        raise UserError(f"--graph {opts.graph} and --compile both compile the training: --graph {opts.graph} the "
                        f"whole step, --compile the model alone. Give one of them.")
    if opts.graph != "off" and dist.world_size() > 1:
        raise UserError(f"--graph {opts.graph} is not supported under torchrun yet (DistributedDataParallel's "
                        f"gradient all-reduce is not part of the graph). Run with --graph off, or in one process.")


def _resolve_arch(opts) -> TrainOptions:
    arch, shortcut = resolve_arch(opts.arch, opts.depth, opts.shortcut)
    arch = arch or "resnet20"
    return opts.replace(arch=arch, shortcut=(shortcut or "B") if takes_shortcut(arch) else shortcut)


def _resume_args(opts, path: Path) -> tuple[TrainOptions, dict]:
    """(a copy of `opts` with the checkpoint's training flags, the checkpoint)."""
    ckpt = read_checkpoint(path)
    if "model_args" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{path} is not a stage-1 training checkpoint (it has no optimizer state), so it "
                        f"cannot be resumed. Start a new run without --resume.")
    if ckpt.get("finished"):
        raise UserError(f"{path} is from a finished run ({ckpt.get('epoch')} epochs); there is nothing to "
                        f"resume. Train a new one without --resume, or use it in stages 2-4.")
    saved = dict(ckpt["args"])
    ma = normalize_model_args(ckpt["model_args"])
    saved.update(arch=ma["arch"], shortcut=ma.get("shortcut"))
    # Written before checkpoint version 2: weight decay on every parameter, which is kept so that
    # the optimizer state (one parameter group) loads and the run continues its own recipe.
    saved.setdefault("decay_norm_and_bias", True)
    saved_world, world = int(saved.get("world_size", 1)), dist.world_size()
    if saved_world != world and not saved.get("sync_bn"):
        raise UserError(f"{path} was trained by {saved_world} process(es), this run has {world}. The global batch "
                        f"would be the same, but each process normalizes its own share of it (per-process BN "
                        f"statistics), so the run would not continue exactly: resume with torchrun "
                        f"--nproc_per_node {saved_world} (or 1 process for 1). Runs trained with --sync-bn "
                        f"resume under any number of processes.")
    changed = {f: (saved.get(f), getattr(opts, f)) for f in TRAINING_FLAGS
               if f in saved and getattr(opts, f, None) != saved.get(f) and getattr(opts, f, None) is not None}
    if changed:
        print(f"note: resuming with the checkpoint's settings; ignoring command-line values {changed}")
    restored = {f: saved[f] for f in TRAINING_FLAGS if f in saved}
    if opts.data_dir is None and saved.get("data_dir"):
        restored["data_dir"] = Path(saved["data_dir"])
    return opts.replace(**restored, depth=None), ckpt


def _run_args(opts) -> TrainOptions:
    """A copy of `opts` with this run's defaults filled in (after any resume)."""
    out = opts.replace(seed=0 if opts.seed is None else opts.seed, decay_norm_and_bias=bool(opts.decay_norm_and_bias),
                sync_bn=bool(opts.sync_bn), world_size=dist.world_size(), dataset=opts.dataset or "cifar10",
                data_dir=opts.data_dir or Path("data"))
    if out.quick:
        out = out.replace(epochs=min(out.epochs, 1), batch_size=min(out.batch_size, QUICK_BATCH_SIZE))
    return out


def train_baseline(opts: TrainOptions) -> dict:
    """Train ResNet on CIFAR-10 (or synthetic data); returns the results dict it writes."""
    t_start = time.time()
    check_args(opts)
    opts = _resolve_arch(opts)
    device = resolve_device(opts.device)
    check_graph_mode(opts.graph, device)
    ckpt_path = Path(opts.checkpoint) if opts.checkpoint else default_checkpoint_path(opts.checkpoint_dir, opts.arch)
    resume_state = None
    if opts.resume:
        opts, resume_state = _resume_args(opts, ckpt_path)
    opts = _run_args(opts)
    dist.local_batch(opts.batch_size)   # the global batch must split evenly over the processes
    seed_everything(opts.seed)

    data = load_dataset(opts.dataset, opts.data_dir)
    train_idx, val_idx, val_size = train_val_split(data, opts.seed, opts.val_size)
    split = split_identity(data, opts.seed, val_size, val_idx)
    test_idx = subset_indices(len(data.test_y), QUICK_EVAL_IMAGES, opts.seed) if opts.quick else None
    model = build_model(opts.arch, opts.shortcut, len(data.classes))
    if opts.quick:
        train_idx = quick_subset(train_idx, quick_images(QUICK_TRAIN_IMAGES, layer_table(model)), opts.seed)
        val_idx = quick_subset(val_idx, QUICK_EVAL_IMAGES, opts.seed)
    mean, std = channel_stats(data.train_x[train_idx])
    normalize = Normalizer(mean, std, device)

    padded = to_device_uint8(data.train_x[train_idx], device)
    padded = torch.nn.functional.pad(padded, (0, 0, PAD, PAD, PAD, PAD))  # NHWC: pad H and W with zeros
    train_y = torch.from_numpy(data.train_y[train_idx]).to(device)
    val_x, val_y = (to_device_uint8(data.train_x[val_idx], device), torch.from_numpy(data.train_y[val_idx]).to(device))
    test_sel = test_idx if test_idx is not None else slice(None)
    test_x, test_y = to_device_uint8(data.test_x[test_sel], device), torch.from_numpy(data.test_y[test_sel]).to(device)

    model = model.to(device)
    if device.type == "cuda" or dist.world_size() > 1:   # DDP's gradient buckets follow the parameters' layout
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lr = opts.lr * opts.batch_size / 128  # linear scaling: --lr is per 128 images
    # --graph cuda: the fused SGD kernel reads the LR from a tensor inside the graph (the update is the same)
    optimizer = torch.optim.SGD(param_groups(model, opts.weight_decay, opts.decay_norm_and_bias), lr=lr,
                                momentum=opts.momentum, nesterov=opts.nesterov,
                                **({"fused": True} if opts.graph == "cuda" else {}))
    steps_per_epoch = max(1, len(train_idx) // opts.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(opts.epochs * steps_per_epoch, opts.warmup_epochs * steps_per_epoch))
    start_epoch, history = 0, []
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            load_optimizer_state(optimizer, resume_state["optimizer"])   # this run's --graph picks the kernels
            scheduler.load_state_dict(resume_state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{ckpt_path} cannot be resumed by this version of AI-QS: its model, optimizer or "
                            f"scheduler state does not fit the run it describes ({str(e).splitlines()[0][:160]}). "
                            f"Start a new run without --resume (or with another --checkpoint).") from None
        start_epoch, history = int(resume_state["epoch"]), list(resume_state.get("history", []))
        print(f"resuming {ckpt_path} after epoch {start_epoch} of {opts.epochs}")
    step_fn = model
    if dist.world_size() > 1:
        if opts.sync_bn:
            step_fn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        step_fn = torch.nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(step_fn) if opts.compile else step_fn
    use_amp = device.type == "cuda" and not opts.no_amp
    graph = (GraphStep(model, optimizer, padded, train_y, normalize, use_amp, opts.graph)
             if opts.graph != "off" else None)

    data_info = {**data.describe(), "data_dir": str(opts.data_dir), "seed": opts.seed, "val_size": val_size,
                 "quick": bool(opts.quick),
                 "train_split_images": len(train_idx), "val_split_images": len(val_idx),
                 "test_images_used": len(test_y), "search_split": "val" if len(val_idx) else "test halves"}
    split_summary = {k: v for k, v in split.items() if k != "val_indices"}
    split_summary["val_indices_sha256"] = indices_sha256(split["val_indices"])
    model_args = dict(model.model_args)

    def checkpoint_state(epoch, finished, final=None):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "epochs": opts.epochs,
                "finished": finished,   # no RNG state: epoch_plan draws everything from (seed, epoch)
                "args": opts.to_json(), "model_args": model_args,
                "normalization": {"mean": mean, "std": std}, "data": {**data_info, "split": split},
                "history": history,
                "final": final}

    print(f"training {len(train_idx)} images ({data.source}), validating on {len(val_idx)}, "
          f"{opts.epochs} epochs at batch {opts.batch_size}, lr {lr:g}, on {device}"
          + (f", training step as a graph (--graph {opts.graph})" if graph else ""))
    epoch, saved = start_epoch, start_epoch
    try:
        for epoch in range(start_epoch, opts.epochs):
            t0 = time.perf_counter()
            stats = train_one_epoch(step_fn, optimizer, scheduler, padded, train_y, normalize, opts.batch_size,
                                    opts.seed, epoch, use_amp, desc=f"epoch {epoch + 1}/{opts.epochs}", graph=graph)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            dist.broadcast_buffers(model)   # rank 0's BN running statistics everywhere before evaluating
            val = (evaluate(model, val_x, val_y, normalize, opts.eval_batch_size)
                   if len(val_y) and opts.eval_every and ((epoch + 1) % opts.eval_every == 0) else None)
            history.append({"epoch": epoch + 1, **stats, "lr": scheduler.get_last_lr()[0],
                            "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
                            "seconds": seconds})
            print(f"epoch {epoch + 1:3d}/{opts.epochs}  loss {stats['train_loss']:.4f}  "
                  f"train {stats['train_acc']:.2f}%  " + (f"val {val['acc']:.2f}%  " if val else "") +
                  f"lr {history[-1]['lr']:.4f}  {seconds:.1f}s")
            if dist.is_main():
                save_checkpoint(ckpt_path, checkpoint_state(epoch + 1, finished=False))
            saved = epoch + 1
        # The final evaluation is inside too: a Ctrl-C there must also say how to resume.
        val = evaluate(model, val_x, val_y, normalize, opts.eval_batch_size) if len(val_y) else None
        test = evaluate(model, test_x, test_y, normalize, opts.eval_batch_size)
        final = {"val_acc": val["acc"] if val else None, "test_acc": test["acc"]}
        if dist.is_main():
            save_checkpoint(ckpt_path, checkpoint_state(opts.epochs, finished=True, final=final))
    except KeyboardInterrupt:
        when = f"during epoch {epoch + 1}" if saved < opts.epochs else "during the final evaluation"
        print(f"\ninterrupted {when}; {ckpt_path} holds the {saved} complete epoch(s). "
              f"Resume with: python 1_train_baseline.py --resume "
              f"--checkpoint-dir {opts.checkpoint_dir}" + (f" --checkpoint {opts.checkpoint}" if opts.checkpoint else "")
              # not a training flag, so not restored from the checkpoint: the results must land where asked
              + (f" --results-dir {opts.results_dir}" if str(opts.results_dir) != "results" else "")
              + (f" --graph {opts.graph}" if graph else ""),
              file=sys.stderr)
        raise SystemExit(130)

    train_seconds = sum(h["seconds"] for h in history)

    results = {
        "stage": "1", "schema_version": SCHEMA_VERSIONS["1"],
        "dataset": {**data_info, "split": split_summary}, "model_args": model_args, "params": count_parameters(model),
        "checkpoint": str(ckpt_path),
        "test_acc": test["acc"], "val_acc": final["val_acc"], "test_loss": test["loss"],
        "val_loss": val["loss"] if val else None,
        "epochs": opts.epochs, "batch_size": opts.batch_size, "lr": lr,
        "seconds_per_epoch": train_seconds / max(1, len(history)), "train_seconds": train_seconds,
        "normalization": {"mean": mean, "std": std},
        "history": history,
    }
    results["provenance"] = provenance(opts, device, inputs={"checkpoint": ckpt_path},
                                       seconds=time.time() - t_start)
    out = Path(opts.results_dir) / RESULTS_FILES["1"]
    if dist.is_main():
        atomic_write_json(out, results)
    dist.barrier()
    label = " (synthetic data)" if data.synthetic else ""
    print(f"\nbaseline{label}: test {test['acc']:.2f}%" + (f", val {val['acc']:.2f}%" if val else "") +
          f", {train_seconds / max(1, len(history)):.2f} s/epoch, {train_seconds:.1f} s training")
    print(f"wrote {ckpt_path} and {out}")
    return results
