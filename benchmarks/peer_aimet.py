"""AI-QS against AIMET's mixed-precision search (``choose_mixed_precision``), side by side: same model, same
images, same widths offered, same tensors; both answers scored in both simulators and priced in fused AI and
in BitOps, and AIMET's answer sent through AI-QS's confirm test.

    python benchmarks/peer_aimet.py --peer-python ../aimet-env/bin/python \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --out docs/results/peer_aimet_shipped.json
    python benchmarks/peer_aimet.py --peer-python ../aimet-env/bin/python --checkpoint resnet20A.pt --shortcut A \\
        --data-dir ../shared/data/cifar10-jpeg.tar.gz --out docs/results/peer_aimet_foreign.json

AIMET lives in its own environment (README, "AIMET side by side"); without ``--peer-python`` or with a path
that is not there, the benchmark says so and exits without writing anything.

* Images: AI-QS's split of the checkpoint. Both searches measure on its search images (AIMET's phases 1 and
  2 alike), calibrate on its 1,000 calibration (training) images, and are reported on its report (test) images.
* Widths: weights and tensors at 8 or 4 bits (AI-QS ``--bits 8 4 --a-bits 8 4``; AIMET's candidates
  (activation, weight) 8/8, 8/4, 4/8, 4/4), logits float for both, a budget of ``--max-drop`` points.
* Tensors: the ``generic`` target's (benchmarks/peer/aimet_side.py switches off the quantizers it fuses away).
* Time: each search on one thread, one after the other (AI-QS's stages 2 and 3 without the one-time fits of
  learned rounding; AIMET's ``choose_mixed_precision`` after its encodings).
* Objective: AI-QS's stage 3 also runs with ``--objective bitops`` on the same stage-2 table (``aiqs_bitops``),
  to tell the search from the price it optimizes.
* Speed: AI-QS's stages 2 and 3 also run with the speed levers that may change the answer
  (benchmarks/common.py's SPEED_LEVERS: stage 2 ``--signal fisher``, stage 3 ``--rank-by fisher --early-stop
  --confirm-step 0.01 --method greedy``; ``aiqs_levers``), scored like the others; AIMET's simulator scores only
  the default answer.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import SHIPPED, SPEED_LEVERS  # noqa: E402
from quant.confirm import confirm_z  # noqa: E402
from quant.cost import CostModel, bitops  # noqa: E402
from quant.stats import Budget, bootstrap_drop_interval, paired_drop, wilson_interval  # noqa: E402
from quant.widths import FLOAT_BITS, A, W  # noqa: E402
from utils.cli import run_stage, script_module  # noqa: E402
from utils.io import atomic_write_text, provenance  # noqa: E402
from utils.machine import cpu_info, keep_freed_memory  # noqa: E402
from utils.options import SensitivityOptions  # noqa: E402
from utils.stages.common import load_setup, stage2_recipe, weight_ladder  # noqa: E402

WIDTHS = (8, 4)
CANDIDATES = [(a, w) for a in WIDTHS for w in WIDTHS]   # AIMET's (activation, weight) pairs


def to_groups(space, answer: dict) -> dict:
    """An answer as {"w": {layer: bits}, "a": {tensor: bits}} -> a full AI-QS configuration (absent: float)."""
    return space.full({**{(W, n): b for n, b in answer["w"].items() if n in space.layers},
                       **{(A, t): b for t, b in answer["a"].items() if t in space.tensors}})


def to_answer(config: dict) -> dict:
    return {"w": {n: b for (k, n), b in config.items() if k == W},
            "a": {n: b for (k, n), b in config.items() if k == A}}


def score(s, config: dict, evaluators: dict, max_drop: float, z: float) -> dict:
    """One configuration in AI-QS's simulator: test accuracy and paired drop, and the confirm test."""
    cm = CostModel.named("fused")
    out = {"fused_ai": cm.cost(s.table, config)["ai"], "fp32_fused_ai": cm.cost(s.table, s.space.uniform(32, 32))["ai"],
           "bitops": bitops(s.table, config), "fp32_bitops": bitops(s.table, s.space.uniform(32, 32))}
    for part, ev in evaluators.items():
        m = ev.evaluate(config)
        pd = paired_drop(ev.float_outcome.correct, m.correct)
        out[f"{part}_acc"], out[f"{part}_drop"], out[f"{part}_drop_se"] = m.accuracy, pd.drop, pd.se
        if part == "test":
            out.update(test_acc_ci95=wilson_interval(m.n_correct, m.n), test_drop_ci95=bootstrap_drop_interval(pd),
                       test_images=m.n)
    out["confirm_passed"] = bool(Budget(max_drop, z).holds(out["confirm_drop"], out["confirm_drop_se"]))
    return out


