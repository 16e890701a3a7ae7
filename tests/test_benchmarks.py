"""The GPU suite cannot rot: `benchmarks/gpu_suite.py --tiny` runs every section on the CPU in about a
minute and writes one JSON report with device, torch version, date and each measurement."""
import json

import pytest

from conftest import run_script


@pytest.mark.slow
def test_gpu_suite_tiny(tmp_path):
    """Every section is there with positive timings and sane ratios; the training run reached some accuracy."""
    out = tmp_path / "suite.json"
    run_script("benchmarks/gpu_suite.py", "--tiny", "--device", "cpu", "--out", out, timeout=900)
    r = json.loads(out.read_text())
    assert r["tiny"] is True and r["torch_version"] and r["date"] and r["device"].startswith("cpu")
    assert {"loader", "recipes", "training", "stages", "qat"} <= set(r)
    assert r["loader"]["plain_s_per_epoch"] > 0 and r["loader"]["ratio"] > 0
    assert all(v["s_per_epoch"] > 0 for v in r["recipes"].values()) and len(r["recipes"]) >= 3
    t = r["training"]
    assert t["s_per_epoch"] > 0 and t["projected_200_epochs_s"] == 200 * t["s_per_epoch"] and 0 <= t["test_acc"] <= 100
    assert set(r["stages"]) == {"2_per_layer_analysis.py", "3_greedy_search.py", "4_create_baselines.py"}
    assert all(v["wall_s"] > 0 and v["evaluations"] > 0 for v in r["stages"].values())
    assert r["qat"]["float_epoch_s"] > 0 and r["qat"]["ratio"] > 0


def test_no_vnni_emulation_smoke(quick_stage1, tmp_path):
    """benchmarks/no_vnni_emulation.py on the session's quick checkpoint: both weight ranges and both K orders,
    every integer conv of ResNet-20 emulated; in range 7 no pair can saturate, whatever the data."""
    out = tmp_path / "emu.json"
    run_script("benchmarks/no_vnni_emulation.py", "--checkpoint", quick_stage1["checkpoint"], "--device", "cpu",
               "--images", 4, "--calib-images", 64, "--results-dir", tmp_path, "--out", out)
    r = json.loads(out.read_text())
    assert r["images"] == 4 and set(r["ranges"]) == {"7", "8"} and "vnni" in r["machine"]["cpu"]
    for rng in ("7", "8"):
        assert set(r["ranges"][rng]) == {"hwc", "chw"}
        for e in r["ranges"][rng].values():
            assert e["convs"] == 21 and len(e["per_conv"]) == 21 and e["pairs"] > 0
            assert e["outputs"] == sum(c["outputs"] for c in e["per_conv"])
    for e in r["ranges"]["7"].values():
        assert e["saturated_pairs"] == 0 and e["outputs_changed"] == 0 and e["max_abs_pair_sum"] <= 2 * 255 * 63
        assert all(-63 <= c["weight_levels"][0] and c["weight_levels"][1] <= 63 for c in e["per_conv"])


def test_ptq_methods_smoke(quick_stage1, tmp_path):
    """benchmarks/ptq_methods.py on the session's quick checkpoint with tiny fits (5 steps, so no accuracy is
    asserted): a row per configuration and method, intervals that bracket their estimates, drops paired against
    float, the fits cached, and the ablation scored on the search images, never on test."""
    out = tmp_path / "ptq.json"
    run_script("benchmarks/ptq_methods.py", "--checkpoint", quick_stage1["checkpoint"], "--device", "cpu", "--quick",
               "--configs", "uniform_w4a4", "uniform_w3", "--ptq-iterations", 5, "--ptq-images", 16, "--ablate", "5x16",
               "--corrections", "none", "bn", "--correction-images", 64,
               "--ptq-cache", tmp_path / "cache", "--results-dir", tmp_path, "--out", out)
    r = json.loads(out.read_text())
    assert 0 <= r["float_test_acc"] <= 100 and r["quantization"]["logits"] == "float"
    assert [(x["config"], x["method"], x["correction"]) for x in r["results"]] == [
        (c, m, k) for m in ("nearest", "adaround", "block") for c in ("uniform_w4a4", "uniform_w3") for k in ("none", "bn")]
    by = {(x["config"], x["method"], x["correction"]): x for x in r["results"]}
    assert by["uniform_w4a4", "nearest", "bn"]["test_acc"] != by["uniform_w4a4", "nearest", "none"]["test_acc"]
    assert r["correction_images"] == 64
    for x in r["results"]:
        assert x["search_images"] > 0 and 0 <= x["search_acc"] <= 100
        lo, hi = x["test_drop_ci95"]
        assert lo <= x["test_drop"] <= hi and x["test_acc_ci95"][0] <= x["test_acc"] <= x["test_acc_ci95"][1]
        assert x["test_drop"] == pytest.approx(r["float_test_acc"] - x["test_acc"]) and x["seconds"] >= 0
    ab = r["ablation"]
    assert ab["set"] != "test" and [x["setting"] for x in ab["rows"]] == ["nearest", "5x16"]
    assert all("search_acc" in x and "test_acc" not in x for x in ab["rows"])
    assert list((tmp_path / "cache").glob("ptq-adaround-*.pt")) and list((tmp_path / "cache").glob("ptq-block-*.pt"))
    assert r["block"]["method"] == "block" and r["block"]["pairs"] > 0
    blk = by["uniform_w3", "block", "bn"]
    assert set(blk["search_gain_vs"]) == {"nearest", "adaround"} and by["uniform_w3", "nearest", "bn"]["search_gain_vs"] == {}
    assert blk["search_gain_vs"]["nearest"]["gain"] == pytest.approx(
        blk["search_acc"] - by["uniform_w3", "nearest", "bn"]["search_acc"]) and blk["search_gain_vs"]["nearest"]["se"] >= 0


