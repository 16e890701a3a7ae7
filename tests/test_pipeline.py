"""The whole pipeline end to end on synthetic data, as a user runs it: stages 1-4 (and 5 when
5_generate_plots.py exists) as subprocesses with --quick --device cpu into a temporary folder,
then the contents of every results JSON checked against the definitions they claim to follow.

Stages 1-2 come from the session fixtures in conftest.py (shared with test_reliability.py);
this module runs stages 3, 4 and 5 on them once.
"""
import json
import re

import pytest
import torch

from conftest import COMMON, QUICK_BITS, QUICK_VAL_SIZE, REPO, run_script
from models.resnet import resnet20
from utils.ai_calculator import layer_table, model_ai
from utils.stages.create_baselines import dominates
from utils.config import FLOAT_BITS, uniform_config
from utils.io import SCHEMA_VERSION, sha256_file

TOL = 1e-9  # the searches' own feasibility tolerance (utils.search.FEASIBILITY_TOL)
PLOTS = ("pareto", "sensitivity", "bit_allocation", "search_trajectory", "roofline", "training_curve")


@pytest.fixture(scope="module")
def pipeline(quick_stage2):
    s = quick_stage2
    common = (*COMMON, "--bits", *QUICK_BITS, "--results-dir", s["results"], "--checkpoint-dir", s["checkpoints"])
    procs = {"3": run_script("3_greedy_search.py", *common), "4": run_script("4_create_baselines.py", *common)}
    if (REPO / "5_generate_plots.py").exists():
        procs["5"] = run_script("5_generate_plots.py", "--no-progress", "--results-dir", s["results"])
    files = {"1": "01_baseline.json", "2": "02_per_layer.json", "3": "03_search.json", "4": "04_baselines.json"}
    res = {k: json.loads((s["results"] / f).read_text()) for k, f in files.items()}
    return {**s, "procs": procs, "res": res, "paths": {k: s["results"] / f for k, f in files.items()}}


@pytest.fixture(scope="module")
def table():
    return layer_table(resnet20("B"))


@pytest.fixture(scope="module")
def names(table):
    return [info.name for info in table]


def floor_of(res):
    return res["baseline_val_acc"] - res["max_drop"] - TOL


def assert_full_config(cfg, names, ladder):
    assert list(cfg) == names
    assert all(b in (*ladder, FLOAT_BITS) for b in cfg.values()), cfg


# ---------------------------------------------------------------- common to every results file

@pytest.mark.parametrize("stage", ["1", "2", "3", "4"])
def test_stage_header_and_provenance(pipeline, stage):
    r = pipeline["res"][stage]
    assert r["stage"] == stage and r["schema_version"] == SCHEMA_VERSION
    prov = r["provenance"]
    for key in ("args", "inputs", "git_commit", "torch_version", "device", "seconds"):
        assert key in prov, key
    assert prov["torch_version"] == torch.__version__
    assert prov["device"].startswith("cpu")
    assert isinstance(prov["seconds"], (int, float)) and prov["seconds"] > 0
    assert prov["args"]["quick"] is True and prov["args"]["device"] == "cpu"
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", prov["git_commit"])
    for name, inp in prov["inputs"].items():
        assert re.fullmatch(r"[0-9a-f]{64}", inp["sha256"]), name
    assert r["dataset"]["name"] == "synthetic" and r["dataset"]["synthetic"] is True
    assert r["dataset"]["quick"] is True


def test_input_hashes_chain_the_stages(pipeline):
    """Each stage records the sha256 of exactly the files it read (and stage 1 of what it wrote)."""
    res, paths = pipeline["res"], pipeline["paths"]
    ckpt = sha256_file(pipeline["checkpoint"])
    for stage in ("1", "2", "3", "4"):
        assert res[stage]["provenance"]["inputs"]["checkpoint"]["sha256"] == ckpt, stage
    assert set(res["2"]["provenance"]["inputs"]) == {"checkpoint"}
    assert res["3"]["provenance"]["inputs"]["per_layer"]["sha256"] == sha256_file(paths["2"])
    assert res["4"]["provenance"]["inputs"]["search"]["sha256"] == sha256_file(paths["3"])


# ---------------------------------------------------------------- stage 1

