"""The whole pipeline end to end on synthetic data, as a user runs it: stages 1-5 as subprocesses
with --quick --device cpu into a temporary folder, then the contents of every results JSON checked
against the definitions they claim to follow. Three runs: weight-only (ResNet-20), joint weight +
activation widths on the same checkpoint, and run_pipeline.sh on the other architectures.

Stages 1-2 of the weight-only run come from the session fixtures in conftest.py (shared with
test_reliability.py).
"""
import json
import re
import shutil
import subprocess

import pytest
import torch

from conftest import COMMON, QUICK_BITS, QUICK_VAL_SIZE, REPO, SUBPROCESS_ENV, run_script
from models import build_model, resnet20
from quant.confirm import CONFIRM_Z
from quant.cost import CostModel, kernel_table
from quant.widths import FLOAT_BITS, FORMAT, A, W
from utils.io import SCHEMA_VERSIONS, sha256_file
from utils.stages.common import QUICK_CORRECTION_IMAGES

TOL = 1e-9  # the searches' own feasibility tolerance (quant.stats.FEASIBILITY_TOL)
FUSED = CostModel.named("fused")
PLOTS = ("pareto", "sensitivity", "bit_allocation", "search_trajectory", "roofline", "training_curve")
FILES = {"1": "01_baseline.json", "2": "02_per_layer.json", "3": "03_search.json", "4": "04_baselines.json"}
A_BITS = (8, 4)
QAT_CONFIGS = ("fp32", "uniform_w4a4", "greedy", "pareto")
CONFIRM_IMAGES, SELECT_IMAGES = round(0.4 * QUICK_VAL_SIZE), round(0.2 * QUICK_VAL_SIZE)
SEARCH_IMAGES = QUICK_VAL_SIZE - CONFIRM_IMAGES - SELECT_IMAGES   # the rest: the confirm and select splits


def read_results(folder):
    return {k: json.loads((folder / f).read_text()) for k, f in FILES.items()}


@pytest.fixture(scope="module")
def pipeline(quick_stage2):
    s = quick_stage2
    common = (*COMMON, "--results-dir", s["results"], "--checkpoint-dir", s["checkpoints"])
    procs = {"3": run_script("3_greedy_search.py", *common), "4": run_script("4_create_baselines.py", *common),
             "5": run_script("5_generate_plots.py", "--no-progress", "--results-dir", s["results"])}
    return {**s, "procs": procs, "res": read_results(s["results"]),
            "paths": {k: s["results"] / f for k, f in FILES.items()}}


@pytest.fixture(scope="module")
def joint(quick_stage1, tmp_path_factory):
    """Stages 2-5 with activation widths too, on the session's checkpoint (found through 01_baseline.json)."""
    results = tmp_path_factory.mktemp("joint") / "results"
    results.mkdir()
    shutil.copy(quick_stage1["results"] / FILES["1"], results / FILES["1"])
    common = (*COMMON, "--results-dir", results)
    run_script("2_per_layer_analysis.py", *common, "--bits", "4", "--a-bits", *A_BITS)
    ckpts = results.parent / "qat"
    procs = {"3": run_script("3_greedy_search.py", *common, "--audit-pruning", 3),
             "4": run_script("4_create_baselines.py", *common, "--checkpoint-dir", ckpts, "--qat-epochs", 1,
                             "--qat-configs", *QAT_CONFIGS, "--qat-start", "post-training"),
             "5": run_script("5_generate_plots.py", "--no-progress", "--results-dir", results)}
    return {"results": results, "procs": procs, "res": read_results(results), "checkpoint": quick_stage1["checkpoint"],
            "qat_dir": ckpts}


@pytest.fixture(scope="module")
def table():
    return kernel_table(resnet20("B"))


@pytest.fixture(scope="module")
def names(table):
    return list(table.space.layers)


def model_ai(table, partial):
    return FUSED.ai(table, table.space.full(partial))


def holds(res, entry):
    """The budget as stage 3 defines it: drop + z * SE <= max_drop."""
    return entry["drop"] + res["budget"]["z"] * entry["drop_se"] <= res["max_drop"] + TOL


def declared_segments(model):
    """{layer or tensor: segment} from the model's own declarations."""
    kernels = {k.name: k for k in model.kernels()}
    out = {"input": model.segments()[0].name}
    for seg in model.segments():
        for k in seg.kernels:
            out.update({n: seg.name for n in (*kernels[k].layers, kernels[k].writes)})
    return out


# ---------------------------------------------------------------- common to every results file