def test_ptq_methods_measures_both_tensor_range_calibrations(quick_stage1, tmp_path):
    """--act-calibs mse kl: each method and configuration under both ranges, the kl rows' gains paired against the
    mse rows; a configuration whose tensors are float scores the same under both; the calibrations are recorded."""
    out = tmp_path / "ptq.json"
    run_script("benchmarks/ptq_methods.py", "--checkpoint", quick_stage1["checkpoint"], "--device", "cpu", "--quick",
               "--configs", "uniform_w4a4", "uniform_w3", "--methods", "nearest", "--corrections", "none",
               "--act-calibs", "mse", "kl", "--act-calib-images", 64, "--correction-images", 64, "--results-dir", tmp_path,
               "--out", out)
    r = json.loads(out.read_text())
    by = {(x["config"], x["act_calib"]): x for x in r["results"]}
    assert list(by) == [(c, a) for a in ("mse", "kl") for c in ("uniform_w4a4", "uniform_w3")]
    assert by["uniform_w3", "kl"]["test_acc"] == by["uniform_w3", "mse"]["test_acc"]
    kl, mse = by["uniform_w4a4", "kl"], by["uniform_w4a4", "mse"]
    assert set(kl["search_gain_vs"]) == {"nearest"} and mse["search_gain_vs"] == {}
    assert kl["search_gain_vs"]["nearest"]["gain"] == pytest.approx(kl["search_acc"] - mse["search_acc"])
    cal = r["activation_calibration"]
    assert "multipliers" in cal["kl"] and "multipliers" not in cal["mse"] and "then kl" in cal["kl"]["method"]
    assert cal["kl"]["tensors"] != cal["mse"]["tensors"]


def test_per_layer_speed_counts_agree(quick_stage1, tmp_path):
    """benchmarks/per_layer_speed.py on the session's quick checkpoint, nearest rounding so nothing is fitted: the
    cached evaluator's correct counts equal those of every candidate in full and of every candidate placed from
    scratch and corrected as the export does; --no-baselines times only the two cached runs and says so in its JSON."""
    common = ["--checkpoint", quick_stage1["checkpoint"], "--device", "cpu", "--quick", "--bits", 4, "--a-bits", 8,
              "--ptq", "nearest", "--correction-images", 64, "--images", 60, "--results-dir", tmp_path]
    full, short = tmp_path / "full.json", tmp_path / "short.json"
    run_script("benchmarks/per_layer_speed.py", *common, "--out", full)
    r = json.loads(full.read_text())
    assert r["candidates"] > 0 and r["images"] == 60 and r["quantization"]["correction"] == "bn"
    assert r["identical_counts"] == {"no_cache": r["candidates"], "placed": r["candidates"]}
    assert all(v > 0 for v in r["seconds"].values()) and r["correction_cost"] > 0
    run_script("benchmarks/per_layer_speed.py", *common, "--no-baselines", "--out", short)
    s = json.loads(short.read_text())
    assert s["identical_counts"] is None and s["seconds"]["placed"] is None and s["seconds"]["no_cache"] is None
    assert s["candidates"] == r["candidates"] and s["seconds"]["cached_uncorrected"] > 0


