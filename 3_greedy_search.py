"""Stage 3: search per-layer weight widths that maximize arithmetic intensity within an
accuracy budget, greedily (as the reference work) and exactly (Pareto frontier by dynamic
programming over layers, verified by real evaluation).

    python 3_greedy_search.py                       # both methods, 1.0 point budget
    python 3_greedy_search.py --method pareto --max-drop 0.5

Reads the checkpoint and results/02_per_layer.json; writes results/03_search.json.
"""
import argparse

from utils.bitsearch import bit_search
from utils.cli import add_common_args, run
from utils.stage import add_model_args, add_quant_args


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("search")
    g.add_argument("--method", default="both", choices=("greedy", "pareto", "both"),
                   help="which search to run (default: both)")
    g.add_argument("--max-drop", default=1.0, type=float,
                   help="accuracy budget: points of validation accuracy the search may lose (default: 1.0)")
    g.add_argument("--verify-top-k", default=3, type=int,
                   help="greedy: moves checked by real evaluation per batch, best estimate first (default: 3)")
    g.add_argument("--pareto-verify", default=10, type=int,
                   help="pareto: at most this many frontier points evaluated for real (default: 10)")
    g.add_argument("--pareto-slack", default=2.0, type=float,
                   help="pareto: verify points whose estimated drop is <= slack x max-drop (default: 2.0)")
    add_model_args(p)
    add_quant_args(p)
    return add_common_args(p)


def main(args):
    return bit_search(args)


if __name__ == "__main__":
    run(main, get_args_parser())
