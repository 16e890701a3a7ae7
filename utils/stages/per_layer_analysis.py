"""Stage 2 as an importable function: quantize one group at a time, measure what it costs.

A group is a weight layer (its weights at w bits, everything else float) or, with --a-bits, a
tensor (quantized at a bits where it is written, so every reader reads it at that width; weights
and other tensors float). Measured against the float model on the search images: accuracy, the
paired drop and its standard error, and two signals that do not move in whole images: the mean
increase of cross-entropy and the mean KL divergence from the float model's outputs. With
``--signal fisher`` nothing is evaluated per candidate: each row holds the Fisher estimate of that KL
(quant/fisher.py) from one forward and one backward pass over the search images; ``both`` has both.

Under torchrun the candidates are dealt out to the processes (each with its own copy of the search
images) and gathered on rank 0, which writes the same table a single process writes.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from quant.cost import CostModel
from quant.fisher import fisher_kl
from quant.recipe import Recipe
from quant.stats import paired_drop
from quant.widths import A, W
from utils import distributed as dist
from utils.io import RESULTS_FILES
from utils.options import SensitivityOptions
from utils.errors import UserError
from utils.stages.common import (SIGNALS, act_ladder, load_setup, results_header, segment_names, stage2_recipe, weight_ladder,
                                 write_results)

MEASURED = ("val_acc", "drop", "drop_se", "kl", "loss_increase")   # --signal measured
COLUMNS = (*MEASURED, "fisher", "model_ai")                       # a table holds those it computed


def candidates(space, w_ladder, a_ladder, recipe: Recipe = Recipe()) -> list[tuple[tuple[str, str], int]]:
    """(group, bits) for every single-group change, weight layers first, in kernel order; float logits are
    not narrowed (their entry lists no results)."""
    return ([((W, n), b) for n in space.layers for b in w_ladder]
            + [((A, t), b) for t in space.tensors for b in a_ladder if recipe.narrows(space, (A, t))])


def measure(evaluator, setup, cands, progress=True, signal: str = "measured", fisher_samples: int = 1) -> list[dict]:
    """One row per candidate (see module docstring); the rows depend on nothing but the candidate (and, for the
    Fisher estimate, the seed its labels are drawn with)."""
    base = evaluator.float_outcome
    rows = []
    for group, b in cands:
        cfg = setup.space.full({group: b})
        rows.append({"kind": group[0], "name": group[1], "bits": b, "model_ai": setup.cost_model.ai(setup.table, cfg)})
    if signal in ("fisher", "both"):
        with tqdm(total=-(-evaluator.n // evaluator.batch_size), desc="fisher batches", dynamic_ncols=True,
                  disable=not progress) as bar:
            est = fisher_kl(evaluator, cands, fisher_samples, setup.seed, progress=lambda _: bar.update())
        for r, c in zip(rows, cands):
            r["fisher"] = est[c]
    if signal in ("measured", "both"):
        for r, (group, b) in zip(rows, tqdm(cands, desc="group x width", dynamic_ncols=True, disable=not progress)):
            out = evaluator.evaluate(setup.space.full({group: b}))
            pd = paired_drop(base.correct, out.correct)
            r.update(val_acc=out.accuracy, drop=pd.drop, drop_se=pd.se, kl=out.kl, loss_increase=out.loss - base.loss)
    return rows


def assemble(setup, rows, w_ladder, a_ladder) -> tuple[list[dict], list[dict]]:
    """layers[] (weight results under "results", by "bits") and tensors[] (under "results", by "a_bits")."""
    by = {(r["kind"], r["name"], r["bits"]): r for r in rows}
    segment = segment_names(setup)
    info = {li.name: li for li in setup.table.layers}

    def entry(kind, name, b, key):
        r = by[kind, name, b]
        return {key: b, **{k: r[k] for k in COLUMNS if k in r}}
    layers = [{"name": n, "kind": info[n].kind, "segment": segment[n], "params": info[n].weights,
               "macs": info[n].macs, "results": [entry(W, n, b, "bits") for b in w_ladder]}
              for n in setup.space.layers]
    tensors = [{"name": t, "segment": segment[t], "elements": setup.table.elements[t],
                "traffic": setup.table.traffic(t), "signed": setup.table.signed[t],
                "results": [entry(A, t, b, "a_bits") for b in a_ladder if (A, t, b) in by],
                **({"logits": True} if t == setup.space.logits else {})}
               for t in setup.space.tensors] if a_ladder else []
    return layers, tensors


def per_layer_analysis(opts: SensitivityOptions) -> dict:
    t0 = time.time()
    w_ladder, a_ladder = weight_ladder(opts), act_ladder(opts)
    cm = CostModel.named(opts.cost_model or "fused")
    cm.check_tensor_widths(a_ladder, f"--a-bits {' '.join(map(str, a_ladder))}",
                           "Drop --a-bits for the weight-only reproduction, or use --cost-model fused.")
    recipe = stage2_recipe(opts, cm.name)
    s = load_setup(opts, recipe, calib_images=opts.calib_images,
                   cost_model=cm, target=opts.target)
    s.calibrate(a_ladder)
    s.learn_levels([(n, b) for n in s.space.layers for b in w_ladder])
    evaluator = s.evaluator(s.eval_x, s.eval_y, opts.eval_batch_size, cache_bytes=int(opts.cache_gb * 2 ** 30))
    base = evaluator.float_outcome
    fp32 = cm.cost(s.table, s.space.uniform(32, 32))
    print(f"float model: {s.eval_split} accuracy {base.accuracy:.2f}% on {evaluator.n} images; modelled AI "
          f"{fp32['ai']:.2f} FLOPs/byte ({cm.name} cost model, {s.target} kernels)")
    if opts.signal not in SIGNALS:
        raise UserError(f"--signal {opts.signal!r}: use one of {', '.join(SIGNALS)}.")
    if opts.fisher_samples < 1:
        raise UserError(f"--fisher-samples must be >= 1, got {opts.fisher_samples}.")
    cands = candidates(s.space, w_ladder, a_ladder, recipe)
    mine = measure(evaluator, s, cands[dist.rank()::dist.world_size()], progress=dist.is_main(), signal=opts.signal,
                   fisher_samples=opts.fisher_samples)
    parts = dist.gather((mine, evaluator.evaluations))
    if not dist.is_main():
        return None
    rows = [r for part, _ in parts for r in part]
    layers, tensors = assemble(s, rows, w_ladder, a_ladder)
    out = {**results_header("2", s), "eval_images": evaluator.n, "baseline_val_acc": base.accuracy,
           "baseline_loss": base.loss, "bits": w_ladder, "a_bits": a_ladder,
           "quantization": recipe.to_json(), "signal": signal_json(opts, recipe.correction),
           "activation_calibration": s.calibration, "ptq_fit": s.ptq_fit,
           "fp32_ai": fp32["ai"], "fp32_bytes": fp32["bytes"],
           "layers": layers, "tensors": tensors, "evaluations": sum(n for _, n in parts)}
    path = write_results(out, opts, s, {"checkpoint": s.checkpoint}, t0, RESULTS_FILES["2"])
    print_sensitivity(out)
    print(f"\n{len(layers)} weight layers x {len(w_ladder)} widths + {len(tensors)} tensors x {len(a_ladder)} widths "
          f"in {out['seconds']:.1f} s ({out['evaluations']} evaluations on {dist.world_size()} process(es)); "
          f"wrote {path}")
    return out


def signal_json(opts: SensitivityOptions, correction: str = "none") -> dict:
    """What the table's columns are: measured, estimated, or both (and what the estimate models of the statistics
    `correction` the measurement applies)."""
    columns = {"measured": MEASURED, "fisher": ("fisher",), "both": (*MEASURED, "fisher")}[opts.signal]
    out = {"name": opts.signal, "columns": list(columns)}
    if opts.signal != "measured":
        out["fisher"] = {"samples": opts.fisher_samples, "units": "nats per image, like kl",
                         "rule": "1/2 E_x E_{y ~ p_float} [(grad log p(y|x) . delta(x))^2], delta the group's "
                                 "quantization error (quant/fisher.py)",
                         "correction": "none" if correction == "none" else
                                       f"{correction}: a corrected weight layer's delta is the change of its corrected "
                                       f"output (the map fitted for that candidate alone); tensors' deltas uncorrected"}
    return out


def print_sensitivity(res: dict):
    """Weight layers, then tensors, sorted by their worst drop (or, in a Fisher-only table, their largest
    estimated KL): the ones to keep wide come first."""
    label = " (synthetic data)" if res["dataset"].get("synthetic") else ""
    measured = (res.get("signal") or {}).get("name", "measured") != "fisher"
    key, fmt, what = ("drop", ".2f", "accuracy drop in points") if measured else \
        ("fisher", ".4f", "Fisher estimate of the KL to float, nats per image,")
    print(f"\nsensitivity{label}: {res['eval_split']} {what} with one group changed "
          f"(float {res['baseline_val_acc']:.2f}% on {res['eval_images']} images)"
          + ("; KL to float in the last column" if measured else ""))
    for title, wkey, prefix, entries in (("weight layer", "bits", "w", res["layers"]),
                                         ("tensor", "a_bits", "a", res.get("tensors") or [])):
        if not entries or not res[wkey]:
            continue
        width = max(22, max(len(e["name"]) for e in entries) + 2)
        head = "".join(f"{prefix + str(b):>8}" for b in res[wkey])
        print(f"{title:<{width}}{head}" + (f"{'max KL':>10}" if measured else ""))
        for e in sorted((e for e in entries if e["results"]), key=lambda e: -max(r[key] for r in e["results"])):
            print(f"{e['name']:<{width}}" + "".join(f"{r[key]:>8{fmt}}" for r in e["results"])
                  + (f"{max(r['kl'] for r in e['results']):>10.4f}" if measured else ""))
        for e in entries:
            if not e["results"]:
                print(f"{e['name']:<{width}}kept float (the logits; --quantize-logits measures them)")
