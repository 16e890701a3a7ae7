"""Short fine-tuning runs of one configuration under recipe variants, judged on the confirm images.

    python benchmarks/qat_ablation.py --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 3 --variants default distill keep_ends8 \\
        --out docs/results/qat_ablation/qat_ablation.json --resume

Every variant fine-tunes uniform W4A4 (every weight and tensor at 4 bits, logits float) from the float
checkpoint with stage 4's trainer (utils/qat.py: ``prepare_qat`` and ``finetune``, the same checkpoints and
``--resume``), changing one thing against ``default`` (stage 4's recipe): distillation, the ends at 8 bits,
the learning rate, a warm-up, when BN freezes, scales held fixed, a start from learned rounding, or the seed
(``seed1``, ``seed2``: the spread one recipe has). Each run is checkpointed under ``--checkpoint-dir``
(``qat_ablation_<variant>.pt``), so several processes can share the variants and a last one with all of them
and ``--resume`` only evaluates.

The recipe is chosen on the **confirm** images (held out of the search, never the select part or test):
each variant's accuracy there, with its Wilson interval and its paired difference from ``default`` with
the paired bootstrap interval, and the same on the search images. Test images are not evaluated.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from quant.adaround import AdaRoundSettings  # noqa: E402
from quant.fold import fold_bn  # noqa: E402
from quant.recipe import Recipe  # noqa: E402
from quant.stats import bootstrap_drop_interval, paired_drop, wilson_interval  # noqa: E402
from quant.widths import FLOAT_BITS, tensors_of  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import atomic_write_json, provenance, sha256_file  # noqa: E402
from utils.qat import BN_HANDLING, DEFAULT_FREEZE_BN, DISTILL, finetune, prepare_qat  # noqa: E402
from utils.split import QUICK_TRAIN_IMAGES, indices_sha256, quick_subset  # noqa: E402
from utils.stages.common import QUICK_PTQ_IMAGES, QUICK_PTQ_ITERATIONS, benchmark_parser, load_setup  # noqa: E402
from utils.stages.create_baselines import with_ends  # noqa: E402
from utils.train import PAD, correct_credit, to_device_uint8  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """One fine-tuning recipe: stage 4's defaults, one field changed per named variant."""
    lr: float = 0.001
    warmup: float = 0.0
    freeze_bn: float | None = DEFAULT_FREEZE_BN
    scales: str = "learned"
    distill: bool = False
    keep_ends: int | None = None
    start: str = "nearest"        # "nearest" or "adaround": the post-training weights the fine-tune starts from
    seed_offset: int = 0


VARIANTS = {"default": Variant(), "distill": Variant(distill=True), "keep_ends8": Variant(keep_ends=8),
            "lr0.003": Variant(lr=0.003), "lr0.0003": Variant(lr=0.0003), "warmup0.1": Variant(warmup=0.1),
            "freeze_bn0.25": Variant(freeze_bn=0.25), "freeze_bn0.8": Variant(freeze_bn=0.8),
            "scales_fixed": Variant(scales="fixed"), "start_adaround": Variant(start="adaround"),
            "seed1": Variant(seed_offset=1), "seed2": Variant(seed_offset=2)}


def get_args_parser():
    p, g = benchmark_parser(__doc__, "the JSON file to write (after every variant)")
    g.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    g.add_argument("--epochs", default=3, type=int, help="(default: 3)")
    g.add_argument("--batch-size", default=128, type=int, help="(default: 128)")
    g.add_argument("--w", default=4, type=int, help="weight width of every layer (default: 4)")
    g.add_argument("--a", default=4, type=int, help="width of every tensor, logits float (default: 4)")
    g.add_argument("--resume", action="store_true", help="continue or reuse the variants' checkpoints")
    return p


def recipe_of(v: Variant, epochs: int, batch: int, steps: int, pool) -> dict:
    return {"epochs": epochs, "lr": v.lr, "batch_size": batch, "warmup_steps": int(round(v.warmup * steps)),
            "bn": "kept", "bn_handling": BN_HANDLING["kept"],
            "bn_frozen_from_step": None if v.freeze_bn is None else int(round(v.freeze_bn * steps)),
            "scales": v.scales, "loss": DISTILL if v.distill else "cross-entropy on the labels",
            "keep_ends": v.keep_ends, "start": v.start, "train_images": len(pool),
            "train_indices_sha256": indices_sha256(pool)}


def scored(credit, ref) -> dict:
    n = len(credit)
    out = {"acc": 100.0 * float(credit.sum()) / n, "acc_ci95": wilson_interval(float(credit.sum()), n), "images": n}
    if ref is not None:
        pd = paired_drop(ref, credit)     # ref - candidate: negative when the variant is better
        lo, hi = bootstrap_drop_interval(pd)
        out.update(diff_vs_default=-pd.drop, diff_vs_default_ci95=[-hi, -lo])
    return out