@pytest.mark.parametrize("stage", ["1", "2", "3", "4"])
def test_stage_header_and_provenance(pipeline, stage):
    r = pipeline["res"][stage]
    assert r["stage"] == stage and r["schema_version"] == SCHEMA_VERSIONS[stage]
    prov = r["provenance"]
    for key in ("args", "inputs", "git_commit", "torch_version", "device", "seconds", "world_size"):
        assert key in prov, key
    assert prov["torch_version"] == torch.__version__ and prov["world_size"] == 1
    assert prov["device"].startswith("cpu")
    assert isinstance(prov["seconds"], (int, float)) and prov["seconds"] > 0
    assert prov["args"]["quick"] is True and prov["args"]["device"] == "cpu"
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", prov["git_commit"])
    for name, inp in prov["inputs"].items():
        assert re.fullmatch(r"[0-9a-f]{64}", inp["sha256"]), name
    assert r["dataset"]["name"] == "synthetic" and r["dataset"]["synthetic"] is True
    assert r["dataset"]["quick"] is True
    if stage != "1":   # one cost model, recorded once per file
        assert r["cost_model"] == {"name": "fused", "batch_size": 1, "target": "generic",
                                   "convention": r["cost_model"]["convention"]}
        assert r["target"] == "generic" and "kernel" in r["cost_model"]["convention"]


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
    assert r["model_args"] == {"arch": "resnet20", "shortcut": "B", "num_classes": 10}
    assert r["params"] == 272_474
    assert r["val_acc"] > 50  # the synthetic set is learnable in one quick epoch (chance: 10%)
    ck = torch.load(pipeline["checkpoint"], map_location="cpu", weights_only=True)
    assert ck["finished"] is True and ck["epoch"] == 1
    assert r["dataset"]["split"]["val_sha256"] == ck["data"]["split"]["val_sha256"]


# ---------------------------------------------------------------- stage 2

def test_stage2_per_layer_table(pipeline, table, names):
    r = pipeline["res"]["2"]
    assert r["bits"] == list(QUICK_BITS) and r["a_bits"] == [] and r["tensors"] == []
    # 40% and 20% of the validation images are held back as the confirm and select splits: stage 2 never sees them
    assert r["eval_split"] == "val" and r["eval_images"] == SEARCH_IMAGES
    assert r["dataset"]["confirm"]["images"] == CONFIRM_IMAGES and r["dataset"]["select"]["images"] == SELECT_IMAGES
    # The search part is 40% of stage 1's validation images (and stage 2 evaluates BN-folded).
    n1 = pipeline["res"]["1"]["val_acc"] * QUICK_VAL_SIZE / 100
    assert n1 - (QUICK_VAL_SIZE - SEARCH_IMAGES) - 2 <= r["baseline_val_acc"] * SEARCH_IMAGES / 100 <= n1 + 2
    assert [l["name"] for l in r["layers"]] == names
    declared = declared_segments(resnet20("B"))
    assert r["segments"] == declared and all(l["segment"] == declared[l["name"]] for l in r["layers"])
    assert r["quantization"]["weights"] == "BN-folded"
    step = 100.0 / SEARCH_IMAGES
    info = {li.name: li for li in table.layers}
    for layer in r["layers"]:
        assert layer["params"] == info[layer["name"]].weights and layer["macs"] == info[layer["name"]].macs
        assert [x["bits"] for x in layer["results"]] == list(QUICK_BITS)
        for x in layer["results"]:
            assert set(x) >= {"bits", "val_acc", "drop", "drop_se", "kl", "loss_increase", "model_ai"}
            assert x["drop"] == pytest.approx(r["baseline_val_acc"] - x["val_acc"], abs=1e-9)
            assert x["val_acc"] / step == pytest.approx(round(x["val_acc"] / step), abs=1e-6)  # k of N images
            assert x["kl"] >= 0 and x["drop_se"] >= 0
            assert x["model_ai"] == model_ai(table, {(W, layer["name"]): x["bits"]})
            assert x["model_ai"] > r["fp32_ai"]
    assert r["fp32_ai"] == model_ai(table, {}) and round(r["fp32_ai"], 2) == 26.99
    assert any(x["drop"] > 0 for l in r["layers"] for x in l["results"])  # 2 bits hurts somewhere


# ---------------------------------------------------------------- stage 3

def check_chain(r, table):
    """The confirm chain: the Pareto part holds only candidates above the greedy sequence's last AI, in rising AI,
    and is tested only when every greedy configuration passed; its answer then has more AI than the greedy's."""
    g, p = r["greedy"], r["pareto"]
    gc, pc = g["confirm"], p["confirm"]
    passed_all = gc["first_failure"] is None and len(gc["tested"]) == gc["sequence"]
    assert pc["reached"] == (passed_all and pc["sequence"] > 0)
    if not pc["reached"]:
        assert pc["tested"] == [] and pc["accepted"] == -1 and not p["confirm_passed"]
        assert p["ai"] == pytest.approx(r["fp32_ai"]) and "why_float" in p
    else:
        assert p["ai"] > g["ai"] or not p["confirm_passed"]
    assert gc["evaluations"] <= len(gc["tested"]) and pc["evaluations"] <= len(pc["tested"])
    assert r["best"] == max(("greedy", "pareto"), key=lambda m: (r[m]["ai"], r[m]["val_acc"]))