def test_stage1_results(pipeline):
    r = pipeline["res"]["1"]
    assert r["epochs"] == 1 and r["batch_size"] == 32 and len(r["history"]) == 1
    assert r["dataset"]["val_size"] == QUICK_VAL_SIZE and r["dataset"]["val_split_images"] == QUICK_VAL_SIZE
    assert r["dataset"]["train_split_images"] == 2000 and r["dataset"]["test_images_used"] == 1000
    assert r["model_args"] == {"arch": "resnet", "depth": 20, "shortcut": "B", "num_classes": 10}
    assert r["params"] == 272_474
    assert r["val_acc"] > 50  # the synthetic set is learnable in one quick epoch (chance: 10%)
    ck = torch.load(pipeline["checkpoint"], map_location="cpu", weights_only=True)
    assert ck["finished"] is True and ck["epoch"] == 1


# ---------------------------------------------------------------- stage 2

def test_stage2_per_layer_table(pipeline, table, names):
    r = pipeline["res"]["2"]
    assert r["bits"] == list(QUICK_BITS)
    assert r["eval_split"] == "val" and r["eval_images"] == QUICK_VAL_SIZE
    # Stage 2 evaluates BN-folded, stage 1 did not: at most a near-tie or two may flip.
    assert r["baseline_val_acc"] == pytest.approx(pipeline["res"]["1"]["val_acc"], abs=2 * 100.0 / QUICK_VAL_SIZE)
    assert 0 <= r["baseline_val_acc"] <= 100
    assert len(r["layers"]) == 22
    assert [l["name"] for l in r["layers"]] == names
    step = 100.0 / QUICK_VAL_SIZE
    for layer, info in zip(r["layers"], table):
        assert layer["params"] == info.weights and layer["macs"] == info.macs
        assert [x["bits"] for x in layer["results"]] == list(QUICK_BITS)
        for x in layer["results"]:
            assert set(x) >= {"bits", "val_acc", "drop", "model_ai"}
            assert x["drop"] == pytest.approx(r["baseline_val_acc"] - x["val_acc"], abs=1e-9)
            assert x["val_acc"] / step == pytest.approx(round(x["val_acc"] / step), abs=1e-6)  # k of N images
            assert x["model_ai"] == model_ai(table, {layer["name"]: x["bits"]})
            assert x["model_ai"] > r["fp32_ai"]
    assert r["fp32_ai"] == model_ai(table, {})
    assert any(x["drop"] > 0 for l in r["layers"] for x in l["results"])  # 2 bits hurts somewhere


# ---------------------------------------------------------------- stage 3

def test_stage3_header(pipeline, names):
    r = pipeline["res"]["3"]
    assert r["max_drop"] == 1.0 and r["bits"] == sorted(QUICK_BITS, reverse=True)
    assert r["baseline_val_acc"] == pipeline["res"]["2"]["baseline_val_acc"]
    assert [l["name"] for l in r["layers"]] == names
    assert r["best"] in ("greedy", "pareto")


def test_greedy_never_exceeds_budget_and_ai_rises(pipeline, table, names):
    r = pipeline["res"]["3"]
    g = r["greedy"]
    traj = g["trajectory"]
    assert traj[0]["step"] == 0 and traj[0]["layer"] is None
    assert traj[0]["val_acc"] == r["baseline_val_acc"] and traj[0]["ai"] == pytest.approx(r["fp32_ai"])
    assert g["steps"] == len(traj) - 1 >= 1  # several layers lose nothing at 2-4 bits here
    for entry in traj:
        assert entry["val_acc"] >= floor_of(r), entry
    for a, b in zip(traj, traj[1:]):
        assert b["ai"] > a["ai"], (a, b)
        assert b["step"] == a["step"] + 1
    # Replaying the moves from all-float gives the reported configuration and AI.
    cfg = {n: FLOAT_BITS for n in names}
    for entry in traj[1:]:
        assert entry["from_bits"] == cfg[entry["layer"]] and entry["bits"] < entry["from_bits"]
        cfg[entry["layer"]] = entry["bits"]
        assert entry["ai"] == pytest.approx(model_ai(table, cfg), rel=1e-12)
    assert g["config"] == cfg
    assert_full_config(g["config"], names, r["bits"])
    assert g["ai"] == pytest.approx(model_ai(table, g["config"]), rel=1e-12) and g["ai"] == traj[-1]["ai"]
    assert g["val_acc"] == traj[-1]["val_acc"] >= floor_of(r)


