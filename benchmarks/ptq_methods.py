"""Post-training quantization methods measured against each other on one checkpoint, on the test images.

    python benchmarks/ptq_methods.py --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --out docs/results/ptq_methods/ptq_methods.json

For each uniform configuration (logits float; ``uniform_w4`` and ``uniform_w3`` leave every tensor float)
and each method (``nearest``: round to nearest on the MSE grid, what stages 2-4 did before; ``adaround``:
learned rounding per layer, quant/adaround.py; ``block``: learned rounding per block, quant/blockwise.py; both
fitted on training images and cached, utils/ptq.py) and each statistics
correction (``--corrections``: ``none``, ``bias``, ``bn``; quant/correct.py, measured per configuration on the first
512 training calibration images), it evaluates the simulated network on the report images (the test set, or the
test report half for a checkpoint without a validation split) and writes, per row, the accuracy with its Wilson
interval, the paired drop against float with its bootstrap interval, the tie rate and the seconds it took (the
fits it needed included, and apart as ``fit_seconds``), and the same accuracy and drop on the search (validation)
images, where a default is chosen, with each method's paired gain over the methods measured before it
(``search_gain_vs``: {method: {gain, se}}, same configuration and correction): the test images decide nothing.
``--act-calibs mse kl`` measures every method with both tensor-range calibrations (``act_calib`` in each row; the
kl rows' gains are listed under "<method>, kl ranges").
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.adaround import AdaRoundSettings  # noqa: E402
from quant.correct import MODES as CORRECTIONS  # noqa: E402
from quant.recipe import ACT_CALIBS, Recipe  # noqa: E402
from quant.stats import bootstrap_drop_interval, paired_drop, wilson_interval  # noqa: E402
from quant.widths import FLOAT_BITS, tensors_of, weights_of  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import atomic_write_json, provenance  # noqa: E402
from utils.ptq import DEFAULT_CACHE_DIR, DEFAULT_PTQ_IMAGES, PTQ_METHODS, learned_levels  # noqa: E402
from utils.options import ModelOptions  # noqa: E402
from utils.stages.common import benchmark_parser, load_setup  # noqa: E402

CONFIGS = {"uniform_w8a8": (8, 8), "uniform_w4": (4, FLOAT_BITS), "uniform_w4a8": (4, 8), "uniform_w3": (3, FLOAT_BITS),
           "uniform_w4a4": (4, 4), "uniform_w3a3": (3, 3)}


def get_args_parser():
    p, g = benchmark_parser(__doc__, "the JSON file to write (after every row)")
    g.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    g.add_argument("--methods", nargs="+", default=list(PTQ_METHODS), choices=PTQ_METHODS)
    g.add_argument("--corrections", nargs="+", default=list(CORRECTIONS), choices=CORRECTIONS,
                   help="statistics corrections to measure after each method (default: all)")
    g.add_argument("--act-calibs", nargs="+", default=["mse"], choices=ACT_CALIBS,
                   help="tensor-range calibrations to measure each method with (mse; kl: quant/loss_aware.py, on the "
                        "first --act-calib-images training images; default: mse)")
    g.add_argument("--act-calib-images", default=Recipe().act_calib_images, type=int,
                   help=f"(default: {Recipe().act_calib_images})")
    g.add_argument("--correction-images", default=Recipe().correction_images, type=int,
                   help=f"training images the correction is measured on (default: {Recipe().correction_images})")
    g.add_argument("--ptq-images", default=DEFAULT_PTQ_IMAGES, type=int,
                   help=f"training images the learned rounding is fitted on (default: {DEFAULT_PTQ_IMAGES})")
    g.add_argument("--ptq-iterations", default=AdaRoundSettings().iterations, type=int,
                   help=f"optimizer steps per layer and width (default: {AdaRoundSettings.iterations})")
    g.add_argument("--ptq-cache", default=DEFAULT_CACHE_DIR, type=Path, help=f"(default: {DEFAULT_CACHE_DIR})")
    g.add_argument("--ablate", nargs="*", default=[], metavar="STEPSxIMAGES",
                   help="also fit learned rounding with these settings (e.g. 500x256 2000x256) and score uniform W3 "
                        "(tensors float) on the *search* (validation) images, where the settings are chosen; the "
                        "test images never decide them")
    return p


def ablation(args, s, recipe) -> list[dict]:
    """Uniform W3 weights under each --ablate setting, scored on the search images (selection happens here)."""
    cfg = recipe.uniform(s.space, 3, FLOAT_BITS)
    pairs = [(n, 3) for n in s.space.layers]
    plain = s.evaluator(s.eval_x, s.eval_y, args.eval_batch_size, cache_activations=False)
    rows = [{"setting": "nearest", **row("uniform_w3", "nearest", plain.evaluate(cfg), plain.float_outcome, 0.0)}]
    for spec in args.ablate:
        try:
            steps, images = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            raise UserError(f"--ablate {spec!r}: give STEPSxIMAGES, e.g. 2000x256.") from None
        r = Recipe(ptq="adaround", ptq_images=images, ptq_settings=AdaRoundSettings(iterations=steps))
        t = time.time()
        fit = learned_levels(s.model, s.checkpoint, pairs, s.calib_x, s.normalize, r, args.ptq_cache)
        ev = s.evaluator(s.eval_x, s.eval_y, args.eval_batch_size, cache_activations=False, levels=fit.levels)
        rows.append({"setting": spec, "iterations": steps, "ptq_images": images,
                     **row("uniform_w3", "adaround", ev.evaluate(cfg), plain.float_outcome, time.time() - t)})
        print(f"ablation {spec}: uniform W3 {rows[-1]['test_acc']:.2f}% on {ev.n} search images "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    for r in rows:   # these are search-image figures: name them so
        r["search_acc"], r["search_drop"] = r.pop("test_acc"), r.pop("test_drop")
        r["search_acc_ci95"], r["search_drop_ci95"] = r.pop("test_acc_ci95"), r.pop("test_drop_ci95")
        r.pop("test_drop_se")
    return rows


def row(name, method, out, fp, seconds) -> dict:
    pd = paired_drop(fp.correct, out.correct)
    return {"config": name, "method": method, "test_acc": out.accuracy,
            "test_acc_ci95": wilson_interval(out.n_correct, out.n), "test_drop": pd.drop,
            "test_drop_ci95": bootstrap_drop_interval(pd), "test_drop_se": pd.se, "tie_rate": out.tie_rate,
            "images": out.n, "seconds": seconds}


def gains(outcome, before: dict) -> dict:
    """{method: {"gain", "se"}}: `outcome`'s accuracy minus each earlier method's, paired on the same search images."""
    out = {}
    for method, other in before.items():
        pd = paired_drop(other.correct, outcome.correct)
        out[method] = {"gain": -pd.drop, "se": pd.se}
    return out


def ptq_methods(args) -> dict:
    t0 = time.time()
    if args.ptq_images < 1 or args.ptq_iterations < 1:
        raise UserError("--ptq-images and --ptq-iterations must be >= 1.")
    recipe = Recipe()
    settings = AdaRoundSettings(iterations=args.ptq_iterations)
    s = load_setup(ModelOptions.from_args(args, strict=False), recipe, target="generic")
    configs = {n: recipe.uniform(s.space, *CONFIGS[n]) for n in args.configs}
    widths = {a for c in configs.values() for a in tensors_of(c).values()}
    ranges = {}
    for calib in args.act_calibs:   # the calibration does not depend on the weights' method: once each
        s.recipe = dataclasses.replace(recipe, act_calib=calib, act_calib_images=args.act_calib_images)
        ranges[calib] = (s.calibrate(widths), s.calibration)
    out = {"benchmark": "ptq_methods", "checkpoint": str(s.checkpoint), "set": s.split.report.name,
           "images": len(s.report_y), "quantization": recipe.to_json(), "results": []}
    if len(s.calib_x) < args.correction_images:
        raise UserError(f"--correction-images {args.correction_images}: only {len(s.calib_x)} calibration images.")
    plain = s.evaluator(s.report_x, s.report_y, args.eval_batch_size, cache_activations=False)
    fp = plain.float_outcome
    out["float_test_acc"] = fp.accuracy
    out["correction_images"] = args.correction_images
    print(f"float: {fp.accuracy:.2f}% on {fp.n} {s.split.report.name} images")
    if args.ablate:
        out["ablation"] = {"set": s.split.search.name, "images": len(s.eval_y), "rows": ablation(args, s, recipe)}
        atomic_write_json(args.out, out)
    searched = {}     # (config, correction) -> {label: its search outcome}, for the paired comparisons
    for calib, method in itertools.product(args.act_calibs, args.methods):
        s.ranges, out.setdefault("activation_calibration", {})[calib] = ranges[calib]
        label = method if calib == "mse" else f"{method}, {calib} ranges"
        for name, cfg in configs.items():
            levels, t = {}, time.time()
            if method != "nearest":
                pairs = [(n, b) for n, b in weights_of(cfg).items() if b != FLOAT_BITS]
                learned = Recipe(ptq=method, ptq_images=args.ptq_images, ptq_settings=settings)
                fitted = learned_levels(s.model, s.checkpoint, pairs, s.calib_x, s.normalize, learned, args.ptq_cache)
                levels, out[method] = fitted.levels, fitted.describe()
            fit_seconds = time.time() - t
            for corr in args.corrections:
                t = time.time()
                kw = dict(cache_activations=False, levels=levels,
                          correction=(corr, s.calib_x[:args.correction_images]))
                test = s.evaluator(s.report_x, s.report_y, args.eval_batch_size, **kw)
                r = {**row(name, method, test.evaluate(cfg), test.float_outcome, fit_seconds + time.time() - t),
                     "correction": corr, "act_calib": calib}
                search = s.evaluator(s.eval_x, s.eval_y, args.eval_batch_size, **kw)
                so = search.evaluate(cfg)
                r.update(search_acc=so.accuracy, search_images=so.n, fit_seconds=fit_seconds,
                         search_drop=paired_drop(search.float_outcome.correct, so.correct).drop,
                         search_gain_vs=gains(so, searched.setdefault((name, corr), {})))
                searched[name, corr][label] = so
                fit_seconds = 0.0
                out["results"].append(r)
                print(f"{name:<14}{method:<10}{corr:<5}{calib:<4}{r['test_acc']:7.2f}%  drop {r['test_drop']:5.2f} "
                      f"[{r['test_drop_ci95'][0]:.2f}, {r['test_drop_ci95'][1]:.2f}]  search drop "
                      f"{r['search_drop']:5.2f}  ties {100 * r['tie_rate']:.1f}%  {r['seconds']:.0f} s", flush=True)
                out["provenance"] = provenance(vars(args), s.device, {"checkpoint": s.checkpoint}, time.time() - t0)
                atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


def main(argv=None):
    run(ptq_methods, get_args_parser(), argv)


if __name__ == "__main__":
    main()
