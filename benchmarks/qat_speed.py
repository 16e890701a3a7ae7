"""Seconds per epoch of quantization-aware fine-tuning against float training, same trainer, model,
images, batch and device, in one run. Prints both and the ratio (the goal: at most 1.5x).

    python benchmarks/qat_speed.py --checkpoint pretrained/resnet20_cifar10jpeg_30ep.pt --images 5000
    python benchmarks/qat_speed.py --dataset synthetic --images 2000 --w 4 --a 4

The float epoch is stage 1's (the model with its BatchNorms, bf16 autocast on CUDA); the QAT epoch
fine-tunes the BN-folded model with every layer at --w / --a bits (utils/qat.py).
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
from utils.qat import param_groups, prepare_qat  # noqa: E402
from utils.train import PAD, Normalizer, WarmupCosine, to_device_uint8, train_one_epoch  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def epochs_of(model, optimizer, padded, labels, normalize, batch, epochs, amp, device):
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine((epochs + 1) * (len(labels) // batch)))
    out = []
    for e in range(epochs + 1):
        sync(device)
        t = time.perf_counter()
        train_one_epoch(model, optimizer, sched, padded, labels, normalize, batch, 0, e, use_amp=amp, desc=f"epoch {e}")
        sync(device)
        out.append(time.perf_counter() - t)
    return float(np.median(out[1:])), out[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a float checkpoint (default: a fresh resnet20)")
    p.add_argument("--data-dir", default="data", type=Path, help="(default: data, or the checkpoint's)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"), help="(default: cifar10)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--images", default=5000, type=int, help="training images per epoch (default: 5000)")
    p.add_argument("--batch-size", default=128, type=int, help="(default: 128)")
    p.add_argument("--epochs", default=1, type=int, help="timed epochs each, after one warm-up (default: 1)")
    p.add_argument("--w", default=4, type=int, help="weight bits of every layer (default: 4)")
    p.add_argument("--a", default=4, type=int, help="width of every tensor, the image and the logits included "
                                                    "(default: 4)")
    args = p.parse_args()
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
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    float_model = build_model(**{k: v for k, v in model.model_args.items() if k != "num_classes"}).to(device)
    float_model.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(float_model.parameters(), lr=0.001, momentum=0.9, nesterov=True, weight_decay=5e-4)
    f_s, f_warm = epochs_of(float_model, opt, padded, labels, normalize, args.batch_size, args.epochs,
                            device.type == "cuda", device)

    model.eval()
    calib = [normalize(to_device_uint8(data.train_x[idx[:500]], device))]
    ranges = calibrate(fold_bn(model), DEFAULT_TARGET, calib, [args.a])
    space = kernel_table(model, DEFAULT_TARGET).space
    qat = prepare_qat(model, space.uniform(args.w, args.a), ranges, DEFAULT_TARGET).to(device)
    opt = torch.optim.SGD(param_groups(qat), lr=0.001, momentum=0.9, nesterov=True)
    q_s, q_warm = epochs_of(qat, opt, padded, labels, normalize, args.batch_size, args.epochs,
                            device.type == "cuda", device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"\n{len(labels)} images/epoch, batch {args.batch_size}, {name}")
    print(f"float training epoch (with BN):        {f_s:.2f} s (warm-up {f_warm:.2f} s)")
    print(f"QAT epoch (folded, W{args.w}A{args.a} everywhere): {q_s:.2f} s (warm-up {q_warm:.2f} s)")
    print(f"ratio: {q_s / f_s:.2f}x")


if __name__ == "__main__":
    main()