def check_search(r, res2, table, names, joint):
    """What both runs' 03_search.json must satisfy."""
    # the search's own margin is smaller when the confirm step carries the guarantee (README)
    assert r["max_drop"] == 1.0 and r["budget"]["z"] == r["search_margin"]["z"] == 0.0 and r["joint"] is joint
    # both searches confirmed as one chain (greedy, then Pareto above it) at the one-sequence level
    assert r["confirm_z"] == pytest.approx(CONFIRM_Z) and r["confirm_chain"]["order"] == ["greedy", "pareto"]
    assert r["baseline_val_acc"] == res2["baseline_val_acc"]
    assert r["bits"] == sorted(res2["bits"], reverse=True) or r["bits"] == res2["bits"]   # taken from stage 2
    assert [l["name"] for l in r["layers"]] == names
    assert r["search_space"]["weight_groups"] == 22 and r["search_space"]["tensor_groups"] == (24 if joint else 0)
    g, p = r["greedy"], r["pareto"]
    traj = g["trajectory"]
    assert traj[0]["step"] == 0 and traj[0]["name"] is None and traj[0]["ai"] == pytest.approx(r["fp32_ai"])
    cfg = table.space.uniform(FLOAT_BITS, FLOAT_BITS)
    for a, b in zip(traj, traj[1:]):
        assert b["ai"] > a["ai"] and b["step"] == a["step"] + 1
    for entry in traj[1:]:   # replaying the moves from all-float gives the reported configuration and AI
        group = (entry["kind"], entry["name"])
        assert entry["from_bits"] == cfg[group] and entry["bits"] < entry["from_bits"]
        assert joint or entry["kind"] == W
        cfg[group] = entry["bits"]
        assert entry["ai"] == pytest.approx(FUSED.ai(table, cfg), rel=1e-12)
        if entry["verified"]:
            assert holds(r, entry), entry
    answer = g["search_answer"]
    assert answer["config"]["format"] == FORMAT and table.space.parse(answer["config"]) == cfg   # file form
    assert holds(r, answer) and answer["ai"] == pytest.approx(FUSED.ai(table, cfg), rel=1e-12)
    assert g["evaluations"] <= r["max_evaluations"]
    # the confirm step: the trajectory in order on held-back images, the last pass before the first failure
    c = g["confirm"]
    assert r["confirm_images"] == g["confirm_images"] > 0 and c["sequence"] == len(traj) - 1
    tested = c["tested"]
    assert [t["index"] for t in tested] == list(range(len(tested)))
    assert all(t["passed"] for t in tested[:-1]) and (c["first_failure"] is None) == tested[-1]["passed"]
    for t in tested:
        assert t["passed"] == (t["drop"] + c["z"] * t["se"] <= r["max_drop"] + TOL)
    accepted = table.space.uniform(FLOAT_BITS, FLOAT_BITS)
    for entry in traj[1:c["accepted"] + 2]:
        accepted[entry["kind"], entry["name"]] = entry["bits"]
    assert table.space.parse(g["config"]) == accepted and g["confirm_passed"] == (c["accepted"] >= 0)
    assert g["ai"] == pytest.approx(FUSED.ai(table, accepted), rel=1e-12) and g["ai"] <= answer["ai"] + 1e-9
    assert c["cut_back"] == (c["accepted"] != c["sequence"] - 1)
    if g["confirm_passed"]:
        assert g["confirm_drop"] == tested[c["accepted"]]["drop"] and g["confirm_drop_se"] == tested[c["accepted"]]["se"]
    # Pareto: its own answer never below the greedy's (seeded by it), within budget, AI exact; confirmed the same way
    assert p["search_answer"]["ai"] >= answer["ai"] - 1e-9 and holds(r, p["search_answer"])
    assert p["ai"] == pytest.approx(FUSED.ai(table, table.space.parse(p["config"])), rel=1e-12)
    assert p["ai"] <= p["search_answer"]["ai"] + 1e-9 and p["confirm"]["z"] == r["confirm_z"]
    check_chain(r, table)
    front = p["frontier"]
    assert len(front) >= 2 and p["frontier_size"] >= len(front)
    assert all(b["estimated"] >= a["estimated"] - 1e-12 and b["ai"] > a["ai"] for a, b in zip(front, front[1:]))
    for v in p["verified"]:
        assert v["feasible"] == (v["drop"] + r["budget"]["z"] * v["drop_se"] <= r["max_drop"] + TOL)
    assert r["evaluations"] <= r["max_evaluations"]


def test_stage3_weight_only(pipeline, table, names):
    check_search(pipeline["res"]["3"], pipeline["res"]["2"], table, names, joint=False)


def test_stage3_joint(joint, table, names):
    r = joint["res"]["3"]
    check_search(r, joint["res"]["2"], table, names, joint=True)
    assert r["a_bits"] == list(A_BITS)
    assert any(v.get("a", FLOAT_BITS) < FLOAT_BITS for k, v in r["greedy"]["config"].items() if k != "format")
    audit = r["pruning_audit"]
    assert audit["checked"] == min(3, audit["skipped"]) and 0 <= audit["would_have_held"] <= audit["checked"]
    assert "pruning_audit" not in joint["res"]["4"]


