"""Seconds per training epoch: this project's device-resident trainer vs a plain torchvision
DataLoader loop (PIL transforms on CPU workers, fp32), same model, data, batch and device,
in one run. Prints both and the ratio.

    python benchmarks/train_speed.py --data-dir ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/train_speed.py --dataset synthetic --train-images 5000 --device cpu
    python benchmarks/train_speed.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --graph cuda
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from models import build_model  # noqa: E402
from utils.cli import resolve_device  # noqa: E402
from utils.data import channel_stats, load_dataset, subset_indices  # noqa: E402
from utils.train import (GRAPH_MODES, PAD, GraphStep, Normalizer, WarmupCosine, to_device_uint8,  # noqa: E402
                         train_one_epoch)


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def plain_epoch(model, optimizer, loader, device):
    """The textbook loop: host-side augmentation, a copy to the device every batch."""
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_plain_loop(x, y, mean, std, device, batch_size, epochs, workers, model_fn) -> list[float]:
    """Seconds per epoch of the textbook loop (torchvision transforms on CPU workers, fp32); the first is warm-up."""
    tf = transforms.Compose([transforms.RandomCrop(32, padding=PAD), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(ArrayDataset(x, y, tf), batch_size=batch_size, shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    model, opt = model_fn()
    out = []
    for _ in range(epochs + 1):
        sync(device)
        t = time.perf_counter()
        plain_epoch(model, opt, loader, device)
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def time_trainer(x, y, mean, std, device, batch_size, epochs, model_fn, compile=False, amp=None,
                 warmup_epochs=0, graph="off") -> list[float]:
    """Seconds per epoch of this project's device-resident trainer (utils/train.py); the first is warm-up
    (and, with `compile` or `graph`, compilation or capture). `graph`: utils.train.GraphStep's mode, or off."""
    model, opt = model_fn(fused=graph == "cuda")
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    steps = len(y) // batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine((epochs + 1) * steps, warmup_epochs * steps))
    padded = F.pad(to_device_uint8(x, device), (0, 0, PAD, PAD, PAD, PAD))
    labels = torch.from_numpy(y).to(device)
    normalize = Normalizer(mean, std, device)
    use_amp = device.type == "cuda" if amp is None else amp
    step_fn = torch.compile(model) if compile else model
    step = GraphStep(model, opt, padded, labels, normalize, use_amp, graph) if graph != "off" else None
    out = []
    for e in range(epochs + 1):
        sync(device)
        t = time.perf_counter()
        train_one_epoch(step_fn, opt, sched, padded, labels, normalize, batch_size, 0, e,
                        use_amp=use_amp, desc=f"ours {e}", graph=step)
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def sgd_model(device, lr=0.05, arch="resnet20"):
    """A maker of (fresh model, its SGD optimizer), the same for every loop timed; fused=True gives the
    fused SGD kernel that a CUDA graph needs (the same update)."""
    def make(fused=False):
        torch.manual_seed(0)
        m = build_model(arch).to(device)
        return m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                  **({"fused": True} if fused else {}))
    return make


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", type=Path, help="CIFAR-10 source, as in stage 1 (default: data)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"), help="(default: cifar10)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    p.add_argument("--train-images", default=45000, type=int, help="images per epoch (default: 45000)")
    p.add_argument("--batch-size", default=128, type=int, help="(default: 128)")
    p.add_argument("--epochs", default=2, type=int, help="timed epochs per loop, after one warm-up epoch (default: 2)")
    p.add_argument("--workers", default=4, type=int, help="DataLoader workers of the plain loop (default: 4)")
    p.add_argument("--compile", action="store_true", help="torch.compile our trainer's model (default: off)")
    p.add_argument("--graph", default="off", choices=GRAPH_MODES,
                   help="our trainer's whole step as one graph, as stage 1's --graph (default: off)")
    args = p.parse_args()
    print(args)
    device = resolve_device(args.device)
    data = load_dataset(args.dataset, args.data_dir)
    idx = subset_indices(len(data.train_y), args.train_images, 0)
    x, y = data.train_x[idx], data.train_y[idx]
    mean, std = channel_stats(x)
    plain = time_plain_loop(x, y, mean, std, device, args.batch_size, args.epochs, args.workers, sgd_model(device))
    ours = time_trainer(x, y, mean, std, device, args.batch_size, args.epochs, sgd_model(device), args.compile,
                        graph=args.graph)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    p_s, o_s = float(np.median(plain[1:])), float(np.median(ours[1:]))
    print(f"\n{len(y)} images/epoch, batch {args.batch_size}, {name}, {data.source}")
    print(f"plain DataLoader loop (fp32, {args.workers} workers): {p_s:.2f} s/epoch (warm-up {plain[0]:.2f} s)")
    print(f"device-resident trainer{' (bf16)' if device.type == 'cuda' else ''}, --graph {args.graph}:        "
          f"{o_s:.2f} s/epoch (warm-up {ours[0]:.2f} s)")
    print(f"speed-up: {p_s / o_s:.2f}x")


if __name__ == "__main__":
    main()
