"""What several benchmarks share: the shipped checkpoint's path and the speed levers' stage flags.

No machine path goes into a results JSON: SHIPPED is relative to the working directory.
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED = Path(os.path.relpath(REPO / "pretrained" / "resnet20_cifar10jpeg_30ep.pt"))

# The levers of issue 28 that may change the search's answer, as (stage 2's, stage 3's) flags: the Fisher estimate
# instead of one forward pass per candidate, the greedy ranked by it, each candidate a sequential test, the confirm
# test at 1% AI granularity, and the greedy alone (no Pareto search: its verification evaluations are saved, and
# with one answer competing the confirm test needs no Bonferroni split, z 1.645 instead of 1.960).
# benchmarks/search_speed.py times them; benchmarks/peer_aimet.py runs them beside AIMET.
SPEED_LEVERS = (["--signal", "fisher"],
                ["--rank-by", "fisher", "--early-stop", "--confirm-step", 0.01, "--method", "greedy"])