def test_qat_ablation_smoke(quick_stage1, tmp_path):
    """benchmarks/qat_ablation.py on the session's quick checkpoint, one epoch: variants judged on the confirm
    images (never test) with paired differences from default that bracket their estimates; default and the seed
    variants under stage 4's checkpoint names; --evaluate-only rescoring the finished files gives the same
    numbers, and refuses a variant never trained."""
    out, ck = tmp_path / "abl.json", tmp_path / "ck"
    common = ("--checkpoint", quick_stage1["checkpoint"], "--device", "cpu", "--quick", "--epochs", 1,
              "--checkpoint-dir", ck, "--results-dir", tmp_path)
    run_script("benchmarks/qat_ablation.py", *common, "--variants", "default", "seed1", "start_post_training",
               "--out", out)
    r = json.loads(out.read_text())
    assert r["chosen_on"].endswith("confirm") and r["configuration"] == "uniform_w4a4"
    assert sorted(p.name for p in ck.glob("qat_*.pt")) == [
        "qat_uniform_w4a4.pt", "qat_uniform_w4a4__start_post_training.pt", "qat_uniform_w4a4_seed1.pt"]
    v = r["variants"]
    assert v["start_post_training"]["recipe"]["start"] == "adaround" and v["default"]["recipe"]["start"] == "nearest"
    for name in ("seed1", "start_post_training"):
        c = v[name]["confirm"]
        lo, hi = c["diff_vs_default_ci95"]
        assert lo <= c["diff_vs_default"] <= hi
        assert c["diff_vs_default"] == pytest.approx(c["acc"] - v["default"]["confirm"]["acc"])
    assert "test" not in json.dumps({n: {k: x for k, x in row.items() if k in ("confirm", "search")}
                                     for n, row in v.items()})
    again = tmp_path / "again.json"
    run_script("benchmarks/qat_ablation.py", *common, "--variants", "default", "seed1", "start_post_training",
               "--evaluate-only", "--out", again)
    r2 = json.loads(again.read_text())
    assert {n: x["confirm"] for n, x in r2["variants"].items()} == {n: x["confirm"] for n, x in v.items()}
    based = tmp_path / "based.json"     # another base recipe: its own names, which stage 4 never reuses
    run_script("benchmarks/qat_ablation.py", *common, "--base", "lr0.0003", "--variants", "default", "scales_fixed",
               "--out", based)
    rb = json.loads(based.read_text())["variants"]
    assert (ck / "qat_uniform_w4a4__lr0.0003.pt").exists() and (ck / "qat_uniform_w4a4__lr0.0003+scales_fixed.pt").exists()
    assert rb["default"]["recipe"]["lr"] == rb["scales_fixed"]["recipe"]["lr"] == 0.0003
    assert rb["scales_fixed"]["recipe"]["scales"] == "fixed" and rb["default"]["recipe"]["scales"] == "learned"
    bad = run_script("benchmarks/qat_ablation.py", *common, "--variants", "distill", "--evaluate-only",
                     "--out", tmp_path / "bad.json", check=False)
    assert bad.returncode != 0 and "train the variant distill first" in bad.stderr and "Traceback" not in bad.stderr


FAKE_PEER = '''#!{python}
"""Stands in for AIMET's Python: answers uniform 8-bit (every weight and every tensor it was handed) in 1 s."""
import json, sys
from pathlib import Path
job = Path(sys.argv[2])
spec = json.loads((job / "job.json").read_text())
tensors = ["input"] + spec["kernels"][:-1]           # every tensor but the logits, named after its kernel
layers = [k for k in spec["kernels"] if k != "pool"]
(job / "aimet.json").write_text(json.dumps({{
    "search_seconds": 1.0, "setup_seconds": 0.5, "float_acc": {{}}, "switched_off": ["x"],
    "answer": {{"w": {{n: 8 for n in layers}}, "a": {{t: 8 for t in tensors}}}},
    "scores": {{"aimet": {{"search_acc": 50.0, "test_acc": 50.0}}, "aiqs": {{"search_acc": 40.0, "test_acc": 40.0}}}}}}))
'''


def test_peer_aimet_without_aimet_writes_nothing(tmp_path):
    """No AIMET environment: a clear message, exit 0, no JSON."""
    out = tmp_path / "peer.json"
    p = run_script("benchmarks/peer_aimet.py", "--peer-python", tmp_path / "missing" / "python", "--out", out)
    assert "AIMET is not installed here" in p.stdout and not out.exists()


