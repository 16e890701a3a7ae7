"""Stage 5: figures and a Markdown summary from the results of stages 1-4.

Reads <results-dir>/01_baseline.json ... 04_baselines.json (no model is evaluated) and writes
<results-dir>/plots/{pareto,sensitivity,bit_allocation,search_trajectory,roofline,
training_curve}.png and .pdf, and <results-dir>/summary.md. A plot whose input is missing is
skipped with a one-line note. Of the common options only --results-dir is used (the others are
accepted so that a pipeline can pass the same flags to every stage). Takes seconds on a CPU;
no GPU, data set or checkpoint is needed.

    python 5_generate_plots.py                      # reads and writes results/
    python 5_generate_plots.py --results-dir runs/synthetic
"""
import argparse

from utils.cli import add_common_args, run
from utils import api
from utils.options import PlotOptions


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: show one)")
    return add_common_args(p)


def main(args):
    out = api.plots(PlotOptions.from_args(args))
    print(f"{len(out['made'])} plots (PNG + PDF) in {out['plots_dir']}: {', '.join(out['made']) or 'none'}")
    if out["skipped"]:
        print(f"skipped (inputs missing, see the notes above): {', '.join(out['skipped'])}")
    if out["summary"] is not None:
        print(f"summary table: {out['summary']}")
    if out["synthetic"]:
        print("these results are from synthetic data: they say nothing about CIFAR-10.")
    return out


if __name__ == "__main__":
    run(main, get_args_parser())
