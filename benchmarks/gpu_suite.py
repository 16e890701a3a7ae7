"""Every GPU measurement the project reports, in one command that writes one JSON report.

    python benchmarks/gpu_suite.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --out gpu_suite.json
    python benchmarks/gpu_suite.py --tiny --out /tmp/gpu_suite_tiny.json    # CPU, synthetic, about a minute

Measured in the same run, on the same device (one H100: under 8 minutes with the defaults):

1. ``loader``: this project's device-resident trainer against a typical DataLoader loop
   (torchvision transforms on CPU workers, fp32) at the same batch: s/epoch and the ratio;
2. ``recipes``: s/epoch of the trainer's candidate settings (batch 128 bf16, the default; fp32;
   batch 512 with warm-up and scaled LR; channels_last is always on for CUDA; torch.compile):
   the default only changes when these numbers and an equal accuracy say so;
3. ``training``: stage 1 at the default recipe for --epochs (default 30): s/epoch, wall time, test
   accuracy, and the projected 200-epoch time. The full run is one separate command:
   ``python 1_train_baseline.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 200``;
4. ``stages``: stages 2, 3 and 4 (with activation widths 8 6 4) on that checkpoint: wall time and
   number of evaluations each;
5. ``qat``: one quantization-aware fine-tuning epoch (uniform W4A4) against one float training
   epoch of the same trainer: s/epoch and the ratio.

``--tiny`` runs the same code on seconds-sized synthetic work (ResNet-8, a few hundred images), so the
suite cannot rot (tests run it).
"""
import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from train_speed import sgd_model, time_plain_loop, time_trainer  # noqa: E402
from utils.cli import resolve_device, script_module  # noqa: E402
from utils.data import channel_stats, load_dataset, subset_indices  # noqa: E402
from utils.io import atomic_write_json, git_commit  # noqa: E402


def run_stage(script, argv):
    mod = script_module(script)
    args = mod.get_args_parser().parse_args([str(a) for a in argv])
    t = time.perf_counter()
    out = mod.main(args)
    return out, time.perf_counter() - t


def median(xs):
    return float(np.median(xs[1:] if len(xs) > 1 else xs))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", type=Path, help="CIFAR-10 source, as in stage 1 (default: data)")
    p.add_argument("--out", default="gpu_suite.json", type=Path, help="the JSON report (default: gpu_suite.json)")
    p.add_argument("--epochs", default=30, type=int, help="epochs of the training run (default: 30)")
    p.add_argument("--workers", default=8, type=int, help="DataLoader workers of the plain loop (default: 8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--tiny", action="store_true", help="synthetic data, seconds-sized work, for CPU tests (default: off)")
    args = p.parse_args()
    print(args)
    t_all = time.perf_counter()
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    data_flags = ["--dataset", "synthetic"] if args.tiny else ["--data-dir", args.data_dir]
    data = load_dataset("synthetic" if args.tiny else "cifar10", args.data_dir)
    n = 256 if args.tiny else 45000
    arch = "resnet8" if args.tiny else "resnet20"
    idx = subset_indices(len(data.train_y), n, 0)
    x, y = data.train_x[idx], data.train_y[idx]
    mean, std = channel_stats(x)
    timed_epochs = 1
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch_version": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "git_commit": git_commit(), "tiny": args.tiny, "args": {k: str(v) for k, v in vars(args).items()},
              "images_per_epoch": len(y)}

    print("\n[1/5] trainer vs DataLoader loop")
    plain = time_plain_loop(x, y, mean, std, device, 128, timed_epochs, 0 if args.tiny else args.workers,
                            sgd_model(device, arch=arch))
    ours = time_trainer(x, y, mean, std, device, 128, timed_epochs, sgd_model(device, arch=arch))
    report["loader"] = {"batch_size": 128, "plain_s_per_epoch": median(plain), "trainer_s_per_epoch": median(ours),
                        "ratio": median(plain) / median(ours), "workers": args.workers, "plain_precision": "fp32",
                        "trainer_precision": "bf16 autocast" if device.type == "cuda" else "fp32"}

    print("\n[2/5] recipe candidates")
    recipes = {"batch 128, bf16 (default)": dict(batch=128),
               "batch 128, fp32": dict(batch=128, amp=False),
               "batch 512, bf16, 1 warm-up epoch, lr x4": dict(batch=512, lr=0.2, warmup=1)}
    if device.type == "cuda":
        recipes["batch 512, bf16, torch.compile"] = dict(batch=512, lr=0.2, warmup=1, compile=True)
    report["recipes"] = {}
    for name, r in recipes.items():
        s = time_trainer(x, y, mean, std, device, min(r["batch"], len(y) // 2), timed_epochs,
                         sgd_model(device, r.get("lr", 0.05), arch), r.get("compile", False), r.get("amp"),
                         r.get("warmup", 0))
        report["recipes"][name] = {"s_per_epoch": median(s), "first_epoch_s": s[0]}

    print("\n[3/5] training run at the default recipe")
    common = [*data_flags, "--device", args.device, "--results-dir", work / "results", "--checkpoint-dir", work / "ckpt",
              *(["--quick", "--val-size", "100"] if args.tiny else [])]
    epochs = 1 if args.tiny else args.epochs
    res1, wall = run_stage("1_train_baseline.py", [*common, "--arch", arch, "--epochs", epochs, "--eval-every", 0])
    report["training"] = {"epochs": epochs, "wall_s": wall, "s_per_epoch": res1["seconds_per_epoch"],
                          "test_acc": res1["test_acc"], "val_acc": res1["val_acc"],
                          "projected_200_epochs_s": 200 * res1["seconds_per_epoch"],
                          "data": res1["dataset"]["source"]}

    print("\n[4/5] stages 2-4")
    widths = ["--bits", 4, "--a-bits", 4] if args.tiny else ["--a-bits", 8, 6, 4]
    report["stages"] = {}
    for script, extra in (("2_per_layer_analysis.py", widths), ("3_greedy_search.py", []),
                          ("4_create_baselines.py", [])):
        res, wall = run_stage(script, [*common, *extra])
        report["stages"][script] = {"wall_s": wall, "evaluations": res.get("evaluations", 2 * len(res.get("configs", [])))}

    print("\n[5/5] one fine-tuning epoch vs one float epoch")
    res4, wall = run_stage("4_create_baselines.py", [*common, "--qat-epochs", 1, "--qat-configs", "fp32", "uniform_w4a4"])
    by = {c["name"]: c for c in res4["configs"]}
    f, q = by["fp32"]["qat_history"][0]["seconds"], by["uniform_w4a4"]["qat_history"][0]["seconds"]
    report["qat"] = {"float_epoch_s": f, "w4a4_epoch_s": q, "ratio": q / f, "stage4_wall_s": wall,
                     "note": "same trainer, same images; the float epoch trains the BN-folded model in float"}
    report["total_s"] = time.perf_counter() - t_all
    atomic_write_json(args.out, report)
    print(f"\nwrote {args.out} in {report['total_s']:.0f} s")
    print(f"loader ratio {report['loader']['ratio']:.2f}x; training {report['training']['s_per_epoch']:.2f} s/epoch, "
          f"test {report['training']['test_acc']:.2f}%; QAT/float epoch {report['qat']['ratio']:.2f}x")


if __name__ == "__main__":
    main()
