"""Stage 3: search per-layer widths that maximize arithmetic intensity within an accuracy
budget, greedily (as the reference work) and exactly (Pareto frontier by dynamic programming
over layers, verified by real evaluation). Searches (weight, activation) pairs when stage 2
measured activation widths.

    python 3_greedy_search.py                       # both methods, 1.0 point budget
    python 3_greedy_search.py --method pareto --max-drop 0.5

The budget holds out of sample: the search accepts a configuration when its drop on the search images
plus z standard errors stays within --max-drop; then the configurations it passed through, in an
order fixed before, are tested on held-back confirm images, and the last one to pass before the
first failure is the answer (see the README).

Reads the checkpoint and results/02_per_layer.json; writes results/03_search.json.
"""
import argparse

from utils import api
from utils.options import SearchOptions
from utils.cli import add_common_args, run
from utils.stages.common import add_model_args, add_quant_args
from utils.stages.greedy_search import QUICK_MAX_EVALUATIONS, RANK_SIGNALS, SEARCH_Z_WITH_CONFIRM
from quant.stats import BUDGET_Z, EARLY_STOP_MIN_IMAGES, EARLY_STOP_Z


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("search")
    g.add_argument("--method", default="both", choices=("greedy", "pareto", "both"),
                   help="which search to run; with both, the greedy's answer seeds the Pareto one (default: both)")
    g.add_argument("--objective", default="ai", choices=("ai", "bitops"),
                   help="what the greedy maximizes: ai (the cost model's arithmetic intensity) or bitops (fewest "
                        "MACs x weight bits x input bits, AIMET's price; greedy only, the Pareto search adds bytes). "
                        "Answers report both (default: ai)")
    g.add_argument("--max-drop", default=1.0, type=float,
                   help="accuracy budget: points below the float model (default: 1.0)")
    g.add_argument("--z", default=None, type=float,
                   help="the search's margin on its own images: drop + z * SE <= --max-drop. The confirm split "
                        "carries the 5%% guarantee, so the margin can be smaller (default: "
                        f"{SEARCH_Z_WITH_CONFIRM:g} with a confirm split, chosen by simulation; "
                        f"{BUDGET_Z:.3f} = 1.645 * sqrt(2) with --confirm-size 0)")
    g.add_argument("--rank-by", default="kl", choices=tuple(RANK_SIGNALS),
                   help="stage-2 signal that ranks moves and builds the frontier: kl (divergence from the float "
                        "outputs), loss (cross-entropy increase), drop (accuracy), or fisher (the Fisher estimate of "
                        "the KL, from stage 2 --signal fisher or both) (default: kl)")
    g.add_argument("--early-stop", action="store_true",
                   help=f"stop evaluating a configuration once its drop on the search images so far exceeds "
                        f"--max-drop by {EARLY_STOP_Z:g} standard errors (looked at after each --eval-batch-size "
                        f"batch, from {EARLY_STOP_MIN_IMAGES} images on); it counts as infeasible (default: off, "
                        f"every configuration sees every search image)")
    g.add_argument("--confirm-step", default=0.0, type=float, metavar="F",
                   help="the confirm test's AI granularity: of the sequence the search fixed, test only configurations "
                        "with at least (1 + F) times the AI of the last one kept (the answer always), e.g. 0.01; the "
                        "guarantee stands, at most a factor 1 + F of AI is given up (default: 0, every step)")
    g.add_argument("--verify-top-k", default=3, type=int,
                   help="greedy: moves checked by real evaluation per batch, best estimate first (default: 3)")
    g.add_argument("--no-prune-infeasible", action="store_true",
                   help="greedy: re-measure moves found infeasible from a wider configuration (default: off, "
                        "they are skipped)")
    g.add_argument("--no-fast-forward", action="store_true",
                   help="greedy: verify every step from all-float, instead of first bisecting the path the estimate "
                        "alone would take (default: off)")
    g.add_argument("--audit-pruning", default=0, type=int, metavar="N",
                   help="after the greedy, measure N of the moves its pruning rule skipped, from where they were "
                        "skipped, and record how many would have held the budget (default: 0)")
    g.add_argument("--max-evaluations", default=None, type=int,
                   help=f"hard cap on real evaluations (default: none; with --quick: {QUICK_MAX_EVALUATIONS})")
    g.add_argument("--pareto-verify", default=24, type=int,
                   help="pareto: at most this many frontier points evaluated for real (default: 24)")
    g.add_argument("--min-ai", default=None, type=float, metavar="X",
                   help="instead of a budget: the most accurate configuration with at least X times the FP32 AI "
                        "(from the Pareto frontier, --pareto-verify evaluations), to fine-tune in stage 4 (default: "
                        "off)")
    add_model_args(p)
    add_quant_args(p, "3")
    return add_common_args(p)


def main(args):
    return api.search(SearchOptions.from_args(args))


if __name__ == "__main__":
    run(main, get_args_parser())
