"""Measured speed on a real integer runtime: ONNX Runtime's CPU build, in one run, same thread count.

    python benchmarks/deploy_speed.py --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --results-dir results/ort --out results/ort/deploy_speed.json

Times, each at batch 1 (latency, ms) and batch 64 (throughput, images/s):

* ``fp32``: the BN-folded float model as ONNX;
* ``uniform_w8a8``: every weight and tensor at 8 bits (the logits float unless stage 2 quantized them), exported by utils.export under ``--target ort-cpu``
  (ONNX Runtime's own kernels: every conv writes a quantized tensor, the add is QLinearAdd);
* ``searched``: the configuration of <results-dir>/03_search.json (its ``best`` answer), when it was
  searched under ``--target ort-cpu`` from this checkpoint;
* ``ort_quantize_static``: the rival a user would pick instead: ONNX Runtime's own static quantizer on the
  same fp32 file (QDQ, per-channel int8 weights, uint8 activations, MinMax ranges of 512 training images).

Our tensor ranges are stage 2's (recorded in <results-dir>/02_per_layer.json for this checkpoint under
``--target ort-cpu``), else calibrated here as stage 2 does, on 1,000 training images; ONNX Runtime's
quantizer calibrates on the first 512 of them.

Each is timed in ``--rounds`` rounds, the models interleaved within a round so that load on a shared
machine hits them alike; a round's figure is the median of its runs, the result the median of the rounds.
Test accuracy is ONNX Runtime's on the report (test) images, with each model's paired drop against fp32
and, for the goal (uniform W8A8 >= 2x fp32 throughput at an accuracy >= ONNX Runtime's quantizer), the
paired accuracy difference to the rival with its 95% bootstrap interval. For our exports, the fake-quant
PyTorch model classifies the same images (top-1 agreement), and ONNX Runtime's optimized graph says how
many convolutions and adds run as integer kernels. The machine's load average before and after is
recorded: on a shared CPU the absolute numbers move, the ratios less.
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from quant.cost import CostModel  # noqa: E402
from quant.fold import fold_bn  # noqa: E402
import torch  # noqa: E402

from quant.stats import bootstrap_drop_interval, paired_drop, top1_credit  # noqa: E402
from quant.widths import FLOAT_BITS, W  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.config import searched_answer  # noqa: E402
from utils.export import recorded_stage2, seeded_subset, with_weight_range  # noqa: E402
from utils.onnx_export import INT4_NOTE, exportable_config, export_model, placed_model, to_onnx  # noqa: E402
from utils.ort_run import (check_agreement, config_summary, fusion_report, normalized_numpy, ort_logits,  # noqa: E402
                           ort_session, runtime_name)
from utils.machine import describe_cpu, runtime_machine  # noqa: E402
from quant.quantizer import WEIGHT_RANGES  # noqa: E402
from quant.recipe import Recipe  # noqa: E402
from utils.io import (PRODUCERS, RESULTS_FILES, atomic_write_json, check_same_checkpoint,  # noqa: E402
                      load_results_json, provenance)
from utils.options import ModelOptions  # noqa: E402
from utils.stages.common import CALIB_IMAGES, QUICK_CALIB_IMAGES, benchmark_parser, load_setup  # noqa: E402
from utils.train import Normalizer  # noqa: E402

TARGET = "ort-cpu"
ORT_CALIB_IMAGES = 512
GOAL_SPEEDUP = 2.0


def get_args_parser():
    p, g = benchmark_parser(__doc__)
    g.add_argument("--threads", default=2, type=int, help="ONNX Runtime intra-op threads, for every model (default: 2)")
    g.add_argument("--batch", default=64, type=int, help="the throughput batch (default: 64)")
    g.add_argument("--rounds", default=5, type=int, help="rounds over all models (default: 5)")
    g.add_argument("--latency-runs", default=100, type=int, help="batch-1 runs per model and round (default: 100)")
    g.add_argument("--throughput-runs", default=10, type=int,
                   help="batch runs per model and round (default: 10)")
    g.add_argument("--test-images", default=None, type=int,
                   help="report (test) images for the accuracies, a seeded subset (default: all of them)")
    g.add_argument("--calib-images", default=None, type=int,
                   help=f"training images our tensor ranges are calibrated on when stage 2 recorded no 8-bit ranges "
                        f"for this checkpoint under --target {TARGET} (default: stage 2's, {CALIB_IMAGES}; with --quick "
                        f"{QUICK_CALIB_IMAGES})")
    g.add_argument("--ort-calib-images", default=ORT_CALIB_IMAGES, type=int,
                   help=f"training images ONNX Runtime's quantize_static calibrates on (default: {ORT_CALIB_IMAGES}), "
                        f"the first of ours")
    g.add_argument("--weight-range", default=None, type=int, choices=WEIGHT_RANGES,
                   help="levels of our int8 weights (utils.export --weight-range; default: stage 2's, else 7)")
    g.add_argument("--ort-reduce-range", default="auto", choices=("auto", "on", "off"),
                   help="the rival's reduce_range (7-bit weights): auto = on where this CPU has no VNNI, as ONNX "
                        "Runtime's documentation advises (default: auto)")
    g.add_argument("--keep-onnx", default=None, type=Path, help="also write the ONNX files into this folder")
    return p


def timings(sess, x: np.ndarray, runs: int) -> float:
    """The median seconds of `runs` runs."""
    name = sess.get_inputs()[0].name
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {name: x})
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def ort_quantize_static(fp32_path: Path, out_path: Path, calib: np.ndarray, batch: int = 64,
                        reduce_range: bool = False):
    """ONNX Runtime's own static quantizer: QDQ, per-channel int8 weights, uint8 activations, MinMax; with
    `reduce_range`, 7-bit weights, what its documentation advises on x86 CPUs without VNNI."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([calib[i:i + batch] for i in range(0, len(calib), batch)])

        def get_next(self):
            b = next(self.batches, None)
            return None if b is None else {"input": b}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)     # its "consider pre-processing" advice: the fp32 file is already BN-folded
    try:
        quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)
    finally:
        root.setLevel(level)


