"""Stage 2 as an importable function: quantize one layer at a time, measure the drop."""
from __future__ import annotations

import time

from tqdm import tqdm

from utils.ai_calculator import model_cost
from utils.evaluation import CachedEvaluator
from utils.stage import load_setup, resolve_bits, results_header, write_results

RESULTS_NAME = "02_per_layer.json"


def quant_settings(args) -> dict:
    return {"granularity": args.granularity, "clip": args.clip}


def per_layer_analysis(args) -> dict:
    t0 = time.time()
    resolve_bits(args)
    s = load_setup(args, per_channel=args.granularity == "channel", clip=args.clip)
    bits = list(dict.fromkeys(args.bits))  # keep order, drop repeats
    evaluator = CachedEvaluator(s.model, s.quantizer, s.eval_x, s.eval_y, s.normalize, args.eval_batch_size)
    base_acc = evaluator.base_accuracy
    fp32 = model_cost(s.table)
    print(f"float model: {s.eval_split} accuracy {base_acc:.2f}% on {evaluator.n} images, AI {fp32['ai']:.2f} FLOPs/byte")

    layers = []
    with tqdm(total=len(s.table) * len(bits), desc="layer x bits", dynamic_ncols=True) as bar:
        for info in s.table:
            results = []
            for b in bits:
                cfg = {info.name: b}
                acc = evaluator.accuracy(cfg)
                cost = model_cost(s.table, cfg)
                results.append({"bits": b, "val_acc": acc, "drop": base_acc - acc, "model_ai": cost["ai"],
                                "bytes_saved": fp32["bytes"] - cost["bytes"]})
                bar.set_postfix(layer=info.name, bits=b, drop=f"{base_acc - acc:.2f}")
                bar.update()
            layers.append({"name": info.name, "kind": info.kind, "params": info.weights, "macs": info.macs,
                           "results": results})
    s.quantizer.restore()
    out = {**results_header("2", s), "eval_images": evaluator.n,
           "baseline_val_acc": base_acc, "bits": bits, "quantization": quant_settings(args),
           "ai_convention": {"a_bits": 32, "batch_size": 1}, "fp32_ai": fp32["ai"], "fp32_bytes": fp32["bytes"],
           "layers": layers, "evaluations": evaluator.evaluations}
    path = write_results(out, args, s, {"checkpoint": s.checkpoint}, t0, RESULTS_NAME)
    print_sensitivity(out)
    print(f"\n{len(layers)} layers x {len(bits)} widths in {out['seconds']:.1f} s "
          f"({evaluator.evaluations} evaluations); wrote {path}")
    return out


def print_sensitivity(res: dict):
    """Layers sorted by their worst drop: the ones to keep wide come first."""
    bits = res["bits"]
    label = " (synthetic data)" if res["dataset"].get("synthetic") else ""
    print(f"\nper-layer sensitivity{label}: {res['eval_split']} accuracy drop in points "
          f"(float {res['baseline_val_acc']:.2f}%)")
    print(f"{'layer':<22}{'params':>8}" + "".join(f"{'w' + str(b):>8}" for b in bits))
    for layer in sorted(res["layers"], key=lambda l: -max(r["drop"] for r in l["results"])):
        drops = {r["bits"]: r["drop"] for r in layer["results"]}
        print(f"{layer['name']:<22}{layer['params']:>8}" + "".join(f"{drops[b]:>8.2f}" for b in bits))
