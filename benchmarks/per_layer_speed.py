"""Stage 2's grid (every layer x every width): the cached, BN-folded evaluator vs a plain
re-evaluation of the whole network per candidate, same checkpoint, data and device, in one
run. Prints both times, the ratio, and whether the accuracies agree.

    python benchmarks/per_layer_speed.py                       # the stage-1 checkpoint
    python benchmarks/per_layer_speed.py --quick --bits 8 2    # a short look
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from utils.cli import add_common_args  # noqa: E402
from utils.evaluation import CachedEvaluator  # noqa: E402
from utils.stages.common import add_model_args, add_quant_args, load_setup  # noqa: E402
from utils.train import evaluate  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_args(p)
    p.add_argument("--images", default=None, type=int,
                   help="time on the first N images of the search split (default: all of it)")
    args = add_common_args(p).parse_args()
    print(args)
    s = load_setup(args, per_channel=args.granularity == "channel", clip=args.clip)
    if args.images:
        s.eval_x, s.eval_y = s.eval_x[:args.images], s.eval_y[:args.images]
    grid = [{info.name: b} for info in s.table for b in args.bits]
    for cfg in grid:  # quantize every (layer, width) once up front: both methods then share the cache
        s.quantizer.quantized(*next(iter(cfg.items())))

    sync(s.device)
    t = time.perf_counter()
    plain = []
    for cfg in grid:
        s.quantizer.apply(cfg)
        plain.append(evaluate(s.model, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size)["correct"])
    sync(s.device)
    t_plain = time.perf_counter() - t

    t = time.perf_counter()
    ev = CachedEvaluator(s.model, s.quantizer, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size)
    cached = [ev.correct(cfg) for cfg in grid]
    sync(s.device)
    t_cached = time.perf_counter() - t

    agree = sum(a == b for a, b in zip(plain, cached))
    worst = max(abs(a - b) for a, b in zip(plain, cached)) * 100.0 / len(s.eval_y)
    name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"\n{len(grid)} candidates ({len(s.table)} layers x {len(args.bits)} widths) on {len(s.eval_y)} "
          f"{s.eval_split} images, {name}")
    print(f"plain re-evaluation per candidate: {t_plain:.1f} s")
    print(f"cached + BN-folded evaluator:      {t_cached:.1f} s (incl. one full pass to fill the cache)")
    print(f"speed-up: {t_plain / t_cached:.2f}x; identical correct counts for {agree}/{len(grid)} candidates "
          f"(largest difference {worst:.2f} points: BN folding changes float rounding)")


if __name__ == "__main__":
    main()
