"""Seconds per epoch of quantization-aware fine-tuning against float training, same trainer, model,
images, batch and device, in one run. Prints both and the ratio (the goal: at most 1.5x on the CPU,
distillation excluded), and the cost of distillation on its own.

    python benchmarks/qat_speed.py --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt --images 5000
    python benchmarks/qat_speed.py --dataset synthetic --images 2000 --w 4 --a 4 --bn folded --distill

The float epoch is stage 1's (the model with its BatchNorms, bf16 autocast on CUDA); the QAT epoch
fine-tunes the model with every layer at --w / --a bits as stage 4 does (utils/qat.py: BN kept and
each conv weight quantized in its folded form by default, ``--bn folded`` for the folded recipe).
Epochs are timed in rounds, float then QAT (then QAT with distillation), after one untimed round, and
the medians are reported: on a shared machine, load that comes and goes then hits both alike.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import build_model  # noqa: E402
from models.structure import DEFAULT_TARGET  # noqa: E402
from quant.calibrate import calibrate  # noqa: E402
from quant.cost import kernel_table  # noqa: E402
from quant.fold import fold_bn  # noqa: E402
from utils.checkpoint import load_model  # noqa: E402
from utils.cli import resolve_device  # noqa: E402
from utils.data import channel_stats, load_dataset, subset_indices  # noqa: E402
from utils.qat import BN_MODES, DEFAULT_BN, MOMENTUM, WEIGHT_DECAY, Distilled, param_groups, prepare_qat  # noqa: E402
from utils.train import PAD, Normalizer, WarmupCosine, to_device_uint8, train_one_epoch  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Run:
    """One model under training: its optimizer and schedule persist across timed epochs."""

    def __init__(self, name, model, params, steps, amp):
        self.name, self.model, self.amp = name, model, amp
        self.optimizer = torch.optim.SGD(params, lr=0.001, momentum=MOMENTUM, nesterov=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(steps))
        self.epoch, self.seconds = 0, []

    def epoch_once(self, padded, labels, normalize, batch, device):
        sync(device)
        t = time.perf_counter()
        train_one_epoch(self.model, self.optimizer, self.scheduler, padded, labels, normalize, batch, 0, self.epoch,
                        use_amp=self.amp, desc=f"{self.name} epoch {self.epoch}")
        sync(device)
        self.seconds.append(time.perf_counter() - t)
        self.epoch += 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a float checkpoint (default: a fresh resnet20)")
    p.add_argument("--data-dir", default="data", type=Path, help="(default: data, or the checkpoint's)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"), help="(default: cifar10)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--images", default=5000, type=int, help="training images per epoch (default: 5000)")
    p.add_argument("--batch-size", default=128, type=int, help="(default: 128)")
    p.add_argument("--epochs", default=2, type=int, help="timed rounds, after one untimed round (default: 2)")
    p.add_argument("--w", default=4, type=int, help="weight bits of every layer (default: 4)")
    p.add_argument("--a", default=4, type=int, help="width of every tensor, the image and the logits included "
                                                    "(default: 4)")
    p.add_argument("--bn", default=DEFAULT_BN, choices=BN_MODES, help=f"the QAT recipe's BN (default: {DEFAULT_BN})")
    p.add_argument("--distill", action="store_true", help="also time QAT with distillation from the float model")
    args = p.parse_args(argv)
    print(args)
    device = resolve_device(args.device)
    if args.checkpoint:
        model, meta = load_model(args.checkpoint)
        data_dir = Path(meta["data"].get("data_dir") or args.data_dir)
        data = load_dataset(meta["data"].get("name", args.dataset), data_dir)
    else:
        model, data = build_model("resnet20"), load_dataset(args.dataset, args.data_dir)
    idx = subset_indices(len(data.train_y), args.images, 0)
    mean, std = channel_stats(data.train_x[idx])
    normalize = Normalizer(mean, std, device)
    padded = F.pad(to_device_uint8(data.train_x[idx], device), (0, 0, PAD, PAD, PAD, PAD))
    labels = torch.from_numpy(data.train_y[idx]).to(device)
    model = model.to(device).eval()
    amp = device.type == "cuda"
    steps = (args.epochs + 1) * (len(labels) // args.batch_size)

    float_model = build_model(**{k: v for k, v in model.model_args.items() if k != "num_classes"}).to(device)
    float_model.load_state_dict(model.state_dict())
    if device.type == "cuda":
        float_model = float_model.to(memory_format=torch.channels_last)
    calib = [normalize(to_device_uint8(data.train_x[idx[:500]], device))]
    ranges = calibrate(fold_bn(model), DEFAULT_TARGET, calib, [args.a]) if args.a != 32 else {}
    space = kernel_table(model, DEFAULT_TARGET).space

    def qat_model():
        return prepare_qat(model, space.uniform(args.w, args.a), ranges, DEFAULT_TARGET, bn=args.bn).to(device)
    runs = [Run("float", float_model, [{"params": list(float_model.parameters()), "weight_decay": WEIGHT_DECAY}],
                steps, amp)]
    q = qat_model()
    runs.append(Run("qat", q, param_groups(q), steps, amp))
    if args.distill:
        q = qat_model()
        runs.append(Run("qat+distill", Distilled(q, fold_bn(model).to(device)), param_groups(q), steps, amp))
    for _ in range(args.epochs + 1):
        for r in runs:
            r.epoch_once(padded, labels, normalize, args.batch_size, device)
    med = {r.name: float(np.median(r.seconds[1:])) for r in runs}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"\n{len(labels)} images/epoch, batch {args.batch_size}, {name}; medians of {args.epochs} rounds "
          f"after one untimed round")
    print(f"float training epoch (with BN):           {med['float']:.2f} s (rounds {fmt(runs[0].seconds)})")
    print(f"QAT epoch (BN {args.bn}, W{args.w}A{args.a} everywhere): {med['qat']:.2f} s (rounds {fmt(runs[1].seconds)})")
    print(f"ratio: {med['qat'] / med['float']:.2f}x (goal on the CPU: at most 1.5x)")
    if args.distill:
        d = med["qat+distill"]
        print(f"QAT epoch with distillation:              {d:.2f} s (rounds {fmt(runs[2].seconds)}): "
              f"{d / med['float']:.2f}x the float epoch; distillation alone costs {d - med['qat']:.2f} s "
              f"({100 * (d - med['qat']) / med['qat']:.0f}% of the QAT epoch)")
    return med


def fmt(xs):
    return ", ".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    main()