def test_stage2_joint_tensor_table(joint, table):
    """--a-bits: one row per tensor (24 for ResNet-20 B: the image, every kernel's output, pool, logits), each
    quantized where it is written, with its elements, traffic and signedness, and the AI of that one change;
    the logits are listed, marked, and measured only in float (no rows): they are not narrowed by default."""
    r = joint["res"]["2"]
    assert [t["name"] for t in r["tensors"]] == list(table.space.tensors) and len(r["tensors"]) == 24
    assert r["tensors"][0]["name"] == "input" and r["tensors"][0]["signed"] and not r["tensors"][1]["signed"]
    for t in r["tensors"]:
        assert t["elements"] == table.elements[t["name"]] and t["traffic"] == table.traffic(t["name"])
        logits = t["name"] == "linear"
        assert t.get("logits", False) == logits
        assert [x["a_bits"] for x in t["results"]] == ([] if logits else list(A_BITS))
        for x in t["results"]:
            assert x["model_ai"] == model_ai(table, {(A, t["name"]): x["a_bits"]})
    cal = r["activation_calibration"]
    assert cal["set"] == "train" and set(cal["tensors"]) == set(table.space.tensors)
    assert all(set(v["scales"]) == {str(b) for b in A_BITS} for v in cal["tensors"].values())
    assert r["quantization"]["logits"] == "float"


# ---------------------------------------------------------------- stage 4

def check_baselines(r, r3, table, names, expected):
    by = {c["name"]: c for c in r["configs"]}
    assert [c["name"] for c in r["configs"]] == expected
    assert by["fp32"]["ai"] == model_ai(table, {}) and by["fp32"]["test_drop"] == 0
    for c in r["configs"]:
        m = re.fullmatch(r"uniform_w(\d)(?:a(\d))?", c["name"])
        if m:   # every tensor, the image included, at the uniform width; the logits float (the default)
            w, a = int(m.group(1)), int(m.group(2) or FLOAT_BITS)
            assert table.space.parse(c["config"]) == table.space.uniform(w, a, FLOAT_BITS)
            assert c["ai"] == FUSED.ai(table, table.space.uniform(w, a, FLOAT_BITS))   # exactly
            assert 0 <= c["tie_rate"] <= 1
        lo, hi = c["test_acc_ci95"]
        assert lo <= c["test_acc"] <= hi and 0 <= lo and hi <= 100
        dlo, dhi = c["test_drop_ci95"]
        assert dlo <= c["test_drop"] + 1e-9 and c["test_drop"] - 1e-9 <= dhi
        assert c["test_drop"] == pytest.approx(by["fp32"]["test_acc"] - c["test_acc"], abs=1e-9)
    for m in ("greedy", "pareto"):
        c = by[m]
        assert c["config"] == r3[m]["config"] and c["ai"] == pytest.approx(r3[m]["ai"], rel=1e-12)
        assert c["val_acc"] == r3[m]["val_acc"]   # stage 4 re-evaluates without the cache: same numbers
        assert c["search_drop"] == r3[m]["drop"] and c["confirm_drop"] == r3[m]["confirm_drop"]
        assert c["confirm_passed"] == r3[m]["confirm_passed"] and c["confirm_images"] == r3["confirm_images"] > 0
        assert c["budget_holds_on_test"] == (c["test_drop"] <= r["max_drop"])
    search, report, confirm = r["images"]["search"], r["images"]["report"], r["images"]["confirm"]
    assert search["set"] == "train" and report["set"] == "test" and len(search["indices"]) == search["images"]
    assert confirm["set"] == "train" and not set(confirm["indices"]) & set(search["indices"])
    select = r["images"]["select"]
    assert select["set"] == "train" and len(select["indices"]) == select["images"] == SELECT_IMAGES
    assert not set(select["indices"]) & (set(search["indices"]) | set(confirm["indices"]))
    for row in r["comparisons"]["greedy"]:
        lo, hi = row["acc_diff_ci95"]
        assert lo <= row["acc_diff"] <= hi
        assert (row["vs"] in r["dominates"]["greedy"]) == (row["relation"] == "dominates")
        if row["relation"] == "dominates":
            assert lo > 0 and by["greedy"]["ai"] >= by[row["vs"]]["ai"]
    assert r["report_split"] == "test"


def test_stage4_weight_only(pipeline, table, names):
    """Without --qat-epochs, no entry has any qat_* field: the output of the code without fine-tuning."""
    r = pipeline["res"]["4"]
    check_baselines(r, pipeline["res"]["3"], table, names, ["fp32"] + [f"uniform_w{b}" for b in QUICK_BITS]
                    + ["greedy", "pareto"])
    assert not any(k.startswith("qat") for c in r["configs"] for k in c)
    assert not list(pipeline["checkpoints"].glob("qat_*.pt"))


