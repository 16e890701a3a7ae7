"""Stage 2's grid (every layer x every width, weights and with --a-bits activations): the cached,
BN-folded evaluator against plain re-evaluation of the whole network per candidate, same
checkpoint, data and device, in one run. Prints the times, the ratios, and whether the counts agree.

    python benchmarks/per_layer_speed.py                                   # the stage-1 checkpoint
    python benchmarks/per_layer_speed.py --images 1000 --a-bits 8 4        # a shorter look, with activations

Baselines: (1) the model as trained (BN not folded), weights fake-quantized, full forward per
candidate (weight candidates only; folding changes float rounding, so a near-tie may flip);
(2) the BN-folded network evaluated in full per candidate, with the activation quantizers: the same
arithmetic as the cached evaluator, so its correct counts must be identical.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from utils.cli import add_common_args  # noqa: E402
from utils.config import FLOAT_BITS  # noqa: E402
from utils.evaluation import CachedEvaluator  # noqa: E402
from utils.stages.common import act_ladder, add_model_args, add_quant_args, load_setup, weight_ladder  # noqa: E402
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
    args = add_common_args(p).parse_args()
    print(args)
    w_ladder, a_ladder = weight_ladder(args), act_ladder(args)
    s = load_setup(args, per_channel=args.granularity == "channel", clip=args.clip)
    if args.images:
        s.eval_x, s.eval_y = s.eval_x[:args.images], s.eval_y[:args.images]
    act = s.calibrate(a_ladder)
    grid = [{n: (b, FLOAT_BITS) if kind == "w" else (FLOAT_BITS, b)} for n, kind, b in
            candidates(s.layer_names, w_ladder, a_ladder)]
    weight_grid = [c for c in grid if next(iter(c.values()))[1] == FLOAT_BITS]
    for cfg in weight_grid:   # quantize every (layer, width) once up front: all methods then share the cache
        (name, (bits, _)), = cfg.items()
        s.quantizer.quantized(name, bits)

    def unfolded():
        out = []
        for cfg in weight_grid:
            s.quantizer.apply({n: w for n, (w, _) in cfg.items()})
            out.append(evaluate(s.model, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size)["correct"])
        s.quantizer.restore()
        return out

    def evaluator(cache):
        def evaluate_grid():
            ev = CachedEvaluator(s.model, s.quantizer, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size,
                                 act_quant=act, cache_activations=cache)
            return [ev.correct(cfg) for cfg in grid]
        return evaluate_grid

    sync(s.device)
    plain, t_plain = timed(unfolded)
    folded, t_folded = timed(evaluator(False))
    cached, t_cached = timed(evaluator(True))
    sync(s.device)
    agree = sum(a == b for a, b in zip(folded, cached))
    near = max((abs(a - b) for a, b in zip(plain, cached)), default=0) * 100.0 / len(s.eval_y)
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"\n{len(grid)} candidates ({len(s.table)} layers x {len(w_ladder)} weight + {len(a_ladder)} activation "
          f"widths) on {len(s.eval_y)} {s.eval_split} images, {name}")
    print(f"(1) plain, BN not folded, weight candidates only ({len(weight_grid)}): {t_plain:.1f} s "
          f"(largest difference from the folded counts {near:.2f} points: folding changes float rounding)")
    print(f"(2) plain, BN-folded, every candidate in full:      {t_folded:.1f} s")
    print(f"cached + BN-folded evaluator:                      {t_cached:.1f} s (incl. one full pass to fill the cache)")
    print(f"speed-up over (2): {t_folded / t_cached:.2f}x, identical correct counts for {agree}/{len(grid)} candidates; "
          f"over (1) per weight candidate: {t_plain / len(weight_grid) / (t_cached / len(grid)):.2f}x")


if __name__ == "__main__":
    main()
