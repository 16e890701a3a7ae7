"""Stage 4: evaluate the float model, uniform widths and the searched configurations on the
search images and on report images the search never saw (the test set, or its report half), with
95% intervals and the AI of each; optionally fine-tune every one of them (QAT) under one recipe.

    python 4_create_baselines.py
    python 4_create_baselines.py --bits 8 4
    python 4_create_baselines.py --qat-epochs 2                 # fine-tune every configuration
    python 4_create_baselines.py --qat-epochs 15 --qat-configs fp32 uniform_w4a4 greedy --resume
    python 4_create_baselines.py --qat-epochs 2 --qat-seeds 3 --keep-ends 8

Reads the checkpoint and results/03_search.json; writes results/04_baselines.json and, with
--qat-epochs, <checkpoint-dir>/qat_<name>.pt (export one with python -m utils.export).
"""
import argparse

from utils import api
from utils.options import BaselineOptions
from utils.cli import add_common_args, run
from utils.stages.common import add_model_args, add_quant_args
from utils.qat import DEFAULT_FREEZE_BN, DEFAULT_QAT_LR, DEFAULT_QAT_START, QAT_STARTS


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("quantization-aware fine-tuning")
    g.add_argument("--qat-epochs", default=0, type=int,
                   help="fine-tune every compared configuration for N epochs from the float checkpoint, fp32 in "
                        "float (default: 0, post-training only)")
    g.add_argument("--qat-configs", default=None, nargs="+", metavar="NAME",
                   help="fine-tune only these (fp32, uniform_w4, uniform_w4a4, greedy, ...) (default: all)")
    g.add_argument("--qat-lr", default=DEFAULT_QAT_LR, type=float,
                   help=f"peak learning rate per 128 images, cosine to zero (default: {DEFAULT_QAT_LR}, chosen by "
                        f"benchmarks/qat_ablation.py on the confirm images)")
    g.add_argument("--qat-bn", default="kept", choices=("kept", "folded"),
                   help="kept: BN stays during fine-tuning (batch statistics) with each conv weight quantized in "
                        "its folded form, and is folded at the end, so the folded model is what is evaluated and "
                        "exported; folded: fold first and train the folded conv, which collapsed at 3 bits "
                        "(default: kept)")
    g.add_argument("--qat-freeze-bn", default=DEFAULT_FREEZE_BN, type=float, metavar="FRACTION",
                   help="with --qat-bn kept, BN normalizes with its running statistics (frozen) from this fraction "
                        "of the steps on, so the last steps train exactly the folded network that deploys; 1 "
                        f"never freezes, 0 freezes from the start (default: {DEFAULT_FREEZE_BN})")
    g.add_argument("--qat-warmup", default=0.0, type=float, metavar="FRACTION",
                   help="linear learning-rate warm-up over this fraction of the fine-tuning steps (default: 0)")
    g.add_argument("--qat-distill", action="store_true",
                   help="train on KL divergence to the float model's logits instead of the labels (default: off)")
    g.add_argument("--qat-seeds", default=1, type=int, metavar="K",
                   help="fine-tune every configuration with K seeds (data order and augmentation); accuracies "
                        "are reported as the mean over seeds with its standard deviation, and the answer is the "
                        "seed best on the select images (default: 1)")
    g.add_argument("--qat-batch-size", default=128, type=int, help="images per fine-tuning step (default: 128)")
    g.add_argument("--qat-scales", default="learned", choices=("learned", "fixed"),
                   help="quantizer scales learned by LSQ or held at their post-training values (default: learned)")
    g.add_argument("--qat-start", default=DEFAULT_QAT_START, choices=QAT_STARTS,
                   help="nearest: start from round-to-nearest; post-training: from the post-training weights stages 2-4 "
                        "evaluate (learned rounding under --ptq adaround) (default: "
                        f"{DEFAULT_QAT_START})")
    g.add_argument("--keep-ends", default=None, type=int, metavar="BITS",
                   help="uniform configurations keep the first layer's weights, the image, the last layer's "
                        "weights and the tensor it reads (pooled features) at BITS (8, as the literature's W4A4 "
                        "and W3A3 ResNet-20 results do) where they would be narrower; the JSON records it "
                        "(default: off, uniform means uniform)")
    g.add_argument("--resume", action="store_true",
                   help="continue interrupted fine-tunes and reuse finished ones whose base checkpoint, "
                        "configuration and recipe match (default: off, fine-tune afresh)")
    add_model_args(p)
    add_quant_args(p, "4")  # --bits: the uniform widths to compare (quantizer settings come from stage 3)
    return add_common_args(p)


def main(args):
    return api.compare(BaselineOptions.from_args(args))


if __name__ == "__main__":
    run(main, get_args_parser())