def aiqs_search(args, folder: Path, objective: str = "ai", stage2: tuple | None = None,
                flags: tuple = ([], [])) -> tuple[dict, float, tuple]:
    """AI-QS's stages 2 and 3 at the benchmark's widths, stage 3 maximizing `objective`, with `flags` (stage 2's,
    stage 3's) added: (stage 3's JSON, seconds of both without the one-time fits, stage 2's (file, seconds)).
    Given `stage2`, its table is reused and its seconds counted."""
    common = ["--results-dir", folder, "--checkpoint", args.checkpoint, "--checkpoint-dir", args.checkpoint_dir,
              *args.stage_flags]
    if stage2 is None:
        s2, t2 = run_stage("2_per_layer_analysis.py", [*common, "--bits", *WIDTHS, "--a-bits", *WIDTHS, *flags[0]])
        stage2 = (folder / "02_per_layer.json", t2 - (s2.get("ptq_fit") or {}).get("seconds", 0.0))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(stage2[0], folder / "02_per_layer.json")
    s3, t3 = run_stage("3_greedy_search.py", [*common, "--max-drop", args.max_drop, "--objective", objective,
                                              *flags[1]])
    return s3, stage2[1] + t3 - (s3.get("ptq_fit") or {}).get("seconds", 0.0), stage2