def searched_entry(args, s, ranges, quant):
    """(configuration, its ranges, quantization, description) of 03_search.json's answer, or (None, why)."""
    path = Path(args.results_dir) / RESULTS_FILES["3"]
    if not path.is_file():
        return None, f"no {path}: no searched configuration timed"
    obj = load_results_json(path, "3", PRODUCERS["3"], force=args.force)
    check_same_checkpoint(obj, path, s.checkpoint, PRODUCERS["3"], args.force)
    if obj.get("target") != TARGET:
        return None, (f"{path} was searched under --target {obj.get('target')}, not {TARGET}: its configuration "
                      f"is not what ONNX Runtime's kernels run, so it is not timed (search with --target {TARGET})")
    answer = searched_answer(obj)
    if answer is None:
        return None, f"{path} holds no answer"
    best, entry = answer
    cfg = s.space.parse(entry["config"], source=str(path))
    rec = (obj.get("activation_calibration") or {}).get("tensors") or ranges
    q = Recipe.from_json(obj.get("quantization")) if obj.get("quantization") else quant
    return (cfg, rec, q, {"source": f"{path} ({best})", "search_ai": entry.get("ai"),
                          "search_val_acc": entry.get("val_acc")}), None


def deploy_speed(args) -> dict:
    t0 = time.time()
    ours_calib = args.calib_images or (QUICK_CALIB_IMAGES if args.quick else CALIB_IMAGES)
    if min(args.threads, args.batch, args.rounds, args.latency_runs, args.throughput_runs, ours_calib,
           args.ort_calib_images) < 1:
        raise UserError("--threads, --batch, --rounds, --latency-runs, --throughput-runs, --calib-images and "
                        "--ort-calib-images must be >= 1.")
    load_before = os.getloadavg()
    machine = runtime_machine()
    s = load_setup(ModelOptions.from_args(args, strict=False), calib_images=max(ours_calib, args.ort_calib_images), target=TARGET)
    calib_pool = s.calib_x
    model = s.model.cpu()
    norm = Normalizer(s.meta["normalization"]["mean"], s.meta["normalization"]["std"], "cpu")
    x, y = s.report_x.cpu(), s.report_y.cpu()
    if args.test_images:
        idx = seeded_subset(len(y), args.test_images, s.seed)
        x, y = x[idx], y[idx]
    notes = []
    quant = Recipe.for_target(TARGET, weight_range=args.weight_range)
    ranges = None
    s2, why = recorded_stage2(args.results_dir, s.checkpoint)     # made from this checkpoint, or None
    if why:
        notes.append(why)
    if s2 is not None:
        rec = (s2.get("activation_calibration") or {}).get("tensors") or {}
        if s2.get("target") == TARGET and all("8" in (rec.get(t) or {}).get("scales", {}) for t in s.space.tensors):
            ranges = rec
            quant = with_weight_range(Recipe.from_json(s2.get("quantization")), args.weight_range, "stage 2", notes)
            notes.append(f"uniform W8A8: tensor ranges recorded by stage 2 in "
                         f"{Path(args.results_dir) / RESULTS_FILES['2']}")
    if ranges is None:
        s.calib_x = calib_pool[:ours_calib]
        ranges = s.calibrate([8])
        notes.append(f"uniform W8A8: tensor ranges calibrated here as stage 2 does (torch.ao histogram MSE) on "
                     f"{len(s.calib_x)} training images; ONNX Runtime's quantizer on the first "
                     f"{min(args.ort_calib_images, len(calib_pool))} of them")
    cm = CostModel.named("fused")
    fp32_ai = cm.ai(s.table, s.space.uniform(FLOAT_BITS, FLOAT_BITS))

    models = []      # (name, proto or path, fake-quant model or None, extra)
    fp32 = to_onnx(fold_bn(model))
    models.append(("fp32", fp32, None, {"modelled_ai": fp32_ai}))
    w8a8_cfg = quant.uniform(s.space, 8, 8)
    qm = placed_model(model, w8a8_cfg, ranges, TARGET, quant)
    models.append(("uniform_w8a8", export_model(qm, TARGET), qm,
                   {"config": config_summary(w8a8_cfg), "modelled_ai": cm.ai(s.table, w8a8_cfg),
                    "quantization": quant.to_json()}))
    found, why = searched_entry(args, s, ranges, quant)
    if found is None:
        notes.append(why)
    else:
        cfg, rec, q, info = found
        q = with_weight_range(q, args.weight_range, "the search", notes)
        cfg, rounded = exportable_config(cfg, round_up=True)
        if rounded:
            info["rounded_up"] = {f"{k}:{n}": v for (k, n), v in rounded.items()}
            notes.append(f"searched: {len(rounded)} group(s) at widths ONNX Runtime cannot run were rounded up")
        if any(b == 4 for (k, _), b in cfg.items() if k == W):
            info["note"] = INT4_NOTE
        from quant.place import check_ranges
        try:
            check_ranges(cfg, rec)
        except UserError:
            rec = {**rec, **{t: r for t, r in ranges.items() if t not in rec or "8" not in rec[t]["scales"]}}
        qs = placed_model(model, cfg, rec, TARGET, q)
        models.append(("searched", export_model(qs, TARGET), qs,
                       {"config": config_summary(cfg), "modelled_ai": cm.ai(s.table, cfg), "quantization": q.to_json(),
                        **info}))

    with tempfile.TemporaryDirectory() as d:
        d = Path(args.keep_onnx) if args.keep_onnx else Path(d)
        d.mkdir(parents=True, exist_ok=True)
        (d / "fp32.onnx").write_bytes(fp32.SerializeToString())
        calib = normalized_numpy(calib_pool[:args.ort_calib_images].cpu(), norm)
        t = time.time()
        reduce_range = machine["cpu"]["vnni"] is not True if args.ort_reduce_range == "auto" else (
            args.ort_reduce_range == "on")
        ort_quantize_static(d / "fp32.onnx", d / "ort_quantize_static.onnx", calib, reduce_range=reduce_range)
        import onnx
        rival = onnx.load(str(d / "ort_quantize_static.onnx"))
        models.append(("ort_quantize_static", rival, None,
                       {"recipe": f"onnxruntime.quantization.quantize_static: QDQ, per-channel int8 weights"
                                  f"{' (reduce_range: 7-bit)' if reduce_range else ''}, uint8 activations, MinMax on "
                                  f"{len(calib)} training images", "reduce_range": reduce_range,
                        "quantize_seconds": time.time() - t}))
        for name, proto, _, _ in models:
            if name != "ort_quantize_static":
                (d / f"{name}.onnx").write_bytes(proto.SerializeToString())

    results = []
    sessions = {}
    correct = {}
    b1 = normalized_numpy(x[:1], norm)
    bb = normalized_numpy(x[:args.batch].repeat((args.batch + len(x) - 1) // len(x), 1, 1, 1)[:args.batch], norm)
    for name, proto, fq, extra in models:
        sess = ort_session(proto, args.threads)
        sessions[name] = sess
        correct[name] = top1_credit(torch.from_numpy(ort_logits(sess, x, norm, 250)), y).numpy()
        r = {"name": name, "latency_ms_b1": None, f"throughput_b{args.batch}": None,
             "test_acc": 100.0 * float(correct[name].mean()),
             "onnx_bytes": len(proto.SerializeToString()), **extra}
        f = fusion_report(proto, args.threads)
        r["fusion"] = {k: v for k, v in f.items() if k != "optimized_ops"}
        r["optimized_ops"] = f["optimized_ops"]
        if fq is not None:
            r["agreement"] = check_agreement(proto, fq, x, y, norm, args.threads, 250)
        results.append(r)
        timings(sess, b1, 10)     # warm-up
        timings(sess, bb, 2)
    lat = {n: [] for n in sessions}
    thr = {n: [] for n in sessions}
    for i in range(args.rounds):
        for name, sess in sessions.items():
            lat[name].append(1000.0 * timings(sess, b1, args.latency_runs))
            thr[name].append(args.batch / timings(sess, bb, args.throughput_runs))
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(f"{n} {lat[n][-1]:.2f} ms, {thr[n][-1]:.0f} img/s"
                                                          for n in sessions))
    base = None
    for r in results:
        r["latency_ms_b1"] = statistics.median(lat[r["name"]])
        r[f"throughput_b{args.batch}"] = statistics.median(thr[r["name"]])
        r["latency_ms_b1_rounds"], r[f"throughput_b{args.batch}_rounds"] = lat[r["name"]], thr[r["name"]]
        base = base or r
        r["speedup_b1"] = base["latency_ms_b1"] / r["latency_ms_b1"]
        r[f"speedup_b{args.batch}"] = r[f"throughput_b{args.batch}"] / base[f"throughput_b{args.batch}"]
    for r in results:     # paired against fp32 on the same images: drop and its 95% bootstrap interval
        pd = paired_drop(correct["fp32"], correct[r["name"]])
        r["drop_vs_fp32"], r["drop_vs_fp32_ci95"] = pd.drop, bootstrap_drop_interval(pd)
    ours = {r["name"]: r for r in results}["uniform_w8a8"]
    pd = paired_drop(correct["ort_quantize_static"], correct["uniform_w8a8"])
    lo, hi = bootstrap_drop_interval(pd)
    goal = {"speedup_b64_target": GOAL_SPEEDUP, f"uniform_w8a8_speedup_b{args.batch}": ours[f"speedup_b{args.batch}"],
            "uniform_w8a8_acc_minus_ort_quantizer": -pd.drop, "uniform_w8a8_acc_minus_ort_quantizer_ci95": [-hi, -lo],
            "images_only_ours_right": pd.gained, "images_only_ort_quantizer_right": pd.lost}
    goal["met"] = bool(goal[f"uniform_w8a8_speedup_b{args.batch}"] >= GOAL_SPEEDUP
                       and goal["uniform_w8a8_acc_minus_ort_quantizer"] >= 0)
    load_after = os.getloadavg()
    out = {"benchmark": "deploy_speed", "runtime": runtime_name(), "threads": args.threads, "images": len(y),
           "test_set": s.split.report.name, "batch": args.batch, "rounds": args.rounds,
           "latency_runs": args.latency_runs, "throughput_runs": args.throughput_runs, "target": TARGET,
           "checkpoint": str(s.checkpoint), "model_args": s.meta["model_args"], "fp32_modelled_ai": fp32_ai,
           "machine": {"cpu": machine["cpu"]["model"] or platform.machine(), "cpu_info": machine["cpu"],
                       "onnxruntime": machine["onnxruntime"], "cores": os.cpu_count(),
                       "load_average_before": list(load_before),
                       "load_average_after": list(load_after),
                       "shared": bool(max(load_before[0], load_after[0]) > 0.5),
                       "note": "1-minute load averages; above ~0.5 other processes ran on the CPU during the run"},
           "results": results, "goal": goal, "notes": notes,
           "provenance": provenance(vars(args), "cpu", {"checkpoint": s.checkpoint}, time.time() - t0)}
    atomic_write_json(args.out, out)
    print_table(out)
    print(f"wrote {args.out}")
    return out


def print_table(out: dict):
    b = out["batch"]
    print(f"\n{out['runtime']}, {out['threads']} threads, {describe_cpu(out['machine']['cpu_info'])}; accuracy on {out['images']} "
          f"{out['test_set']} images; load average {out['machine']['load_average_before'][0]:.2f} -> "
          f"{out['machine']['load_average_after'][0]:.2f}")
    print(f"{'model':<22}{'img/s b' + str(b):>12}{'x fp32':>8}{'ms b1':>9}{'x fp32':>8}{'acc %':>8}"
          f"{'int convs':>11}{'int adds':>10}{'AI':>8}")
    for r in out["results"]:
        f = r["fusion"]
        print(f"{r['name']:<22}{r[f'throughput_b{b}']:>12.0f}{r[f'speedup_b{b}']:>8.2f}{r['latency_ms_b1']:>9.3f}"
              f"{r['speedup_b1']:>8.2f}{r['test_acc']:>8.2f}{f['integer_convs']:>6}/{f['convs']:<4}"
              f"{f['integer_adds']:>5}/{f['adds']:<4}" + (f"{r['modelled_ai']:>8.1f}" if r.get("modelled_ai") else ""))
        if r.get("agreement"):
            a = r["agreement"]
            print(f"{'':<22}agreement with the fake-quant PyTorch model: {a['agreement']:.2f}% top-1, accuracy "
                  f"difference {a['acc_diff']:+.2f} points ({'PASS' if a['passed'] else 'FAIL'})")
    g = out["goal"]
    lo, hi = g["uniform_w8a8_acc_minus_ort_quantizer_ci95"]
    print(f"goal: uniform W8A8 >= {g['speedup_b64_target']}x fp32 throughput at accuracy >= ORT's quantizer: "
          f"{g[f'uniform_w8a8_speedup_b{b}']:.2f}x, {g['uniform_w8a8_acc_minus_ort_quantizer']:+.2f} points (95% "
          f"paired interval [{lo:+.2f}, {hi:+.2f}]) -> {'met' if g['met'] else 'not met'}")
    for n in out["notes"]:
        print(f"note: {n}")


def main(argv=None):
    run(deploy_speed, get_args_parser(), argv)


if __name__ == "__main__":
    main()
