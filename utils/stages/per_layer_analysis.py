"""Stage 2 as an importable function: quantize one layer at a time, measure what it costs.

Under torchrun the candidates are dealt out to the processes (each with its own copy of the search
images) and gathered on rank 0, which writes the same table a single process writes.

Each candidate changes one layer: its weights to w bits (activations float), or, with --a-bits,
its input activations to a bits (weights float). Measured against the float model on the search
images: accuracy, the paired drop and its standard error, and two signals that do not move in
whole images: the mean increase of cross-entropy and the mean KL divergence from the float
model's outputs.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from utils import distributed as dist
from utils.config import FLOAT_BITS
from utils.evaluation import CachedEvaluator
from utils.io import RESULTS_FILES
from utils.stages.common import act_ladder, load_setup, results_header, weight_ladder, write_results
from utils.stats import paired_drop


def candidates(layer_names, w_ladder, a_ladder) -> list[tuple[str, str, int]]:
    """(layer, "w" or "a", bits) for every single-layer change, in network order."""
    return ([(n, "w", b) for n in layer_names for b in w_ladder]
            + [(n, "a", b) for n in layer_names for b in a_ladder])


def measure(evaluator, setup, cands, progress=True) -> list[dict]:
    """One row per candidate (see module docstring); the rows depend on nothing but the candidate."""
    base = evaluator.float_outcome
    rows = []
    for name, kind, b in tqdm(cands, desc="layer x width", dynamic_ncols=True, disable=not progress):
        cfg = {name: (b, FLOAT_BITS) if kind == "w" else (FLOAT_BITS, b)}
        out = evaluator.evaluate(cfg)
        pd = paired_drop(base.correct, out.correct)
        rows.append({"layer": name, "kind": kind, "bits": b, "val_acc": out.accuracy, "drop": pd.drop,
                     "drop_se": pd.se, "kl": out.kl, "loss_increase": out.loss - base.loss,
                     "model_ai": setup.cost_model.ai(setup.table, cfg)})
    return rows


def assemble(setup, rows, w_ladder, a_ladder) -> list[dict]:
    """layers[]: weight results under "results" (bits), activation results under "act_results" (a_bits)."""
    by = {(r["layer"], r["kind"], r["bits"]): r for r in rows}
    segment = {n: seg.name for seg in setup.model.segments() for n in seg.layers}
    layers = []
    for info in setup.table:
        def entry(kind, b, key):
            r = by[info.name, kind, b]
            return {key: b, **{k: r[k] for k in ("val_acc", "drop", "drop_se", "kl", "loss_increase", "model_ai")}}
        layer = {"name": info.name, "kind": info.kind, "segment": segment[info.name], "params": info.weights,
                 "macs": info.macs, "results": [entry("w", b, "bits") for b in w_ladder]}
        if a_ladder:
            layer["act_results"] = [entry("a", b, "a_bits") for b in a_ladder]
        layers.append(layer)
    return layers


def per_layer_analysis(args) -> dict:
    t0 = time.time()
    w_ladder, a_ladder = weight_ladder(args), act_ladder(args)
    s = load_setup(args, per_channel=args.granularity == "channel", clip=args.clip, calib_images=args.calib_images)
    act = s.calibrate(a_ladder)
    evaluator = CachedEvaluator(s.model, s.quantizer, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size,
                                act_quant=act, cache_bytes=int(args.cache_gb * 2 ** 30))
    base = evaluator.float_outcome
    fp32 = s.cost_model.cost(s.table)
    print(f"float model: {s.eval_split} accuracy {base.accuracy:.2f}% on {evaluator.n} images, "
          f"AI {fp32['ai']:.2f} FLOPs/byte")
    cands = candidates(s.layer_names, w_ladder, a_ladder)
    mine = measure(evaluator, s, cands[dist.rank()::dist.world_size()], progress=dist.is_main())
    s.quantizer.restore()
    parts = dist.gather((mine, evaluator.evaluations))
    if not dist.is_main():
        return None
    rows = [r for part, _ in parts for r in part]
    out = {**results_header("2", s), "eval_images": evaluator.n, "baseline_val_acc": base.accuracy,
           "baseline_loss": base.loss, "bits": w_ladder, "a_bits": a_ladder,
           "quantization": {"granularity": args.granularity, "clip": args.clip},
           "activation_calibration": s.act_calibration, "fp32_ai": fp32["ai"], "fp32_bytes": fp32["bytes"],
           "layers": assemble(s, rows, w_ladder, a_ladder), "evaluations": sum(n for _, n in parts)}
    path = write_results(out, args, s, {"checkpoint": s.checkpoint}, t0, RESULTS_FILES["2"])
    print_sensitivity(out)
    print(f"\n{len(out['layers'])} layers x {len(w_ladder) + len(a_ladder)} widths in {out['seconds']:.1f} s "
          f"({out['evaluations']} evaluations on {dist.world_size()} process(es)); wrote {path}")
    return out


def print_sensitivity(res: dict):
    """Layers sorted by their worst drop: the ones to keep wide come first."""
    label = " (synthetic data)" if res["dataset"].get("synthetic") else ""
    cols = [("results", "bits", "w")] + ([("act_results", "a_bits", "a")] if res.get("a_bits") else [])
    print(f"\nper-layer sensitivity{label}: {res['eval_split']} accuracy drop in points "
          f"(float {res['baseline_val_acc']:.2f}% on {res['eval_images']} images); KL to float in the last column")
    width = max(22, max(len(l["name"]) for l in res["layers"]) + 2)
    head = "".join(f"{p + str(b):>8}" for key, bk, p in cols for b in res["bits" if p == "w" else "a_bits"])
    print(f"{'layer':<{width}}{'params':>9}{head}{'max KL':>10}")

    def rows_of(layer):
        return [r for key, _, _ in cols for r in layer.get(key, [])]
    for layer in sorted(res["layers"], key=lambda l: -max(r["drop"] for r in rows_of(l))):
        rows = rows_of(layer)
        print(f"{layer['name']:<{width}}{layer['params']:>9}" + "".join(f"{r['drop']:>8.2f}" for r in rows)
              + f"{max(r['kl'] for r in rows):>10.4f}")
