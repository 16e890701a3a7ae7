"""Stage 2: per-layer sensitivity. Quantize one layer at a time to each candidate width and
measure the validation accuracy drop against the float model.

    python 2_per_layer_analysis.py
    python 2_per_layer_analysis.py --checkpoint resnet20A.th --shortcut A --bits 8 4 2

Reads checkpoints/resnet20_baseline.pt; writes results/02_per_layer.json.
"""
import argparse

from utils.cli import add_common_args, run
from utils.stages.per_layer_analysis import per_layer_analysis
from utils.stages.common import add_model_args, add_quant_args


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_args(p, "2")
    return add_common_args(p)


def main(args):
    return per_layer_analysis(args)


if __name__ == "__main__":
    run(main, get_args_parser())
