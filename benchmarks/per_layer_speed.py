"""Stage 2's grid (every weight layer x weight width, and with --a-bits every tensor x tensor width):
the cached, BN-folded evaluator against plain re-evaluation of the whole network per candidate, same
checkpoint, data and device, in one run. Prints the times, the ratios, and whether the counts agree.

    python benchmarks/per_layer_speed.py                                   # the stage-1 checkpoint
    python benchmarks/per_layer_speed.py --images 1000 --a-bits 8 4        # a shorter look, with activations
    python benchmarks/per_layer_speed.py --a-bits 8 4 --no-baselines --out F.json   # the correction's cost alone

Baselines: (1) every candidate placed from scratch by quant.place.quantize_ on a fresh BN-folded
copy (the one-off path: fold, quantize, attach) and evaluated in full; (2) the cached evaluator with
its activation cache off (every candidate in full, quantized weights cached): the same arithmetic
as the cached evaluator, so its correct counts must be identical. Under a statistics correction (stage 2's
``--stats-correction``, default bn; quant/correct.py), (1) corrects each placed model as the export does, and the
cached evaluator is timed once more without the correction: the correction's cost, in the same run.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from utils.cli import add_common_args  # noqa: E402
from utils.io import atomic_write_json, provenance  # noqa: E402
from utils.machine import cpu_info  # noqa: E402
from quant.correct import apply_, corrections, output_stats  # noqa: E402
from quant.fold import fold_bn  # noqa: E402
from quant.place import quantize_  # noqa: E402
from utils.options import SensitivityOptions  # noqa: E402
from utils.stages.common import (act_ladder, add_model_args, add_quant_args, load_setup, stage2_recipe,  # noqa: E402
                                 weight_ladder)
from utils.stages.per_layer_analysis import candidates  # noqa: E402
from utils.train import evaluate  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_args(p, "2")
    p.add_argument("--images", default=None, type=int,
                   help="time on the first N images of the search split (default: all of it)")
    p.add_argument("--no-baselines", action="store_true",
                   help="time only the cached evaluator, with and without the statistics correction: skips "
                        "the two plain re-evaluations (1) and (2), which take most of the run")
    p.add_argument("--out", default=None, help="also write the times and ratios to this JSON file")
    args = add_common_args(p).parse_args()
    print(args)
    t0 = time.perf_counter()
    opts = SensitivityOptions.from_args(args, strict=False)
    w_ladder, a_ladder = weight_ladder(opts), act_ladder(opts)
    s = load_setup(opts, stage2_recipe(opts, opts.cost_model or "fused"), target=opts.target)
    if args.images:
        s.eval_x, s.eval_y = s.eval_x[:args.images], s.eval_y[:args.images]
    s.calibrate(a_ladder)
    s.learn_levels([(n, b) for n in s.space.layers for b in w_ladder])     # one-time fits, not timed
    grid = [s.space.full({g: b}) for g, b in candidates(s.space, w_ladder, a_ladder, s.recipe)]
    mode = s.recipe.correction
    xc = s.normalize(s.calib_x[:s.recipe.correction_images])
    layers = [c for c, _ in s.model.conv_bn_pairs()]
    fstats = output_stats(fold_bn(s.model), layers, xc) if mode != "none" else None

    def placed():
        out = []
        for cfg in grid:
            m = quantize_(fold_bn(s.model), cfg, s.ranges, s.target, levels=s.levels, **s.recipe.weight_kwargs())
            if mode != "none":
                apply_(m, corrections(m, fstats, xc, mode))
            out.append(evaluate(m, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size)["correct"])
        return out

    def evaluator(cache, **kw):
        def evaluate_grid():
            ev = s.evaluator(s.eval_x, s.eval_y, args.eval_batch_size, cache_activations=cache, **kw)
            return [ev.correct(cfg) for cfg in grid]
        return evaluate_grid

    sync(s.device)
    skipped = ([], None)
    plain, t_plain = skipped if args.no_baselines else timed(placed)
    folded, t_folded = skipped if args.no_baselines else timed(evaluator(False))
    cached, t_cached = timed(evaluator(True))
    _, t_uncorrected = timed(evaluator(True, correction=None)) if mode != "none" else (None, None)
    sync(s.device)
    agree = sum(a == b for a, b in zip(folded, cached))
    agree_plain = sum(a == b for a, b in zip(plain, cached))
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"\n{len(grid)} candidates ({len(s.space.layers)} weight layers x {len(w_ladder)} widths + "
          f"{len(s.space.tensors) if a_ladder else 0} tensors x {len(a_ladder)} widths) on {len(s.eval_y)} "
          f"{s.eval_split} images, {name}")
    if not args.no_baselines:
        print(f"(1) placed from scratch (quantize_ on a fresh folded copy), full forward: {t_plain:.1f} s")
        print(f"(2) evaluator, activation cache off, every candidate in full:           {t_folded:.1f} s")
    print(f"cached evaluator:                                                      {t_cached:.1f} s "
          f"(incl. one full pass to fill the cache)")
    if not args.no_baselines:
        print(f"speed-up over (1): {t_plain / t_cached:.2f}x, over (2): {t_folded / t_cached:.2f}x; identical "
              f"correct counts for {agree}/{len(grid)} candidates against (2), {agree_plain}/{len(grid)} against (1)")
    if mode != "none":
        print(f"cached evaluator without the {mode} correction:                       {t_uncorrected:.1f} s: the "
              f"correction costs {t_cached / t_uncorrected:.2f}x (on {s.recipe.correction_images} calibration images)")
    if args.out:
        atomic_write_json(args.out, {
            "candidates": len(grid), "images": len(s.eval_y), "split": s.eval_split, "machine": name,
            "cpu": cpu_info(), "quantization": s.recipe.to_json(),
            "seconds": {"placed": t_plain, "no_cache": t_folded, "cached": t_cached, "cached_uncorrected": t_uncorrected},
            "speedup_over_placed": t_plain / t_cached if t_plain else None,
            "speedup_over_no_cache": t_folded / t_cached if t_folded else None,
            "identical_counts": {"no_cache": agree, "placed": agree_plain} if not args.no_baselines else None,
            "correction_cost": t_cached / t_uncorrected if t_uncorrected else None,
            "provenance": provenance(vars(args), s.device, {"checkpoint": s.checkpoint}, time.perf_counter() - t0)})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
