"""Stage 1: train the float ResNet baseline on CIFAR-10.

    python 1_train_baseline.py                      # ResNet-20, 200 epochs, the default recipe
    python 1_train_baseline.py --data-dir ../shared/data/cifar10-jpeg.tar.gz --epochs 30
    python 1_train_baseline.py --arch mobilenetv2   # any registered architecture
    python 1_train_baseline.py --resume             # continue an interrupted run
    python 1_train_baseline.py --graph cuda         # the training step as one CUDA graph (GPU)
    python 1_train_baseline.py --quick --dataset synthetic   # smoke test, seconds on CPU
    torchrun --nproc_per_node 4 1_train_baseline.py ...      # DistributedDataParallel; --batch-size is global

Writes checkpoints/<arch>_baseline.pt and results/01_baseline.json.
"""
import argparse

from utils import api
from utils.options import TrainOptions
from utils.cli import add_arch_args, add_common_args, run
from utils.train import GRAPH_MODES


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arch_args(p, training=True)
    # --- optimization: SGD + Nesterov, one cosine decay (optionally after a linear warm-up), weight
    # decay on conv/linear weights only. Not He et al. 2015's step schedule. ---
    p.add_argument("--epochs", default=200, type=int, help="training epochs (default: 200)")
    p.add_argument("--batch-size", default=128, type=int, help="images per step (default: 128)")
    p.add_argument("--lr", default=0.1, type=float,
                   help="peak learning rate per 128 images; scaled linearly with --batch-size (default: 0.1)")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum (default: 0.9)")
    p.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum (default: Nesterov)")
    p.add_argument("--weight-decay", default=5e-4, type=float,
                   help="L2 weight decay on conv and linear weights (default: 5e-4)")
    p.add_argument("--decay-norm-and-bias", action="store_true", default=None,
                   help="also decay BN parameters and biases, the recipe of checkpoints before version 2 "
                        "(default: off, as torchvision's references allow)")
    p.add_argument("--warmup-epochs", default=0, type=int,
                   help="linear LR warm-up before the cosine decay; useful for large batches (default: 0)")
    # --- several processes (torchrun) ---
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="under torchrun, normalize over the global batch (SyncBatchNorm) instead of each "
                        "process's share (default: off, per-process BN statistics)")
    # --- speed ---
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    p.add_argument("--graph", default="off", choices=GRAPH_MODES,
                   help="run the whole training step (augmentation, forward, backward, SGD update) as one graph: "
                        "cuda = captured with torch.cuda.graphs (GPU only, fused SGD); compile = torch.compile "
                        "with mode reduce-overhead on a GPU, the aot_eager backend on the CPU; the same losses "
                        "and weights as off within float rounding; one process only; not restored by --resume "
                        "(default: off)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 on CUDA instead of bf16 autocast (default: bf16)")
    p.add_argument("--eval-batch-size", default=1000, type=int, help="images per evaluation batch (default: 1000)")
    p.add_argument("--eval-every", default=1, type=int,
                   help="evaluate validation accuracy every N epochs for the training curve; 0 = only at the end (default: 1)")
    # --- files ---
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint path (default: <checkpoint-dir>/<arch>_baseline.pt)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in the checkpoint, with its settings (default: off)")
    return add_common_args(p)


def main(args):
    return api.train(TrainOptions.from_args(args))


if __name__ == "__main__":
    run(main, get_args_parser())