def test_pareto_frontier_and_choice(pipeline, table, names):
    r = pipeline["res"]["3"]
    p = r["pareto"]
    front = p["frontier"]
    assert len(front) >= 2
    for pt in front:
        assert_full_config(pt["config"], names, r["bits"])
        assert pt["ai"] == pytest.approx(model_ai(table, pt["config"]), rel=1e-12)
    for a, b in zip(front, front[1:]):
        assert b["estimated_drop"] > a["estimated_drop"] - 1e-12 and b["bytes"] < a["bytes"], (a["estimated_drop"], b["estimated_drop"])
    assert front[0]["estimated_drop"] == pytest.approx(0.0, abs=1e-12)
    # The estimate is the sum of the (clamped) per-layer drops of stage 2.
    drops = {l["name"]: {x["bits"]: x["drop"] for x in l["results"]} for l in pipeline["res"]["2"]["layers"]}
    for pt in front:
        est = sum(max(0.0, drops[n][b]) for n, b in pt["config"].items() if b != FLOAT_BITS)
        assert pt["estimated_drop"] == pytest.approx(est, abs=1e-9)
    assert_full_config(p["config"], names, r["bits"])
    assert p["val_acc"] >= floor_of(r)
    assert p["ai"] == pytest.approx(model_ai(table, p["config"]), rel=1e-12)
    measured = [pt for pt in front if pt["val_acc"] is not None]
    assert measured and p["evaluations"] <= 10
    if p["config"] != {n: FLOAT_BITS for n in names}:
        assert any(pt["config"] == p["config"] for pt in measured)
    # Every verified point above the chosen AI (within slack) failed the budget: the choice is the best verified.
    for pt in measured:
        if pt["val_acc"] >= floor_of(r):
            assert pt["ai"] <= p["ai"] + 1e-9


# ---------------------------------------------------------------- stage 4

def test_stage4_configs_and_ai(pipeline, table, names):
    r = pipeline["res"]["4"]
    by = {c["name"]: c for c in r["configs"]}
    expected = ["fp32"] + [f"uniform_w{b}" for b in QUICK_BITS] + ["greedy", "pareto"]
    assert [c["name"] for c in r["configs"]] == expected
    assert by["fp32"]["ai"] == model_ai(table, {})
    for b in QUICK_BITS:
        c = by[f"uniform_w{b}"]
        assert c["config"] == uniform_config(names, b)
        assert c["ai"] == model_ai(layer_table(resnet20("B")), uniform_config(names, b))  # exactly
    s3 = pipeline["res"]["3"]
    for m in ("greedy", "pareto"):
        assert by[m]["config"] == s3[m]["config"]
        assert by[m]["ai"] == pytest.approx(s3[m]["ai"], rel=1e-12)
        # Stage 4 re-evaluates without the activation cache: same split, same numbers.
        assert by[m]["val_acc"] == s3[m]["val_acc"]
    assert by["fp32"]["val_acc"] == pipeline["res"]["2"]["baseline_val_acc"]
    for c in r["configs"]:
        assert 0 <= c["test_acc"] <= 100 and c["val_acc"] is not None
        assert_full_config(c["config"], names, QUICK_BITS)
    assert by["uniform_w2"]["ai"] > by["uniform_w4"]["ai"] > by["fp32"]["ai"]


def test_stage4_dominance_lists(pipeline):
    """`dominates` lists exactly the uniform baselines each searched configuration beats by the
    stated definition, recomputed here independently."""
    r = pipeline["res"]["4"]
    by = {c["name"]: c for c in r["configs"]}
    uniform = [c for c in r["configs"] if c["name"].startswith("uniform_")]

    def beats(a, b):
        return ((a["ai"] > b["ai"] and a["test_acc"] >= b["test_acc"]) or
                (a["test_acc"] > b["test_acc"] and a["ai"] >= b["ai"]))

    assert set(r["dominates"]) == {"greedy", "pareto"}
    for m, beaten in r["dominates"].items():
        assert beaten == [u["name"] for u in uniform if beats(by[m], u)], m
        for u in uniform:
            assert beats(by[m], u) == dominates(by[m], u)
    # the definition itself: nothing dominates itself, and dominance is antisymmetric
    for a in r["configs"]:
        assert not beats(a, a)
        for b in r["configs"]:
            assert not (beats(a, b) and beats(b, a))


# ---------------------------------------------------------------- stage 5

def test_stage5_plots_and_summary(pipeline):
    if "5" not in pipeline["procs"]:
        pytest.skip("5_generate_plots.py does not exist yet")
    out = pipeline["results"]
    summary = out / "summary.md"
    assert summary.is_file() and summary.stat().st_size > 0
    made = {p.stem for p in (out / "plots").glob("*.png")}
    assert set(PLOTS) <= made, set(PLOTS) - made
    for name in PLOTS:
        assert (out / "plots" / f"{name}.pdf").stat().st_size > 0
    assert "synthetic" in pipeline["procs"]["5"].stdout
    assert not list(out.rglob("*.tmp"))


def test_no_temp_files_left(pipeline):
    for d in (pipeline["results"], pipeline["checkpoints"]):
        assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")], d