def qat_ablation(args) -> dict:
    t0 = time.time()
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be >= 1.")
    quick = {"ptq_images": QUICK_PTQ_IMAGES, "ptq_settings": AdaRoundSettings(iterations=QUICK_PTQ_ITERATIONS)} \
        if args.quick else {}
    s = load_setup(args, Recipe.for_target("generic", ptq="adaround", **quick), target="generic")
    if s.confirm_x is None:
        raise UserError("the ablation is judged on the confirm images; drop --confirm-size 0.")
    base = s.recipe.uniform(s.space, args.w, args.a)
    s.calibrate({args.a, 8})   # 8: the ends of keep_ends8
    pool = s.split.calibration_pool
    if args.quick:
        pool = quick_subset(pool, QUICK_TRAIN_IMAGES, s.seed)
    padded = torch.nn.functional.pad(to_device_uint8(s.data.train_x[pool], s.device), (0, 0, PAD, PAD, PAD, PAD))
    labels = torch.from_numpy(s.data.train_y[pool]).to(s.device)
    steps = max(1, len(pool) // args.batch_size) * args.epochs
    base_sha = sha256_file(s.checkpoint)
    prev = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else None
    out = {"benchmark": "qat_ablation", "checkpoint": str(s.checkpoint), "configuration": f"uniform_w{args.w}a{args.a}",
           "epochs": args.epochs, "chosen_on": s.split.confirm.name, "dataset": s.data_info,
           "quantization": s.recipe.to_json(), "variants": (prev or {}).get("variants", {})}
    need = {n for n in args.variants if VARIANTS[n].start == "adaround"}
    if need:
        s.learn_levels({(n, args.w) for n in s.space.layers})
    teacher = fold_bn(s.model).to(s.device)
    ref = {}
    for name in sorted(args.variants, key=lambda n: n != "default"):   # default first: the reference
        v = VARIANTS[name]
        cfg = dict(with_ends([(f"uniform_w{args.w}a{args.a}", base)], s.model, s.target, v.keep_ends)[0][1])
        recipe = recipe_of(v, args.epochs, args.batch_size, steps, pool)
        seed = s.seed + v.seed_offset
        key = {"base_sha256": base_sha, "config": s.space.to_file(cfg), "recipe": recipe,
               "quantization": s.recipe.to_json(), "target": s.target, "seed": seed,
               "tensor_scales": {n: s.ranges[n]["scales"][str(a)] for n, a in tensors_of(cfg).items() if a != FLOAT_BITS}}
        qat = prepare_qat(s.model, cfg, s.ranges, s.target, learn_scales=v.scales == "learned",
                          **s.recipe.weight_kwargs(), levels=s.levels if v.start == "adaround" else None).to(s.device)
        meta = {"name": name, "config": [[list(g), b] for g, b in cfg.items()], "model_args": s.meta["model_args"],
                "normalization": s.meta["normalization"], "quantization": s.recipe.to_json(), "recipe": recipe,
                "target": s.target, "seed": seed}
        r = finetune(qat, ckpt_of(args, name), key, meta, padded, labels, s.normalize, args.epochs, v.lr,
                     args.batch_size, seed, resume=args.resume, desc=f"ablation {name}",
                     teacher=teacher if v.distill else None, warmup_steps=recipe["warmup_steps"],
                     freeze_bn_step=recipe["bn_frozen_from_step"])
        m = r["model"]
        row = {"variant": dataclasses.asdict(v), "recipe": recipe, "status": r["status"], "seconds": r["seconds"],
               "seconds_per_epoch": r["seconds"] / args.epochs, "history": r["history"]}
        for part, x, y in (("confirm", s.confirm_x, s.confirm_y), ("search", s.eval_x, s.eval_y)):
            credit = correct_credit(m, x, y, s.normalize, args.eval_batch_size)
            if name == "default":
                ref[part] = credit
            row[part] = scored(credit, ref.get(part) if name != "default" else None)
        out["variants"][name] = row
        c = row["confirm"]
        extra = "" if "diff_vs_default" not in c else (f", {c['diff_vs_default']:+.2f} [{c['diff_vs_default_ci95'][0]:+.2f}, "
                                               f"{c['diff_vs_default_ci95'][1]:+.2f}] vs default")
        print(f"{name:<16}confirm {c['acc']:.2f}%{extra} ({r['status']}, {row['seconds_per_epoch']:.0f} s/epoch)",
              flush=True)
        out["provenance"] = provenance(args, s.device, {"checkpoint": s.checkpoint}, time.time() - t0)
        atomic_write_json(args.out, out)
    done = {n: r for n, r in out["variants"].items() if "confirm" in r}
    best = max(done, key=lambda n: done[n]["confirm"]["acc"])
    out["best_on_confirm"] = best
    atomic_write_json(args.out, out)
    print(f"best on the {len(s.confirm_y)} confirm images: {best}; wrote {args.out}")
    return out


def ckpt_of(args, name) -> Path:
    return Path(args.checkpoint_dir) / f"qat_ablation_{name}.pt"


def main(argv=None):
    run(qat_ablation, get_args_parser(), argv)


if __name__ == "__main__":
    main()
