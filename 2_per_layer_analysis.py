"""Stage 2: per-layer sensitivity. Quantize one layer at a time to each candidate width (its
weights, and with --a-bits its input activations) and measure, on the search images, the accuracy
drop against the float model with its standard error, the cross-entropy increase and the KL
divergence from the float outputs.

    python 2_per_layer_analysis.py
    python 2_per_layer_analysis.py --a-bits 8 6 4
    python 2_per_layer_analysis.py --checkpoint resnet20A.th --shortcut A --normalization imagenet --bits 8 4 2
    torchrun --nproc_per_node 4 2_per_layer_analysis.py --a-bits 8 6 4      # candidates sharded

Reads the checkpoint stage 1 recorded in results/01_baseline.json (or --checkpoint); writes
results/02_per_layer.json.
"""
import argparse

from utils import api
from utils.options import SensitivityOptions
from utils.cli import add_common_args, run
from utils.stages.common import add_model_args, add_quant_args


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_args(p, "2")
    return add_common_args(p)


def main(args):
    return api.sensitivity(SensitivityOptions.from_args(args))


if __name__ == "__main__":
    run(main, get_args_parser())