def test_peer_aimet_harness_with_a_stand_in_peer(quick_stage1, tmp_path):
    """The whole harness, AIMET's side replaced by a stand-in that answers uniform W8A8: AI-QS's quick search
    runs, both answers are scored in AI-QS's simulator and priced, the stand-in's answer costs exactly what the
    cost model says W8A8 (logits float) costs, and BitOps are MACs x 8 x 8."""
    import stat
    import sys

    from models import build_model
    from quant.cost import CostModel, kernel_table
    fake = tmp_path / "peer-python"
    fake.write_text(FAKE_PEER.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "peer.json"
    run_script("benchmarks/peer_aimet.py", "--peer-python", fake, "--checkpoint", quick_stage1["checkpoint"], "--quick",
               "--work", tmp_path / "work", "--out", out, timeout=900)
    r = json.loads(out.read_text())
    keys = {"fused_ai", "fp32_fused_ai", "bitops", "test_acc", "test_drop", "confirm_passed", "search_seconds"}
    assert keys <= set(r["aiqs"]) and keys <= set(r["aimet"])
    table = kernel_table(build_model("resnet20", shortcut="B"), "generic")
    w8a8 = {**table.space.uniform(8, 8), ("a", "linear"): 32}
    assert r["aimet"]["fused_ai"] == pytest.approx(CostModel.named("fused").cost(table, w8a8)["ai"], rel=1e-12)
    assert r["aimet"]["bitops"] == 64 * sum(li.macs for li in table.layers)
    assert r["aimet"]["fp32_bitops"] == 32 * 32 * sum(li.macs for li in table.layers)
    assert r["aimet"]["search_seconds"] == 1.0 and r["aimet"]["aimet_simulator"]["test_acc"] == 50.0
    assert r["aiqs"]["search_seconds"] > 0 and r["aiqs"]["answer_from"] in ("greedy", "pareto")
    # the speed levers' run: its own stage 2 (the Fisher estimate) and stage 3 (ranked by it), scored the same way
    lev = r["aiqs_levers"]
    assert keys <= set(lev) and lev["search_seconds"] > 0 and lev["aimet_simulator"] is None
    assert lev["flags"]["stage2"] == ["--signal", "fisher"] and "--rank-by" in lev["flags"]["stage3"]
    s2 = json.loads((tmp_path / "work" / "aiqs_levers" / "02_per_layer.json").read_text())
    s3 = json.loads((tmp_path / "work" / "aiqs_levers" / "03_search.json").read_text())
    assert s2["signal"]["name"] == "fisher" and s3["rank_by"] == "fisher"
    # the greedy alone: no Pareto answer, and its confirm test is not split with one (z of one sequence)
    assert s3["pareto"] is None and lev["answer_from"] == "greedy"
    if s3["greedy"]["confirm"]:
        from quant.confirm import CONFIRM_Z
        assert s3["greedy"]["confirm"]["z"] == pytest.approx(CONFIRM_Z)
    assert lev["same_answer_as_aiqs"] == (lev["config"] == r["aiqs"]["config"])
    for side in ("aiqs", "aimet", "aiqs_levers"):
        x = r[side]
        assert isinstance(x["confirm_passed"], bool) and x["test_images"] == r["images"]["test"]
        assert x["test_drop_ci95"][0] <= x["test_drop"] <= x["test_drop_ci95"][1]
        assert x["confirm_passed"] == (x["confirm_drop"] + r["confirm_z"] * x["confirm_drop_se"] <= r["max_drop"] + 1e-9)


def _stage2_table(rows_w, rows_a, column):
    """A minimal stage-2 results file: one weight layer and one tensor, `column` at each width."""
    from utils.io import SCHEMA_VERSIONS
    common = {"stage": "2", "schema_version": SCHEMA_VERSIONS["2"], "checkpoint": "c.pt", "eval_images": 10,
              "bits": [8, 4], "a_bits": [8, 4], "quantization": {"ptq": "nearest"}, "signal": {"name": column}}
    return {**common, "layers": [{"name": "conv1", "results": [{"bits": b, column: v} for b, v in rows_w]}],
            "tensors": [{"name": "input", "results": [{"a_bits": b, column: v} for b, v in rows_a]}]}


def test_fisher_vs_kl_ratios_and_refusals(tmp_path):
    """benchmarks/fisher_vs_kl.py: the median ratio estimate / measured per kind and width, float rows and zero
    KLs left out; tables of different images are refused with one paragraph, and nothing is written."""
    m, f, other, out = (tmp_path / n for n in ("m.json", "f.json", "o.json", "out.json"))
    m.write_text(json.dumps(_stage2_table([(8, 0.01), (4, 0.1), (32, 0.0)], [(8, 0.0), (4, 0.2)], "kl")))
    f.write_text(json.dumps(_stage2_table([(8, 0.02), (4, 0.1), (32, 0.0)], [(8, 0.5), (4, 0.1)], "fisher")))
    run_script("benchmarks/fisher_vs_kl.py", m, f, "--out", out)
    r = json.loads(out.read_text())
    assert r["candidates"] == 3 and r["measured_signal"] == {"name": "kl"}
    assert {k: v["median_ratio"] for k, v in r["by_kind_and_width"].items()} == pytest.approx(
        {"layers:8": 2.0, "layers:4": 1.0, "tensors:4": 0.5})
    o = _stage2_table([(8, 0.02)], [(4, 0.1)], "fisher")
    other.write_text(json.dumps({**o, "eval_images": 20}))
    bad = run_script("benchmarks/fisher_vs_kl.py", m, other, "--out", tmp_path / "no.json", check=False)
    assert bad.returncode != 0 and "eval_images" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "no.json").exists()
