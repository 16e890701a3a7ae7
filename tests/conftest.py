"""Shared fixtures: ONE quick synthetic stage-1 run (and stage 2 on it) per test session.

Tests that only read these outputs use them directly; tests that write (stale inputs, edited
JSON, other stages) copy what they need into their own tmp_path, so the shared folder stays as
the stages wrote it.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One intra-op thread: on the shared, busy 2-core machine two threads per process ran the quick
# stages about 4x slower than one (and the results are identical).
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The quick pipeline of the tests: --quick on synthetic data, plus a 200-image validation split and
# two candidate widths, which keep stages 2-3 to seconds (with the default 1,000 images and five
# widths stage 3 alone runs minutes on CPU).
QUICK_VAL_SIZE = 200
QUICK_BITS = (4, 2)
COMMON = ("--quick", "--device", "cpu", "--seed", "0")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread in the test process too, for the whole session: on busy shared cores it
    is several times faster, and module-scoped fixtures (set up before any per-test fixture) run
    with the same thread count as the tests that compare against them, so bit-identity checks
    hold on machines with more cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stderr_tail(stderr: str, chars: int = 6000) -> str:
    """The end of a failed run's stderr with its progress bars left out, so that they cannot crowd out the cause."""
    lines = stderr.replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines if not line.rstrip().endswith(("it/s]", "s/it]")))[-chars:]


def run_script(script, *args, check=True, timeout=600, env=None):
    """Run a stage script as the user would; returns the CompletedProcess (text output)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env=env or SUBPROCESS_ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stderr (tail) ---\n"
                             f"{stderr_tail(p.stderr)}")
    return p


@pytest.fixture(scope="session")
def quick_stage1(tmp_path_factory):
    """Stage 1 --quick --dataset synthetic, once per session: {root, results, checkpoints,
    checkpoint, proc}."""
    root = tmp_path_factory.mktemp("quick_pipeline")
    out = {"root": root, "results": root / "results", "checkpoints": root / "checkpoints"}
    out["checkpoint"] = out["checkpoints"] / "resnet20_baseline.pt"
    out["stage1_args"] = (*COMMON, "--dataset", "synthetic", "--val-size", QUICK_VAL_SIZE)
    out["proc"] = run_script("1_train_baseline.py", *out["stage1_args"], "--results-dir", out["results"],
                             "--checkpoint-dir", out["checkpoints"])
    return out


@pytest.fixture(scope="session")
def quick_stage2(quick_stage1):
    """Stage 2 --quick on the session's checkpoint, written next to 01_baseline.json."""
    s = quick_stage1
    args = (*COMMON, "--bits", *QUICK_BITS)
    proc = run_script("2_per_layer_analysis.py", *args, "--results-dir", s["results"],
                      "--checkpoint-dir", s["checkpoints"])
    return {**s, "stage2_args": args, "stage2_proc": proc}


@pytest.fixture(scope="module")
def net():
    """A random ResNet-8 (B), its folded copy and 48 random images (uint8 and normalized by test_adaround.NORM):
    the learned-rounding tests' network (test_adaround.py, test_blockwise.py)."""
    import torch
    from models import build_model
    from quant.fold import fold_bn
    from utils.train import Normalizer
    torch.manual_seed(0)
    model = build_model("resnet8", "B").eval()
    g = torch.Generator().manual_seed(1)
    x_u8 = torch.randint(0, 256, (48, 32, 32, 3), generator=g, dtype=torch.uint8)
    norm = Normalizer([0.5] * 3, [0.25] * 3, "cpu")
    return {"model": model, "folded": fold_bn(model).eval(), "x_u8": x_u8, "x": norm(x_u8)}
