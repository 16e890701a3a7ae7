"""Short fine-tuning runs of one configuration under recipe variants, judged on the confirm images.

    python benchmarks/qat_ablation.py --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 3 --variants default distill keep_ends8 \\
        --out docs/results/qat_ablation/qat_ablation.json --resume

Every variant fine-tunes one uniform configuration (default W4A4: every weight and tensor at 4 bits, logits
float; ``--w 32 --a 32`` fine-tunes fp32 in float) from the float checkpoint exactly as stage 4 does
(utils.qat.fine_tune_config with a FineTuneRecipe: the same recipe JSON, checkpoint key and ``--resume``),
changing one thing against ``default`` (stage 4's recipe): distillation, the ends at 8 bits, the learning
rate, a warm-up, when BN freezes, scales held fixed, a start from the learned post-training rounding, or the
seed (``seed1``, ``seed2``: the spread one recipe has). ``default`` and the seed variants are written under
stage 4's own names (``qat_<config>.pt``, ``qat_<config>_seed<s>.pt``), so stage 4 with ``--resume`` reuses
them; the others as ``qat_<config>__<variant>.pt``. Several processes can share the variants; a last one with
all of them and ``--evaluate-only`` evaluates the finished checkpoints from their files.

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


from quant.adaround import AdaRoundSettings  # noqa: E402
from quant.fold import fold_bn  # noqa: E402
from quant.recipe import Recipe  # noqa: E402
from quant.stats import bootstrap_drop_interval, paired_drop, wilson_interval  # noqa: E402
from quant.widths import FLOAT_BITS  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import atomic_write_json, provenance, sha256_file  # noqa: E402
from utils.qat import FineTuneRecipe, checkpoint_name, fine_tune_config, fine_tune_images, load_qat  # noqa: E402
from utils.options import ModelOptions  # noqa: E402
from utils.stages.common import QUICK_PTQ_IMAGES, QUICK_PTQ_ITERATIONS, benchmark_parser, load_setup  # noqa: E402
from utils.stages.create_baselines import with_ends  # noqa: E402
from utils.train import correct_credit  # noqa: E402


DEFAULT = FineTuneRecipe(epochs=0)   # stage 4's defaults; each variant changes one field (epochs set by --epochs)
VARIANTS = {"default": {}, "distill": {"distill": True}, "keep_ends8": {"keep_ends": 8},
            "lr0.001": {"lr": 0.001}, "lr0.003": {"lr": 0.003}, "lr0.01": {"lr": 0.01}, "lr0.0003": {"lr": 0.0003}, "warmup0.1": {"warmup": 0.1},
            "freeze_bn0.25": {"freeze_bn": 0.25}, "freeze_bn0.8": {"freeze_bn": 0.8},
            "scales_fixed": {"scales": "fixed"}, "start_post_training": {"start": "post-training"}, "seed1": {"seed_offset": 1}, "seed2": {"seed_offset": 2}}


def get_args_parser():
    p, g = benchmark_parser(__doc__, "the JSON file to write (after every variant)")
    g.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    g.add_argument("--epochs", default=3, type=int, help="(default: 3)")
    g.add_argument("--w", default=4, type=int, help="weight width of every layer, 32 = float (default: 4)")
    g.add_argument("--a", default=4, type=int, help="width of every tensor, logits float, 32 = float (default: 4)")
    g.add_argument("--resume", action="store_true", help="continue or reuse the variants' checkpoints")
    g.add_argument("--base", default="default", choices=list(VARIANTS),
                   help="the recipe every variant changes one thing of (default: stage 4's); with another base, "
                        "checkpoints are named qat_<config>__<base>+<variant>.pt and stage 4 does not reuse them")
    g.add_argument("--evaluate-only", action="store_true",
                   help="train nothing: evaluate the variants' finished checkpoints (from the file alone)")
    return p


def config_name(w: int, a: int) -> str:
    return "fp32" if w == a == FLOAT_BITS else (f"uniform_w{w}" if a == FLOAT_BITS else f"uniform_w{w}a{a}")


def variant_of(name: str, epochs: int, base: str = "default") -> tuple[FineTuneRecipe, int | None, int]:
    """(recipe, keep_ends, seed offset) of a variant: the base's changes, then the variant's."""
    v = {**VARIANTS[base], **VARIANTS[name]}
    keep_ends, offset = v.pop("keep_ends", None), v.pop("seed_offset", 0)
    return dataclasses.replace(DEFAULT, epochs=epochs, **v), keep_ends, offset


def ckpt_path(args, name: str, seed: int) -> Path:
    """Stage 4's checkpoint names: `default` and the seed variants are stage 4's own fine-tunes of the
    configuration (qat_<config>.pt, qat_<config>_seed<s>.pt), which its --resume reuses; the others carry the
    variant's name."""
    cfg = config_name(args.w, args.a)
    _, keep_ends, offset = variant_of(name, args.epochs, args.base)
    if args.base == "default" and (name == "default" or name.startswith("seed")):
        return Path(args.checkpoint_dir) / checkpoint_name(cfg, offset, seed)
    label = name if args.base == "default" else (args.base if name == "default" else f"{args.base}+{name}")
    return Path(args.checkpoint_dir) / f"qat_{cfg}__{label}.pt"