def job_files(s, args, aiqs_answer: dict, job: Path):
    job.mkdir(parents=True, exist_ok=True)
    n = s.normalize
    torch.save({"state_dict": s.model.state_dict(), "scale": n.scale.cpu(), "shift": n.shift.cpu(),
                "calib_x": s.calib_x.cpu(), "search_x": s.eval_x.cpu(), "search_y": s.eval_y.cpu(),
                "test_x": s.report_x.cpu(), "test_y": s.report_y.cpu()}, job / "data.pt")
    kernels = [k.name for k in s.table.kernels]
    (job / "job.json").write_text(json.dumps({"model_args": s.meta["model_args"], "kernels": kernels,
                                              "candidates": CANDIDATES, "max_drop": args.max_drop,
                                              "aiqs_answer": aiqs_answer}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", type=Path, default=None,
                   help="the Python of AIMET's environment (default: none: skip)")
    p.add_argument("--checkpoint", type=Path, default=SHIPPED,
                   help="(default: the shipped model)")
    p.add_argument("--shortcut", choices=("A", "B"), default=None, help="for a foreign checkpoint (default: its own)")
    p.add_argument("--data-dir", default=None, help="(default: the checkpoint's)")
    p.add_argument("--max-drop", type=float, default=1.0, help="the budget, points (default: 1.0)")
    p.add_argument("--work", type=Path, default=Path("results") / "peer_aimet", help="(default: results/peer_aimet)")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="where the learned-rounding cache lives (default: <work>/checkpoints)")
    p.add_argument("--quick", action="store_true", help="the stages' smoke-test sizes, for tests (default: off)")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    if args.peer_python is None or not args.peer_python.exists():
        print(f"AIMET is not installed here ({'no --peer-python' if args.peer_python is None else args.peer_python} "
              f"does not exist): nothing compared, nothing written. The README's 'AIMET side by side' says how to "
              f"make its environment.")
        return None
    args.stage_flags = (["--shortcut", args.shortcut] if args.shortcut else []) + (["--quick"] if args.quick else [])
    args.checkpoint_dir = args.checkpoint_dir or args.work / "checkpoints"
    if args.data_dir is not None:
        args.stage_flags += ["--data-dir", args.data_dir]
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    keep_freed_memory()
    t0 = time.perf_counter()
    mod = script_module("2_per_layer_analysis.py")
    opts = SensitivityOptions.from_args(mod.get_args_parser().parse_args(
        [str(a) for a in ["--checkpoint", args.checkpoint, "--checkpoint-dir", args.checkpoint_dir,
                          "--results-dir", args.work / "aiqs", "--bits", *WIDTHS, "--a-bits", *WIDTHS,
                          *args.stage_flags]]))
    s = load_setup(opts, stage2_recipe(opts, "fused"), calib_images=opts.calib_images)
    s.learn_levels([(n, b) for n in s.space.layers for b in weight_ladder(opts)])   # the one-time fits, untimed
    s.calibrate(list(WIDTHS))

    print("=== AI-QS: stages 2 and 3 ===")
    s3, aiqs_seconds, stage2 = aiqs_search(args, args.work / "aiqs")
    best = s3["best"]   # the confirmed answer stage 3 ships: "greedy" or "pareto"
    aiqs_config = s.space.parse(s3[best]["config"], FLOAT_BITS, source="stage 3's answer")
    print("=== AI-QS: stage 3 with --objective bitops (AIMET's price), on the same stage-2 table ===")
    s3b, bitops_seconds, _ = aiqs_search(args, args.work / "aiqs_bitops", "bitops", stage2)
    bitops_config = s.space.parse(s3b["greedy"]["config"], FLOAT_BITS, source="stage 3's answer")
    print("=== AI-QS: stages 2 and 3 with the speed levers (benchmarks/common.py) ===")
    s3l, levers_seconds, _ = aiqs_search(args, args.work / "aiqs_levers", flags=SPEED_LEVERS)
    levers_config = s.space.parse(s3l[s3l["best"]]["config"], FLOAT_BITS, source="stage 3's answer")

    print("=== AIMET: choose_mixed_precision ===")
    job = args.work / "aimet_job"
    job_files(s, args, to_answer(aiqs_config), job)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(args.peer_python), str(REPO / "benchmarks" / "peer" / "aimet_side.py"), str(job)],
                         env=env, cwd=REPO)
    if run.returncode != 0:
        raise SystemExit(f"AIMET's side failed (exit {run.returncode}); its output is above. Nothing was written.")
    aimet = json.loads((job / "aimet.json").read_text())
    aimet_config = to_groups(s.space, aimet["answer"])

    evaluators = {"test": s.evaluator(s.report_x, s.report_y, 1000, cache_activations=False),
                  "confirm": s.evaluator(s.confirm_x, s.confirm_y, 1000, cache_activations=False)}
    z = confirm_z(1)
    out = {}
    for name, config, secs in (("aiqs", aiqs_config, aiqs_seconds), ("aimet", aimet_config, aimet["search_seconds"]),
                               ("aiqs_bitops", bitops_config, bitops_seconds),
                               ("aiqs_levers", levers_config, levers_seconds)):
        out[name] = {**score(s, config, evaluators, args.max_drop, z), "search_seconds": secs,
                     "aimet_simulator": aimet["scores"].get(name), "config": s.space.to_file(config)}
    out["aiqs"]["answer_from"], out["aiqs_bitops"]["answer_from"] = best, "greedy"
    out["aiqs_bitops"]["objective"] = "bitops"
    out["aiqs_levers"]["answer_from"] = s3l["best"]
    out["aiqs_levers"]["flags"] = {stage: [str(f) for f in flags]
                                   for stage, flags in zip(("stage2", "stage3"), SPEED_LEVERS)}
    out["aiqs_levers"]["same_answer_as_aiqs"] = levers_config == aiqs_config
    out.update(images={"search": len(s.eval_y), "confirm": len(s.confirm_y), "test": len(s.report_y),
                       "calibration": len(s.calib_x)},
               widths=list(WIDTHS), max_drop=args.max_drop, confirm_z=z, target="generic", logits="float",
               aimet_switched_off=aimet["switched_off"], aimet_float_acc=aimet["float_acc"],
               machine=cpu_info(), threads=1,
               provenance=provenance(vars(args), "cpu", inputs={"checkpoint": args.checkpoint},
                                     seconds=time.perf_counter() - t0))
    atomic_write_text(args.out, json.dumps(out, indent=2, default=str))
    print(f"\n{'':<12}{'fused AI':>9}{'x fp32':>8}{'GBitOps':>9}{'test drop [95%]':>22}{'confirm':>9}{'search s':>10}")
    for name in ("aiqs", "aimet", "aiqs_bitops", "aiqs_levers"):
        r = out[name]
        print(f"{name:<12}{r['fused_ai']:>9.2f}{r['fused_ai'] / r['fp32_fused_ai']:>8.2f}{r['bitops'] / 1e9:>9.2f}"
              f"{r['test_drop']:>8.2f} [{r['test_drop_ci95'][0]:.2f}, {r['test_drop_ci95'][1]:.2f}]"
              f"{'passed' if r['confirm_passed'] else 'failed':>9}{r['search_seconds']:>10.0f}")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