def test_stage4_fine_tuning(joint):
    """--qat-epochs 1 --qat-configs ...: exactly those entries gain qat_* fields (PTQ fields kept), one equal to an
    earlier one reuses its fine-tune, each fine-tune has an
    atomic, weights_only-loadable checkpoint keyed by base, configuration and recipe, and QAT drops are
    paired against the fine-tuned fp32 and the original float."""
    from utils.qat import load_qat
    by = {c["name"]: c for c in joint["res"]["4"]["configs"]}
    for name, c in by.items():
        assert ("qat_test_acc" in c) == (name in QAT_CONFIGS)
        assert "test_acc" in c and "val_acc" in c
    for name in QAT_CONFIGS:
        c = by[name]
        assert c["qat_epochs"] == 1 and 0 <= c["qat_test_acc"] <= 100 and 0 <= c["qat_val_acc"] <= 100
        lo, hi = c["qat_test_acc_ci95"]
        assert lo <= c["qat_test_acc"] <= hi
        assert c["qat_test_drop"] == pytest.approx(by["fp32"]["qat_test_acc"] - c["qat_test_acc"], abs=1e-9)
        assert c["qat_test_drop_vs_float"] == pytest.approx(by["fp32"]["test_acc"] - c["qat_test_acc"], abs=1e-9)
        twin = next((t for t in QAT_CONFIGS[:QAT_CONFIGS.index(name)] if by[t]["config"] == c["config"]), None)
        assert (c["qat_status"] == f"reused: same configuration and recipe as {twin}") == (twin is not None)
        assert c["qat_checkpoint"].endswith(f"qat_{twin or name}.pt")
        assert (joint["qat_dir"] / f"qat_{name}.pt").exists() == (twin is None)
        model, ck = load_qat(joint["qat_dir"] / f"qat_{twin or name}.pt")
        assert ck["finished"] and ck["key"]["config"] == c["config"] and ck["recipe"]["epochs"] == 1
        assert ck["key"]["base_sha256"] == sha256_file(joint["checkpoint"])
        assert (c["qat_budget_test"] is None) == (c["qat_answer"] == "post-training" or name == "fp32")
    r4 = joint["res"]["4"]
    assert r4["qat_selected_on"] == "select" and r4["qat_recipe"]["start"] == "adaround"   # --qat-start post-training, --ptq adaround
    assert not list(joint["qat_dir"].glob("*.tmp"))


def test_stage3_min_ai(joint, tmp_path):
    """--min-ai X: the "pareto" entry is the most accurate of the evaluated frontier points with at least X times
    the FP32 AI (source "min-ai"), with its confirm drop measured but never cut back; an AI no configuration
    reaches is a one-paragraph error that leaves no file."""
    results = tmp_path / "results"
    shutil.copytree(joint["results"], results)
    (results / FILES["3"]).unlink()
    common = (*COMMON, "--results-dir", results, "--checkpoint-dir", joint["qat_dir"])
    run_script("3_greedy_search.py", *common, "--min-ai", 5)
    r = json.loads((results / FILES["3"]).read_text())
    p = r["pareto"]
    assert r["greedy"] is None and p["source"] == "min-ai" and r["min_ai"]["x_fp32"] == 5
    assert p["ai"] >= 5 * r["fp32_ai"] and all(v["ai"] >= 5 * r["fp32_ai"] for v in p["verified"])
    assert p["val_acc"] == max(v["val_acc"] for v in p["verified"])
    assert 1 <= len(p["verified"]) == r["min_ai"]["evaluated"] <= 24 and p["confirm_images"] > 0
    assert p["confirm_passed"] == (p["confirm_drop"] + r["confirm_z"] * p["confirm_drop_se"] <= r["max_drop"])
    (results / FILES["3"]).unlink()
    bad = run_script("3_greedy_search.py", *common, "--min-ai", 1000, check=False)
    assert bad.returncode != 0 and "--min-ai 1000" in bad.stderr and "Traceback" not in bad.stderr
    assert not (results / FILES["3"]).exists()


def test_stage3_objective_bitops(joint, table, tmp_path):
    """--objective bitops: the greedy alone (the Pareto search needs additive costs), its answer priced in both
    BitOps (exactly quant.cost.bitops) and AI, recorded with the objective; with --method pareto it is a
    one-paragraph error that leaves no file."""
    from quant.cost import bitops
    results = tmp_path / "results"
    shutil.copytree(joint["results"], results)
    (results / FILES["3"]).unlink()
    common = (*COMMON, "--results-dir", results, "--checkpoint-dir", joint["qat_dir"])
    run_script("3_greedy_search.py", *common, "--objective", "bitops")
    r = json.loads((results / FILES["3"]).read_text())
    g = r["greedy"]
    assert r["objective"] == "bitops" and r["pareto"] is None and r["best"] == "greedy"
    cfg = table.space.parse(g["config"], FLOAT_BITS, source="test")
    assert g["bitops"] == bitops(table, cfg) <= r["fp32_bitops"] == bitops(table, table.space.uniform(32, 32))
    assert r["provenance"]["args"]["objective"] == "bitops"
    (results / FILES["3"]).unlink()
    bad = run_script("3_greedy_search.py", *common, "--objective", "bitops", "--method", "pareto", check=False)
    assert bad.returncode == 2 and "--objective bitops" in bad.stderr and "Traceback" not in bad.stderr
    assert not (results / FILES["3"]).exists()


