"""Export a configuration to ONNX with integer QDQ, and run it on ONNX Runtime.

    python -m utils.export --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt --w-bits 8 --a-bits 8 \\
        --target ort-cpu --data-dir ../shared/data/cifar10-jpeg.tar.gz --onnx w8a8.onnx
    python -m utils.export --checkpoint C --config results/03_search.json --onnx searched.onnx
    python -m utils.export --checkpoint checkpoints/qat_greedy.pt --onnx greedy_qat.onnx

The file is standard ONNX with integer QDQ, built node by node from the BN-folded model: its format, what
ONNX Runtime runs in integer and which widths are exported are described in utils/onnx_export.py; the
runtime check (agreement with the fake-quant PyTorch model on the report images, and what runs in integer)
in utils/ort_run.py. Only widths the runtime executes are exported (8-bit weights and tensors, float, and
int4 weights); any other is refused, or with ``--round-up-widths`` exported at the next exportable width.

Tensor ranges come from <results-dir>/02_per_layer.json when stage 2 recorded them for this checkpoint and
target at the widths needed, else they are calibrated here on training images (as stage 2 does). A
fine-tuned checkpoint (utils.qat) exports its own learned weights and scales.

(This replaces the private "ai-qs-int-v2" torch file of earlier versions, which only this code read.)
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models.structure import DEFAULT_TARGET, TARGETS
from quant.fold import fold_bn
from quant.quantizer import WEIGHT_RANGES
from quant.recipe import CORRECTIONS, DEFAULT_CORRECTION, DEFAULT_PTQ, PTQ_METHODS, Recipe
from quant.stats import top1_credit
from quant.widths import FLOAT_BITS, A, W, tensors_of, weights_of
from utils.errors import UserError, error_paragraph
from utils.machine import describe_cpu, runtime_machine
from utils.options import ExportOptions
from utils.train import Normalizer
from utils.onnx_export import (DEFAULT_SIGNED_DTYPE, INT4_NOTE, INTEGER_W_BITS, SIGNED_DTYPES, export_model,
                               exportable_config, placed_model, round_up_quantized_)
from utils.ort_run import (KEEP_FLOAT, MAX_ACC_DIFF, MIN_AGREEMENT, MIN_CHECK_IMAGES, check_agreement, config_summary,
                           describe_fusion, fusion_report, torch_logits)


# ---------------------------------------------------------------- the command line
def recorded_stage2(results_dir, checkpoint: Path):
    """(stage 2's results in `results_dir` when they were made from this checkpoint, else None; why they are not
    used, or None)."""
    from utils.io import PRODUCERS, RESULTS_FILES, load_results_json, sha256_file
    path = Path(results_dir) / RESULTS_FILES["2"]
    if not path.is_file():
        return None, None
    try:
        obj = load_results_json(path, "2", PRODUCERS["2"])
    except UserError as e:
        return None, f"{path} not used ({e})"
    recorded = obj.get("provenance", {}).get("inputs", {}).get("checkpoint", {}).get("sha256")
    if recorded != sha256_file(checkpoint):
        return None, f"{path} was made from another checkpoint: its tensor ranges are not used"
    return obj, None


def _stage3_answer(path, checkpoint: Path, force: bool):
    """Stage 3's answer when --config names a 03_search.json (its ``best`` search): (file-form configuration,
    target, recorded ranges, quantization, label); None for a plain configuration file."""
    import json
    from utils.config import searched_answer
    from utils.io import PRODUCERS, check_same_checkpoint, load_results_json
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None     # load_config says what is wrong with it
    if not (isinstance(obj, dict) and obj.get("stage") == "3"):
        return None
    obj = load_results_json(path, "3", PRODUCERS["3"], force=force)
    check_same_checkpoint(obj, path, checkpoint, PRODUCERS["3"], force)
    answer = searched_answer(obj)
    if answer is None:
        raise UserError(f"{path} holds no searched configuration (no 'best' answer). Re-run {PRODUCERS['3']}.")
    best, entry = answer
    return (entry["config"], obj.get("target", DEFAULT_TARGET),
            (obj.get("activation_calibration") or {}).get("tensors") or {}, obj.get("quantization") or {},
            f"{path} ({best})", obj.get("ptq_fit"))


def seeded_subset(n: int, k: int, seed: int) -> np.ndarray:
    """`k` of `n` indices, seeded and sorted (all of them when k >= n): test sets are stored class by class."""
    from utils.split import quick_subset
    idx = np.arange(n)
    return idx if k >= n else np.sort(quick_subset(idx, k, seed))


@dataclass
class Prepared:
    """A quantized model ready to export, and what the check needs."""
    qmodel: nn.Module
    float_model: nn.Module | None      # the BN-folded float model (None for a fine-tuned checkpoint)
    target: str
    config: dict                       # what is exported (after rounding up)
    asked: dict                        # what was asked for
    rounded: dict                      # {group: (from, to)}
    space: object
    normalization: dict
    source: str
    notes: list
    recipe: Recipe = Recipe()
    check_x: torch.Tensor | None = None
    check_y: torch.Tensor | None = None
    check_set: str = ""


def prepare(opts: ExportOptions) -> Prepared:
    """Resolve the checkpoint, configuration, target, tensor ranges and check images of an export (see main)."""
    from quant.cost import kernel_table
    from utils.checkpoint import read_checkpoint
    from utils.config import load_config
    from utils.data import load_dataset
    from utils.qat import load_qat
    from utils.stages.common import load_float, load_setup, resolve_checkpoint

    if opts.check_images < 0 or opts.threads < 1:
        raise UserError(f"--check-images must be >= 0 and --threads >= 1; got {opts.check_images}, {opts.threads}.")
    given = [f for f, v in (("--config", opts.config), ("--w-bits", opts.w_bits), ("--a-bits", opts.a_bits)) if v is not None]
    ckpt = resolve_checkpoint(opts)
    obj = read_checkpoint(ckpt)
    notes = []
    if isinstance(obj, dict) and "qat_format" in obj:     # a fine-tuned checkpoint carries everything
        if given:
            raise UserError(f"{ckpt} is a fine-tuned checkpoint: it carries its configuration and scales, so "
                            f"{' and '.join(given)} cannot change them. Drop {' and '.join(given)}, or export from "
                            f"the float checkpoint it was fine-tuned from.")
        qm, ck = load_qat(ckpt)          # refuses other versions of the format
        target, recipe = ck["target"], Recipe.from_json(ck["quantization"])
        if opts.weight_range is not None and opts.weight_range != recipe.weight_range:
            raise UserError(f"{ckpt} was fine-tuned with 8-bit weights in range {recipe.weight_range}; its learned "
                            f"weights cannot be exported in range {opts.weight_range}. Drop --weight-range, or "
                            f"fine-tune with stage 2's --weight-range {opts.weight_range}.")
        if opts.target is not None and opts.target != target:
            raise UserError(f"{ckpt} was fine-tuned under --target {target}; it cannot be exported as {opts.target}. "
                            f"Drop --target, or fine-tune under --target {opts.target}.")
        from models import build_from_args
        space = kernel_table(build_from_args(ck["model_args"]), target).space
        asked = {(g[0], g[1]): int(b) for g, b in ck["config"]}
        cfg, rounded = exportable_config(asked, opts.round_up_widths)
        if rounded:
            round_up_quantized_(qm, target, rounded, recipe.weight_range)
            notes.append("fine-tuned quantizers rounded up keep their learned clip range")
        p = Prepared(qm, None, target, cfg, asked, rounded, space, ck["normalization"], str(ckpt), notes, recipe)
        if opts.check_images:
            data = load_dataset(opts.dataset or "cifar10", opts.data_dir or Path("data"))
            idx = seeded_subset(len(data.test_y), opts.check_images, 0)
            p.check_x, p.check_y = torch.from_numpy(data.test_x[idx]), torch.from_numpy(data.test_y[idx])
            p.check_set = f"{len(idx)} test images of {data.name}"
        return p

    # a float checkpoint: quantize it here
    model, meta, _ = load_float(opts)
    s2, why = recorded_stage2(opts.results_dir, ckpt)
    if why:
        notes.append(why)
    if opts.config is not None and (opts.w_bits is not None or opts.a_bits is not None):
        raise UserError("give either --config FILE or --w-bits/--a-bits (a uniform configuration), not both.")
    s3 = _stage3_answer(opts.config, ckpt, opts.force) if opts.config is not None else None
    if s3 is not None and opts.target is not None and opts.target != s3[1]:
        raise UserError(f"{s3[4]} was searched under --target {s3[1]}; its configuration cannot be exported as "
                        f"--target {opts.target}. Drop --target, or search under --target {opts.target}.")
    target = opts.target or (s3[1] if s3 else None) or (s2 or {}).get("target") or DEFAULT_TARGET
    space = kernel_table(model, target).space
    if s3 is not None:
        asked = space.parse(s3[0], source=s3[4])
        notes.append(f"configuration: the answer of {s3[4]}")
    elif opts.config is not None:
        asked = load_config(opts.config, space)
    elif opts.w_bits is not None or opts.a_bits is not None:
        w = FLOAT_BITS if opts.w_bits is None else opts.w_bits
        a = FLOAT_BITS if opts.a_bits is None else opts.a_bits
        asked = space.uniform(w, a, None if opts.quantize_logits else FLOAT_BITS)
    else:
        raise UserError(f"{ckpt} is a float checkpoint: say what to export with --config FILE (a tensor-widths/1 "
                        f"configuration, e.g. one stage 3 found) or --w-bits N --a-bits N (every weight and tensor "
                        f"at one width, e.g. --w-bits 8 --a-bits 8), or pass a fine-tuned checkpoint.")
    cfg, rounded = exportable_config(asked, opts.round_up_widths)
    widths = sorted({a for a in tensors_of(cfg).values() if a != FLOAT_BITS}, reverse=True)
    ranges, recipe, measured_by = None, Recipe.for_target(target), None

    def covers(rec):
        return all(str(a) in (rec.get(n) or {}).get("scales", {}) for n, a in tensors_of(cfg).items() if a != FLOAT_BITS)
    if s3 is not None and covers(s3[2]):
        ranges, recipe, measured_by = s3[2], Recipe.from_json(s3[3]), "the search"
        notes.append(f"tensor ranges and weight quantization ({recipe.describe()}) as the search used them")
    elif s2 is not None and s2.get("target") == target:
        rec = (s2.get("activation_calibration") or {}).get("tensors") or {}
        if covers(rec):
            ranges, recipe, measured_by = rec, Recipe.from_json(s2.get("quantization")), "stage 2"
            notes.append(f"tensor ranges and weight quantization ({recipe.describe()}) as stage 2 recorded them in "
                         f"{Path(opts.results_dir) / '02_per_layer.json'}")
    fit_record = {"the search": (s3 or [None] * 6)[5], "stage 2": (s2 or {}).get("ptq_fit")}.get(measured_by)
    recipe = dataclasses.replace(with_weight_range(recipe, opts.weight_range, measured_by, notes),
                                 logits="quantized" if narrows_logits(cfg, space) else "float",
                                 ptq=opts.ptq or (recipe.ptq if measured_by else DEFAULT_PTQ["fused"]),
                                 correction=opts.stats_correction or (recipe.correction if measured_by
                                                                      else DEFAULT_CORRECTION["fused"]))
    pairs = [(n, b) for n, b in weights_of(cfg).items() if b != FLOAT_BITS]
    levels = {}
    if recipe.ptq != "nearest" and fit_record:
        from utils.ptq import cached_levels
        levels = cached_levels(ckpt, recipe, fit_record, Path(opts.checkpoint_dir) / "ptq-cache")
    learn = recipe.ptq != "nearest" and any(p_ not in levels for p_ in pairs)
    if recipe.ptq != "nearest":
        notes.append(f"weights rounded by {recipe.ptq}: " + (f"learned levels fitted here on {recipe.ptq_images} "
                     f"training images (cached under {Path(opts.checkpoint_dir) / 'ptq-cache'})" if learn else
                     f"the learned levels {measured_by} used, from the cache"))
    need_data = opts.check_images > 0 or (ranges is None and widths) or learn or recipe.correction != "none"
    p = Prepared(None, fold_bn(model), target, cfg, asked, rounded, space, meta["normalization"], str(ckpt), notes,
                 recipe)
    if need_data:
        recorded_calib = ((s2 or {}).get("dataset") or {}).get("calibration", {}).get("images")
        s = load_setup(opts, recipe, calib_images=opts.calib_images or recorded_calib, target=target)
        if learn:
            levels = s.learn_levels(pairs)
        if ranges is None and widths:
            ranges = s.calibrate(widths)
            notes.append(f"tensor ranges calibrated here on {len(s.calib_x)} training images at {widths} bits "
                         f"(no stage-2 record for this checkpoint, target and widths)")
        if opts.check_images:
            idx = seeded_subset(len(s.report_y), opts.check_images, s.seed)
            p.check_x, p.check_y = s.report_x[idx].cpu(), s.report_y[idx].cpu()
            p.check_set = f"{len(idx)} {s.split.report.name} images"
    p.qmodel = placed_model(model.cpu(), cfg, ranges or {}, target, recipe, levels)
    if recipe.correction != "none":
        correct_placed_(p.qmodel, model.cpu(), recipe, s.calib_x.cpu(), s.normalize)
        notes.append(f"{recipe.correction} statistics correction measured here on {recipe.correction_images} "
                     f"training images, as the search measured it (integer levels kept, scales and biases corrected)")
    return p


def correct_placed_(qmodel, model, recipe: Recipe, calib_u8, normalize):
    """Fold the statistics correction (quant/correct.py) of the export's placed model `qmodel` into it, measured on
    the first ``recipe.correction_images`` calibration images against the float `model`, as the evaluator
    measures it."""
    from quant.correct import apply_, corrections, output_stats
    x = normalize(calib_u8[:recipe.correction_images]).cpu()
    if len(x) < recipe.correction_images:
        raise UserError(f"the {recipe.correction} statistics correction needs {recipe.correction_images} calibration "
                        f"images; only {len(x)} are loaded. Raise --calib-images, or pass --stats-correction none.")
    layers = [c for c, _ in model.conv_bn_pairs()]
    stats = output_stats(fold_bn(model), layers, x)
    apply_(qmodel, corrections(qmodel, stats, x, recipe.correction))


def narrows_logits(config: dict, space) -> bool:
    return space.logits is not None and config.get((A, space.logits), FLOAT_BITS) != FLOAT_BITS


def with_weight_range(recipe: Recipe, weight_range: int | None, measured_by: str | None, notes: list) -> Recipe:
    """`recipe` with --weight-range where given; a note when that is not the range `measured_by` simulated."""
    if weight_range is None or weight_range == recipe.weight_range:
        return recipe
    if measured_by:
        notes.append(f"--weight-range {weight_range} differs from the range {recipe.weight_range} that {measured_by} "
                     f"measured: the file computes a model the search did not evaluate (the check below compares "
                     f"it with its own simulation)")
    return dataclasses.replace(recipe, weight_range=weight_range)


def get_args_parser():
    from utils.cli import add_common_args
    from utils.stages.common import add_model_args
    p = argparse.ArgumentParser(
        description="Write a configuration as standard ONNX with integer QDQ (int8 weights per channel, 8-bit "
                    "tensors), check it on ONNX Runtime's CPU build against the fake-quant PyTorch model, and say "
                    "what the runtime runs in integer.")
    add_common_args(p)
    add_model_args(p)
    for a in p._actions:
        if a.dest == "checkpoint":
            a.help = ("a float checkpoint (with --config or --w-bits/--a-bits), or a fine-tuning checkpoint "
                      "<checkpoint-dir>/qat_<name>.pt, which carries its configuration (default: the one recorded "
                      "in <results-dir>/01_baseline.json)")
    g = p.add_argument_group("export")
    g.add_argument("--onnx", required=True, type=Path, help="the ONNX file to write")
    g.add_argument("--config", default=None,
                   help="a tensor-widths/1 configuration file, or stage 3's results (<results-dir>/03_search.json: its "
                        "best answer, with the target, tensor ranges and weight quantization the search used)")
    g.add_argument("--w-bits", default=None, type=int, help="every weight layer at this width (default: float)")
    g.add_argument("--a-bits", default=None, type=int, help="every tensor, the image included, at this width; the "
                                                            "logits too with --quantize-logits (default: float)")
    g.add_argument("--quantize-logits", action="store_true",
                   help="with --a-bits: the logits at that width too (default: float logits)")
    g.add_argument("--target", default=None, choices=TARGETS,
                   help="the kernels simulated and exported: generic (the add fused into the conv before it) or "
                        "ort-cpu (ONNX Runtime's CPU kernels: the conv output quantized, the add its own integer "
                        "kernel) (default: a fine-tuned checkpoint's; else the one stage 2 recorded in --results-dir; "
                        "else generic)")
    g.add_argument("--signed-dtype", default=DEFAULT_SIGNED_DTYPE, choices=SIGNED_DTYPES,
                   help="storage of signed tensors (grid -128..127): uint8 with zero point 128 (the same levels), which "
                        "ONNX Runtime's x86 CPU kernels run in integer wherever they are; or int8 with zero point 0 "
                        "(TensorRT, ARM), which ONNX Runtime on x86 rewrites to uint8 only in some places (default: uint8)")
    g.add_argument("--weight-range", default=None, type=int, choices=WEIGHT_RANGES,
                   help="levels of the int8 weights: 7 (-63..63), which ONNX Runtime's x86 kernels compute exactly on "
                        "every CPU, or 8 (-127..127), which they saturate on CPUs without VNNI (default: what stage 2 "
                        "or 3 recorded; else 7 under --target ort-cpu and 8 under generic)")
    g.add_argument("--ptq", default=None, choices=PTQ_METHODS,
                   help="weight rounding: nearest, adaround or block (learned levels, from the cache stage 2 filled, "
                        f"else fitted here on training images) (default: what stage 2 or 3 recorded; else "
                        f"{DEFAULT_PTQ['fused']})")
    g.add_argument("--stats-correction", default=None, choices=CORRECTIONS,
                   help="statistics correction (quant/correct.py), measured here on the calibration images (default: "
                        f"what stage 2 or 3 recorded; else {DEFAULT_CORRECTION['fused']})")
    g.add_argument("--round-up-widths", action="store_true",
                   help="export widths the runtime cannot run at the next exportable width (weights 2-3 -> 4, 5-7 -> 8; "
                        "tensors -> 8) instead of refusing them; the accuracy reported is the exported one's")
    g.add_argument("--check-images", default=MIN_CHECK_IMAGES, type=int,
                   help=f"report (test) images ONNX Runtime and the fake-quant PyTorch model both classify (a seeded "
                        f"subset; for a fine-tuned checkpoint, of the test set of --dataset/--data-dir): top-1 "
                        f"agreement >= {MIN_AGREEMENT}%% and accuracy difference <= {MAX_ACC_DIFF} points pass; 0 = "
                        f"no check and no data needed when ranges are recorded (default: {MIN_CHECK_IMAGES})")
    g.add_argument("--threads", default=2, type=int, help="ONNX Runtime intra-op threads for the check (default: 2)")
    g.add_argument("--calib-images", default=None, type=int,
                   help="training images that calibrate tensor ranges when stage 2 recorded none (default: 1000)")
    return p


def export(opts: ExportOptions) -> dict:
    """Prepare, export, look at what ONNX Runtime fuses, check agreement, write. Returns the report."""
    t0 = time.time()
    p = prepare(opts)
    proto = export_model(p.qmodel, p.target, opts.signed_dtype,
                         meta={"config": p.space.to_file(p.config), "normalization": p.normalization, "source": p.source,
                               "quantization": p.recipe.to_json()})
    fusion = fusion_report(proto, opts.threads)
    behind = [v for p_ in proto.metadata_props if p_.key == "float_layers_reading_quantized_tensors"
              for v in p_.value.split(",") if v]
    if behind:
        p.notes.append(f"{len(behind)} float layer(s) read a quantized tensor ({', '.join(behind[:3])}"
                       f"{', ...' if len(behind) > 3 else ''}): ONNX Runtime's default optimizer "
                       f"{KEEP_FLOAT[0]} would quantize their weights to per-tensor int8 by itself; run the file "
                       f"with InferenceSession(..., disabled_optimizers={list(KEEP_FLOAT)}) to keep them float, as "
                       f"this check and benchmarks/deploy_speed.py do")
    rep = {"onnx": str(opts.onnx), "target": p.target, "signed_dtype": opts.signed_dtype, "source": p.source,
           "quantization": p.recipe.to_json(), "machine": runtime_machine(), "config": config_summary(p.config), "rounded_up": {f"{k}:{n}": v for (k, n), v in p.rounded.items()},
           "int4_weights": any(b == 4 for (k, _), b in p.config.items() if k == W), "fusion": fusion,
           "int8_weight_layers": sum(b == INTEGER_W_BITS for (k, _), b in p.config.items() if k == W),
           "notes": p.notes, "check": None}
    if p.check_x is not None:
        normalize = Normalizer(p.normalization["mean"], p.normalization["std"], "cpu")
        rep["check"] = check_agreement(proto, p.qmodel, p.check_x, p.check_y, normalize, opts.threads,
                                       opts.eval_batch_size)
        rep["check"]["set"] = p.check_set
        if p.float_model is not None:
            fl = torch.from_numpy(torch_logits(p.float_model, p.check_x, normalize, opts.eval_batch_size))
            rep["check"]["float_acc"] = 100.0 * float(top1_credit(fl, p.check_y.cpu()).mean())
    from utils.io import atomic_write_bytes
    atomic_write_bytes(opts.onnx, proto.SerializeToString())
    rep["bytes"] = Path(opts.onnx).stat().st_size
    rep["seconds"] = time.time() - t0
    print_report(rep)
    return rep


def saturation_risk(rep: dict) -> bool:
    """8-bit integer weights on the full range, run by a CPU that is not known to have VNNI."""
    return (rep["int8_weight_layers"] > 0 and rep["quantization"]["weight_range"] == 8 and rep["fusion"]["integer_convs"] > 0
            and rep["machine"]["cpu"]["vnni"] is not True)


def failure_hint(rep: dict) -> str:
    """One paragraph on why the agreement check failed, and what to do."""
    cpu = describe_cpu(rep["machine"]["cpu"])
    if saturation_risk(rep):
        return (f"likely cause: this CPU, {cpu}, multiplies uint8 tensors by int8 weights in ONNX Runtime's "
                f"AVX2 kernel, which adds two products in 16 bits (vpmaddubsw) and saturates when they exceed "
                f"32,767 (2 x 255 x 127 = 64,770). The file uses 8-bit weights on the full range -127..127. "
                f"Remedy: export with --weight-range 7 (-63..63, exact on every x86 CPU; the default under "
                f"--target ort-cpu), and run stage 2 with the same --weight-range so that the search measures "
                f"what runs.")
    return (f"the file and the fake-quant model disagree beyond rounding on {cpu} (weight range "
            f"{rep['quantization']['weight_range']}, ONNX Runtime {rep['machine']['onnxruntime']}). Check that "
            f"the file runs with disabled_optimizers={list(KEEP_FLOAT)} as here, re-run with more --check-images, "
            f"and report the configuration if it persists.")


def print_report(rep: dict):
    print(f"wrote {rep['onnx']} ({rep['bytes'] / 1e3:.0f} kB; target {rep['target']}, signed tensors as "
          f"{rep['signed_dtype']}, 8-bit weights in range {rep['quantization']['weight_range']}): {rep['config']}")
    print(f"machine: {describe_cpu(rep['machine']['cpu'])}; onnxruntime {rep['machine']['onnxruntime']}")
    for n in rep["notes"]:
        print(f"note: {n}")
    if rep["rounded_up"]:
        moves = collections.Counter(f"{k.split(':')[0]}{a}->{b}" for k, (a, b) in rep["rounded_up"].items())
        print(f"rounded up {len(rep['rounded_up'])} group(s) ({', '.join(f'{m}: {c}' for m, c in sorted(moves.items()))}); "
              f"the accuracy below is that of the exported widths")
    if rep["int4_weights"]:
        print(f"note: {INT4_NOTE}")
    print(describe_fusion(rep["fusion"]))
    c = rep["check"]
    if c:
        print(f"check on {c['set']}: ONNX Runtime {c['ort_acc']:.2f}%, fake-quant PyTorch {c['torch_acc']:.2f}%"
              + (f", float {c['float_acc']:.2f}%" if "float_acc" in c else "")
              + f"; top-1 agreement {c['agreement']:.2f}%, accuracy difference {c['acc_diff']:+.2f} points: "
              f"{'PASS' if c['passed'] else 'FAIL'} (>= {MIN_AGREEMENT}% and <= {MAX_ACC_DIFF} points"
              + ("" if c["enough_images"] else f"; fewer than {MIN_CHECK_IMAGES} images") + ")")
        if not c["passed"]:
            print(error_paragraph(failure_hint(rep)).replace("error: ", "", 1))
    elif saturation_risk(rep):
        print(f"note: {failure_hint(rep)}")


def main(argv=None) -> int:
    """Exit codes: 0 written (and the check passed), 1 written but the check failed, 2 bad input, 130 Ctrl-C."""
    args = get_args_parser().parse_args(argv)
    try:
        rep = export(ExportOptions.from_args(args))
    except UserError as e:
        print(error_paragraph(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): no file was written.", file=sys.stderr)
        return 130
    return 1 if rep["check"] and not rep["check"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
