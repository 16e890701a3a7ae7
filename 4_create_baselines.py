"""Stage 4: evaluate the float model, uniform weight widths and the searched configurations
on the validation split and the test set, with the AI of each.

    python 4_create_baselines.py
    python 4_create_baselines.py --bits 8 4

Reads the checkpoint and results/03_search.json; writes results/04_baselines.json.
"""
import argparse

from utils.stages.create_baselines import create_baselines
from utils.cli import add_common_args, run
from utils.stages.common import add_model_args, add_quant_args


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_quant_args(p, "4")  # --bits: the uniform widths to compare (quantizer settings come from stage 3)
    return add_common_args(p)


def main(args):
    return create_baselines(args)


if __name__ == "__main__":
    run(main, get_args_parser())