def test_stage2_fisher_signal_and_stage3_levers(joint, quick_stage1, tmp_path):
    """Stage 2 --signal fisher evaluates no candidate (one evaluation: the float model) and writes only the Fisher
    column, equal to what --signal both writes next to the measured ones (same seed, same labels drawn). Stage 3
    --rank-by fisher --early-stop --confirm-step searches on it, thins the confirm sequence and records the early
    stop (the quick search split is smaller than its first look, so nothing stops here; tests/test_fisher.py
    stops configurations). --rank-by kl on a Fisher-only table is a one-paragraph error that writes no file;
    stage 5 plots what it can."""
    both, fisher = tmp_path / "both", tmp_path / "fisher"
    for d, signal in ((both, "both"), (fisher, "fisher")):
        d.mkdir()
        shutil.copy(quick_stage1["results"] / FILES["1"], d / FILES["1"])
        run_script("2_per_layer_analysis.py", *COMMON, "--results-dir", d, "--bits", "4", "--a-bits", *A_BITS,
                   "--signal", signal)
    rb, rf = (json.loads((d / FILES["2"]).read_text()) for d in (both, fisher))
    assert rf["evaluations"] == 1 and rf["signal"]["name"] == "fisher" and rf["signal"]["columns"] == ["fisher"]
    assert rb["evaluations"] > 1 and "fisher" in rb["signal"]["columns"] and "kl" in rb["signal"]["columns"]
    assert rf["signal"]["fisher"]["correction"].split(":")[0] == rf["quantization"]["correction"]
    for kind in ("layers", "tensors"):
        for eb, ef in zip(rb[kind], rf[kind]):
            for b, f in zip(eb["results"], ef["results"]):
                assert set(f) == {"bits" if kind == "layers" else "a_bits", "fisher", "model_ai"}
                assert f["fisher"] == b["fisher"] >= 0.0 and b["kl"] >= 0.0
    bad = run_script("3_greedy_search.py", *COMMON, "--results-dir", fisher, "--rank-by", "kl", check=False)
    assert bad.returncode == 2 and "--signal" in bad.stderr and "Traceback" not in bad.stderr
    assert not (fisher / FILES["3"]).exists()
    run_script("3_greedy_search.py", *COMMON, "--results-dir", fisher, "--rank-by", "fisher", "--early-stop",
               "--eval-batch-size", 8, "--confirm-step", 0.05)
    r = json.loads((fisher / FILES["3"]).read_text())
    c = r["greedy"]["confirm"]
    assert c["ai_step"] == 0.05 and c["sequence"] <= c["search_sequence"] and c["evaluations"] <= c["sequence"]
    e = r["early_stop"]
    assert r["rank_by"] == "fisher" and e["z"] == 3.0 and e["stopped"] >= 0
    assert e["images_saved"] == e["stopped"] * r["eval_images"] - e["images_evaluated"]
    assert r["greedy"]["config"] and r["greedy"]["drop"] + r["budget"]["z"] * r["greedy"]["drop_se"] \
        <= r["max_drop"] + TOL
    run_script("5_generate_plots.py", "--no-progress", "--results-dir", fisher)   # a Fisher-only table plots


def test_stats_correction_through_stages_2_to_4_and_the_export(joint, quick_stage1, tmp_path, capsys):
    """BN re-estimation is the default: the joint run's stage 2 records it (on the quick run's 64 calibration
    images) and stages 3-4 follow it; --stats-correction none measures other KLs on the same images and is
    followed the same way. The export follows stage 2's record, measures the correction on the same images, and
    its check (ONNX Runtime against the corrected fake-quant model) passes."""
    d = tmp_path / "none"
    d.mkdir()
    shutil.copy(quick_stage1["results"] / FILES["1"], d / FILES["1"])
    common = (*COMMON, "--results-dir", d)
    run_script("2_per_layer_analysis.py", *common, "--bits", "4", "--a-bits", *A_BITS, "--stats-correction", "none")
    run_script("3_greedy_search.py", *common)
    run_script("4_create_baselines.py", *common)
    res = read_results(d)
    for k in ("2", "3", "4"):
        assert joint["res"][k]["quantization"]["correction"] == "bn", k
        recorded = joint["res"][k]["quantization"]["correction_settings"]
        assert recorded == {"images": QUICK_CORRECTION_IMAGES, "set": "train"}, k
        assert res[k]["quantization"]["correction"] == "none" and "correction_settings" not in res[k]["quantization"]

    def kls(r):
        return [x["kl"] for e in r["layers"] + r["tensors"] for x in e["results"]]
    assert len(kls(res["2"])) == len(kls(joint["res"]["2"])) and kls(res["2"]) != kls(joint["res"]["2"])
    import utils.export as X
    capsys.readouterr()
    assert X.main(["--results-dir", str(joint["results"]), "--w-bits", "8", "--a-bits", "8", "--check-images", "32",
                   "--onnx", str(tmp_path / "bn.onnx"), "--device", "cpu"]) == 0
    assert f"bn statistics correction measured here on {QUICK_CORRECTION_IMAGES} training images" in capsys.readouterr().out