def scored(credit, ref) -> dict:
    n = len(credit)
    out = {"acc": 100.0 * float(credit.sum()) / n, "acc_ci95": wilson_interval(float(credit.sum()), n), "images": n}
    if ref is not None:
        pd = paired_drop(ref, credit)     # ref - candidate: negative when the variant is better
        lo, hi = bootstrap_drop_interval(pd)
        out.update(diff_vs_default=-pd.drop, diff_vs_default_ci95=[-hi, -lo])
    return out


def trained(args, s, name, pool, padded, labels, teacher, base_sha):
    """(model, row) of one variant: fine-tuned (or resumed, reused) as stage 4 does, or loaded (--evaluate-only)."""
    ft, keep_ends, offset = variant_of(name, args.epochs, args.base)
    path = ckpt_path(args, name, s.seed + offset)
    if args.evaluate_only:
        if not path.is_file():
            raise UserError(f"--evaluate-only: {path} does not exist; train the variant {name} first.")
        model, ck = load_qat(path)
        if not ck.get("finished"):
            raise UserError(f"--evaluate-only: {path} is unfinished (epoch {ck.get('epoch')}); resume it first.")
        return model.to(s.device), {"recipe": ck.get("recipe"), "status": "evaluated", "history": ck["history"],
                                    "seconds": float(sum(h["seconds"] for h in ck["history"])), "checkpoint": str(path)}
    cfg = s.recipe.uniform(s.space, args.w, args.a)
    cfg = dict(with_ends([(config_name(args.w, args.a), cfg)], s.model, s.target, keep_ends)[0][1])
    rj = ft.to_json(pool, s.device, s.recipe.ptq)
    r = fine_tune_config(s, config_name(args.w, args.a), cfg, ft, rj, s.recipe.to_json(), base_sha, s.seed + offset,
                         path, padded, labels, teacher, args.resume, f"ablation {name}")
    return r["model"], {"recipe": rj, "status": r["status"], "history": r["history"], "seconds": r["seconds"],
                        "checkpoint": str(path)}


def qat_ablation(args) -> dict:
    t0 = time.time()
    if args.epochs < 1:
        raise UserError("--epochs must be >= 1.")
    quick = {"ptq_images": QUICK_PTQ_IMAGES, "ptq_settings": AdaRoundSettings(iterations=QUICK_PTQ_ITERATIONS)} \
        if args.quick else {}
    s = load_setup(ModelOptions.from_args(args, strict=False), Recipe.for_target("generic", ptq="adaround", **quick), target="generic")
    if s.confirm_x is None:
        raise UserError("the ablation is judged on the confirm images; drop --confirm-size 0.")
    s.calibrate({args.a, 8})   # 8: the ends of keep_ends8
    pool = padded = labels = teacher = None
    if not args.evaluate_only:
        pool, padded, labels = fine_tune_images(s, args.quick)
        teacher = fold_bn(s.model).to(s.device)
        if any(variant_of(n, args.epochs, args.base)[0].start_from(s.recipe.ptq) != "nearest" for n in args.variants):
            s.learn_levels({(n, args.w) for n in s.space.layers} if args.w != FLOAT_BITS else set())
    prev = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else None
    out = {"benchmark": "qat_ablation", "checkpoint": str(s.checkpoint), "configuration": config_name(args.w, args.a),
           "epochs": args.epochs, "base": {"name": args.base, "changes": VARIANTS[args.base]},
           "chosen_on": s.split.confirm.name, "dataset": s.data_info,
           "quantization": s.recipe.to_json(), "variants": (prev or {}).get("variants", {})}
    base_sha = sha256_file(s.checkpoint)
    ref = {}
    for name in sorted(args.variants, key=lambda n: n != "default"):   # default first: the reference
        model, row = trained(args, s, name, pool, padded, labels, teacher, base_sha)
        row.update(variant={**VARIANTS[args.base], **VARIANTS[name]}, seconds_per_epoch=row["seconds"] / max(1, len(row["history"])))
        for part, x, y in (("confirm", s.confirm_x, s.confirm_y), ("search", s.eval_x, s.eval_y)):
            credit = correct_credit(model, x, y, s.normalize, args.eval_batch_size)
            if name == "default":
                ref[part] = credit
            row[part] = scored(credit, ref.get(part) if name != "default" else None)
        out["variants"][name] = row
        c = row["confirm"]
        extra = "" if "diff_vs_default" not in c else (f", {c['diff_vs_default']:+.2f} [{c['diff_vs_default_ci95'][0]:+.2f}, "
                                                       f"{c['diff_vs_default_ci95'][1]:+.2f}] vs default")
        print(f"{name:<20}confirm {c['acc']:.2f}%{extra} ({row['status']}, {row['seconds_per_epoch']:.0f} s/epoch)",
              flush=True)
        out["provenance"] = provenance(vars(args), s.device, {"checkpoint": s.checkpoint}, time.time() - t0)
        atomic_write_json(args.out, out)
    done = {n: r for n, r in out["variants"].items() if "confirm" in r}
    out["best_on_confirm"] = max(done, key=lambda n: done[n]["confirm"]["acc"])
    atomic_write_json(args.out, out)
    print(f"best on the {len(s.confirm_y)} confirm images: {out['best_on_confirm']}; wrote {args.out}")
    return out


def main(argv=None):
    run(qat_ablation, get_args_parser(), argv)


if __name__ == "__main__":
    main()
