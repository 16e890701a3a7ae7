"""Stage 4: evaluate the float model, uniform widths and the searched configurations on the
search images and on report images the search never saw (the test set, or its report half), with
95% intervals and the AI of each; optionally fine-tune every one of them (QAT) under one recipe.

    python 4_create_baselines.py
    python 4_create_baselines.py --bits 8 4
    python 4_create_baselines.py --qat-epochs 2                 # fine-tune every configuration
    python 4_create_baselines.py --qat-epochs 15 --qat-configs fp32 uniform_w4a4 greedy --resume

Reads the checkpoint and results/03_search.json; writes results/04_baselines.json and, with
--qat-epochs, <checkpoint-dir>/qat_<name>.pt (export one with python -m utils.export).
"""
import argparse

from utils.cli import add_common_args, run
from utils.stages.common import add_model_args, add_quant_args
from utils.stages.create_baselines import create_baselines


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("quantization-aware fine-tuning")
    g.add_argument("--qat-epochs", default=0, type=int,
                   help="fine-tune every compared configuration for N epochs from the float checkpoint, fp32 in "
                        "float (default: 0, post-training only)")
    g.add_argument("--qat-configs", default=None, nargs="+", metavar="NAME",
                   help="fine-tune only these (fp32, uniform_w4, uniform_w4a4, greedy, ...) (default: all)")
    g.add_argument("--qat-lr", default=0.001, type=float,
                   help="peak learning rate per 128 images, cosine to zero; the folded network has no BN, and 0.01 "
                        "diverged where 0.001 recovered (default: 0.001)")
    g.add_argument("--qat-batch-size", default=128, type=int, help="images per fine-tuning step (default: 128)")
    g.add_argument("--qat-scales", default="learned", choices=("learned", "fixed"),
                   help="quantizer scales learned by LSQ or held at their post-training values (default: learned)")
    g.add_argument("--resume", action="store_true",
                   help="continue interrupted fine-tunes and reuse finished ones whose base checkpoint, "
                        "configuration and recipe match (default: off, fine-tune afresh)")
    add_model_args(p)
    add_quant_args(p, "4")  # --bits: the uniform widths to compare (quantizer settings come from stage 3)
    return add_common_args(p)


def main(args):
    return create_baselines(args)


if __name__ == "__main__":
    run(main, get_args_parser())