def test_stage4_joint(joint, table, names):
    """Joint mode adds exactly uniform W8A8, W4A8 and W4A4 to the weight-only uniforms."""
    check_baselines(joint["res"]["4"], joint["res"]["3"], table, names,
                    ["fp32", "uniform_w4", "uniform_w8a8", "uniform_w4a8", "uniform_w4a4", "greedy", "pareto"])
    by = {c["name"]: c for c in joint["res"]["4"]["configs"]}
    assert by["uniform_w4a4"]["ai"] > by["uniform_w4a8"]["ai"] > by["uniform_w8a8"]["ai"] > 3.9 * by["fp32"]["ai"]


# ---------------------------------------------------------------- stage 5

@pytest.mark.parametrize("which", ["pipeline", "joint"])
def test_stage5_plots_and_summary(request, which):
    run = request.getfixturevalue(which)
    out = run["results"]
    summary = out / "summary.md"
    assert summary.is_file() and "test 95% CI" in summary.read_text()
    made = {p.stem for p in (out / "plots").glob("*.png")}
    assert set(PLOTS) <= made, set(PLOTS) - made
    for name in PLOTS:
        assert (out / "plots" / f"{name}.pdf").stat().st_size > 0
    assert "synthetic" in run["procs"]["5"].stdout
    assert not list(out.rglob("*.tmp"))


def test_no_temp_files_left(pipeline):
    for d in (pipeline["results"], pipeline["checkpoints"]):
        assert not [p for p in d.rglob("*") if p.name.endswith(".tmp")], d


# ---------------------------------------------------------------- other architectures

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet56", "mobilenetv2"])
def test_run_pipeline_on_other_architectures(tmp_path, arch):
    """run_pipeline.sh --quick --dataset synthetic --arch X: every stage runs on the architecture, the
    checkpoint names it, and stages 2-4 found the model through 01_baseline.json."""
    p = subprocess.run(["bash", str(REPO / "run_pipeline.sh"), "--quick", "--dataset", "synthetic", "--arch", arch,
                        "--device", "cpu", "--val-size", "100", "--bits", "2", "--results-dir", tmp_path / "results",
                        "--checkpoint-dir", tmp_path / "ckpt"], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = read_results(tmp_path / "results")
    assert res["1"]["checkpoint"].endswith(f"{arch}_baseline.pt")
    names = list(kernel_table(build_model(arch)).space.layers)
    assert [l["name"] for l in res["2"]["layers"]] == names
    for r in res.values():
        assert r["model_args"]["arch"] == arch
    assert res["3"]["greedy"]["ai"] >= res["3"]["fp32_ai"] and (tmp_path / "results" / "summary.md").is_file()


def test_a_bits_32_is_the_reference_mode(quick_stage2, tmp_path):
    """Stage 2 with --a-bits 32 (float activations) writes exactly the weight-only table: the reference mode
    is what it was without activation widths."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_stage2["results"] / FILES["1"], results / FILES["1"])
    run_script("2_per_layer_analysis.py", *quick_stage2["stage2_args"], "--a-bits", "32", "--results-dir", results)
    a = json.loads((quick_stage2["results"] / FILES["2"]).read_text())
    b = json.loads((results / FILES["2"]).read_text())
    assert a["layers"] == b["layers"] and b["a_bits"] == [] and b["tensors"] == [] and b["activation_calibration"] is None


def test_reference_cost_model_reproduces_the_reference_convention(quick_stage2, tmp_path):
    """--cost-model reference: the reference work's weight-only convention, recorded, 29.85 for ResNet-20 B;
    with --a-bits it is refused (it charges tensors in float), before anything is written."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_stage2["results"] / FILES["1"], results / FILES["1"])
    run_script("2_per_layer_analysis.py", *quick_stage2["stage2_args"], "--cost-model", "reference",
               "--results-dir", results)
    r = json.loads((results / FILES["2"]).read_text())
    assert r["cost_model"]["name"] == "reference" and round(r["fp32_ai"], 2) == 29.85
    p = run_script("2_per_layer_analysis.py", *quick_stage2["stage2_args"], "--cost-model", "reference",
                   "--a-bits", "8", "--results-dir", tmp_path / "other", check=False)
    assert p.returncode == 2 and "reference cost model charges activations in float" in " ".join(p.stderr.split())
    assert not (tmp_path / "other" / FILES["2"]).exists()


def test_comparison_relations():
    """"dominates" only where the paired interval of the accuracy difference excludes zero; more AI within
    noise is "higher AI, accuracy not significantly different"; significant gains against AI are trade-offs."""
    from utils.stages.create_baselines import relation
    ref = [True] * 900 + [False] * 100
    better = [True] * 1000                      # +10 points, interval well above zero
    noisy = [True] * 899 + [False] * 101        # -0.1 points, interval contains zero
    worse = [True] * 850 + [False] * 150        # -5 points

    def rel(ai_a, ai_b, a):
        return relation({"name": "a", "ai": ai_a}, {"name": "b", "ai": ai_b}, [ref if a is None else a], [ref])
    assert rel(2, 1, better)["relation"] == rel(1, 1, better)["relation"] == "dominates"
    assert rel(2, 1, noisy)["relation"] == "higher AI, accuracy not significantly different"
    assert rel(2, 1, worse)["relation"] == rel(1, 2, better)["relation"] == "trade-off"
    assert rel(1, 2, worse)["relation"] == rel(1, 1, noisy)["relation"] == "dominated or equal"
    r = rel(2, 1, better)
    assert r["vs"] == "b" and r["acc_diff"] == pytest.approx(10.0) and r["acc_diff_ci95"][0] > 0


def test_ort_cpu_weight_range_runs_through_every_stage(quick_stage1, tmp_path):
    """Under --target ort-cpu, stage 2 simulates 8-bit weights in range 7 by default and records it; stages 3 and
    4 and the fine-tune read it back (the fine-tuned quantizers are on -63..63), and the export follows it, so
    what is searched is what runs. --weight-range 8 is recorded as given; a bad range is refused by argparse."""
    from utils.qat import load_qat
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_stage1["results"] / FILES["1"], results / FILES["1"])
    common = (*COMMON, "--results-dir", results)
    run_script("2_per_layer_analysis.py", *common, "--target", "ort-cpu")
    run_script("3_greedy_search.py", *common, "--max-evaluations", 3)
    run_script("4_create_baselines.py", *common, "--checkpoint-dir", tmp_path / "qat", "--qat-epochs", 1,
               "--qat-configs", "uniform_w8a8")
    res = read_results(results)
    for k in ("2", "3", "4"):
        assert res[k]["quantization"]["weight_range"] == 7 and res[k]["target"] == "ort-cpu", k
    model, ck = load_qat(tmp_path / "qat" / "qat_uniform_w8a8.pt")
    assert ck["quantization"]["weight_range"] == 7
    q = model.get_submodule("layer2.0.conv1").parametrizations.weight[0]
    assert (q.qmin, q.qmax) == (-63, 63)
    out = tmp_path / "w8a8.onnx"
    import utils.export as X
    assert X.main(["--results-dir", str(results), "--w-bits", "8", "--a-bits", "8", "--check-images", "0",
                   "--onnx", str(out), "--device", "cpu"]) == 0
    import onnx
    from onnx import numpy_helper
    from quant.recipe import Recipe
    from utils.ptq import cached_levels
    proto = onnx.load(str(out))
    meta = {m.key: m.value for m in proto.metadata_props}
    assert json.loads(meta["quantization"])["weight_range"] == 7 and meta["target"] == "ort-cpu"
    # learned rounding (the default) from stage 2's cache: the file's int8 weights are those levels, on -63..63
    r2 = res["2"]
    assert r2["quantization"]["ptq"] == "adaround" and r2["ptq_fit"]["pairs"] == 22
    levels = cached_levels(quick_stage1["checkpoint"], Recipe.from_json(r2["quantization"]), r2["ptq_fit"],
                           REPO / "checkpoints" / "ptq-cache")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name in ("conv1", "layer2.0.conv1", "linear"):
        assert (inits[f"{name}.weight_int8"] == levels[name, 8].numpy()).all()
        assert inits[f"{name}.weight_int8"].max() <= 63
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(quick_stage1["results"] / FILES["1"], other / FILES["1"])
    run_script("2_per_layer_analysis.py", *COMMON, "--results-dir", other, "--target", "ort-cpu",
               "--weight-range", 8, "--bits", 8)
    assert json.loads((other / FILES["2"]).read_text())["quantization"]["weight_range"] == 8
    p = run_script("2_per_layer_analysis.py", *COMMON, "--results-dir", other, "--weight-range", 6, check=False)
    assert p.returncode == 2 and "--weight-range" in p.stderr


def test_quantize_logits_is_measured_searched_and_refused_without_measurements(quick_stage1, joint, tmp_path):
    """--quantize-logits: stage 2 measures the logits like any tensor and records "logits": "quantized", and
    stages 3-4 follow (uniform configurations then quantize them); stage 3 with --quantize-logits on a stage-2
    file that measured them only in float is refused in one paragraph, before anything is written."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_stage1["results"] / FILES["1"], results / FILES["1"])
    common = (*COMMON, "--results-dir", results)
    run_script("2_per_layer_analysis.py", *common, "--bits", 4, "--a-bits", 4, "--quantize-logits")
    r2 = json.loads((results / FILES["2"]).read_text())
    logits = next(t for t in r2["tensors"] if t["name"] == "linear")
    assert r2["quantization"]["logits"] == "quantized" and [x["a_bits"] for x in logits["results"]] == [4]
    run_script("3_greedy_search.py", *common, "--max-evaluations", 3)
    run_script("4_create_baselines.py", *common)
    r4 = json.loads((results / FILES["4"]).read_text())
    w4a4 = next(c for c in r4["configs"] if c["name"] == "uniform_w4a4")
    assert r4["quantization"]["logits"] == "quantized" and w4a4["config"]["linear"]["a"] == 4
    before = sorted(p.name for p in joint["results"].iterdir())
    p = run_script("3_greedy_search.py", *COMMON, "--results-dir", joint["results"], "--quantize-logits", check=False)
    err = " ".join(p.stderr.split())
    assert p.returncode == 2 and "measured the logits only in float" in err and "Traceback" not in err
    assert sorted(p.name for p in joint["results"].iterdir()) == before
