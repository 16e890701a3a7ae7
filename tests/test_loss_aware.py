"""Loss-aware tensor ranges (quant/loss_aware.py, ``--act-calib kl``): each chosen range is the grid's
KL-minimizing multiple of the MSE range, checked against evaluators built afresh; unlisted tensors keep theirs; the
recipe records the choice (and leaves files and fine-tune keys of MSE ranges as they were); stage 2 records the
multipliers, stage 3 follows them, and bad input is refused."""
import json
import shutil

import pytest
import torch

from conftest import COMMON, QUICK_VAL_SIZE, run_script
from quant.calibrate import calibrate
from quant.cost import kernel_table
from quant.errors import UserError
from quant.evaluation import CachedEvaluator
from quant.loss_aware import loss_aware_ranges, rescaled
from quant.recipe import Recipe
from quant.widths import A

from test_adaround import NORM   # the `net` fixture (conftest.py) normalizes with NORM

GRID = (1.0, 0.5, 2.0, 0.8)


def _kl(net, table, ranges, tensor, bits=4):
    ev = CachedEvaluator(net["model"], table, net["x_u8"], torch.zeros(48, dtype=torch.long), NORM, ranges)
    return ev.evaluate({(A, tensor): bits}).kl


def _scaled(ranges, tensor, m, bits="4"):
    out = {n: {**r, "scales": dict(r["scales"])} for n, r in ranges.items()}
    out[tensor]["scales"][bits] *= m
    return out


def test_each_range_is_the_grids_kl_minimizing_multiple_of_the_mse_range(net):
    table = kernel_table(net["model"], "generic")
    mse = calibrate(net["folded"], "generic", [net["x"]], [4])
    picked = ["conv1", "layer3.0.conv2", "layer3.0.shortcut.0"]
    out, chosen = loss_aware_ranges(net["model"], table, mse, net["x_u8"], NORM, tensors=picked, multipliers=GRID)
    assert set(chosen) == set(picked)
    for name in picked:
        m = chosen[name]["4"]
        assert out[name]["scales"]["4"] == mse[name]["scales"]["4"] * m
        kls = {g: _kl(net, table, _scaled(mse, name, g), name) for g in GRID}   # fresh evaluators, one per multiple
        assert kls[m] == min(kls.values())
        assert m == min(GRID, key=lambda g: kls[g])                            # ties: the first, nearest to 1.0
    assert any(chosen[n]["4"] != 1.0 for n in picked)                          # the choice is not a no-op here
    for name in set(mse) - set(picked):
        assert out[name] == mse[name]
    assert mse["conv1"]["scales"]["4"] == calibrate(net["folded"], "generic", [net["x"]], [4])["conv1"]["scales"]["4"]
    same, ones = loss_aware_ranges(net["model"], table, mse, net["x_u8"], NORM, tensors=picked, multipliers=(1.0,))
    assert same == mse and all(v == {"4": 1.0} for v in ones.values())
    with pytest.raises(ValueError, match="positive"):
        loss_aware_ranges(net["model"], table, mse, net["x_u8"], NORM, multipliers=(1.0, 0.0))


def test_recorded_multipliers_give_the_searched_ranges_exactly(net):
    """rescaled() with the multipliers loss_aware_ranges chose reproduces its ranges bit for bit (the record's string
    widths included); a record that lacks a listed tensor or width, or holds a non-positive multiplier, gives None."""
    table = kernel_table(net["model"], "generic")
    mse = calibrate(net["folded"], "generic", [net["x"]], [8, 4])
    picked = ["conv1", "layer3.0.conv2"]
    out, chosen = loss_aware_ranges(net["model"], table, mse, net["x_u8"], NORM, tensors=picked, multipliers=GRID)
    record = json.loads(json.dumps(chosen))
    again, same = rescaled(mse, record, picked)
    assert again == out and same == chosen
    assert rescaled(mse, {"conv1": record["conv1"]}, picked) is None
    assert rescaled(mse, {**record, "conv1": {"8": record["conv1"]["8"]}}, picked) is None
    assert rescaled(mse, {**record, "conv1": {"8": 1.0, "4": 0.0}}, picked) is None


def test_a_tensor_at_its_base_width_cannot_be_rescaled(net):
    table = kernel_table(net["model"], "generic")
    ranges = calibrate(net["folded"], "generic", [net["x"]], [4])
    ev = CachedEvaluator(net["model"], table, net["x_u8"], torch.zeros(48, dtype=torch.long), NORM, ranges,
                         base_config={(A, "conv1"): 4})
    with pytest.raises(ValueError, match="stale"):
        ev.set_tensor_scale("conv1", 4, 1.0)
    ev.set_tensor_scale("layer1.0.conv1", 4, 0.25)
    assert ev.ranges["layer1.0.conv1"]["scales"]["4"] == 0.25 and ranges["layer1.0.conv1"]["scales"]["4"] != 0.25
    assert float(ev.tensor_quantizer("layer1.0.conv1", 4).scale) == 0.25


def test_recipe_records_the_calibration_and_leaves_mse_files_as_they_were():
    kl = Recipe(ptq="adaround", act_calib="kl", act_calib_images=100)
    assert kl.to_json()["act_calib"] == "kl" and kl.to_json()["act_calib_settings"] == {"images": 100, "set": "train"}
    assert Recipe.from_json(kl.to_json()) == kl and "kl tensor ranges" in kl.describe()
    assert "act_calib" not in Recipe().to_json() and Recipe.from_json(Recipe().to_json()).act_calib == "mse"
    with pytest.raises(UserError, match="not supported"):
        Recipe(act_calib="entropy")
    with pytest.raises(UserError, match="act-calib-images"):
        Recipe(act_calib="kl", act_calib_images=0)


def test_stage2_records_kl_ranges_and_stage3_follows(quick_stage1, tmp_path):
    s = quick_stage1
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(s["results"] / "01_baseline.json", results)
    args = (*COMMON, "--dataset", "synthetic", "--val-size", QUICK_VAL_SIZE, "--bits", "4", "--a-bits", "4",
            "--checkpoint-dir", s["checkpoints"], "--results-dir", results)
    bad = run_script("2_per_layer_analysis.py", *args, "--act-calib", "kl", "--act-calib-images", "100000", check=False)
    assert bad.returncode == 2 and "--act-calib kl needs 100000 calibration images" in bad.stderr
    assert "Traceback" not in bad.stderr and not (results / "02_per_layer.json").exists()
    run_script("2_per_layer_analysis.py", *args)
    mse = json.loads((results / "02_per_layer.json").read_text())
    run_script("2_per_layer_analysis.py", *args, "--act-calib", "kl")
    stage3 = run_script("3_greedy_search.py", *COMMON, "--dataset", "synthetic", "--val-size", QUICK_VAL_SIZE,
                        "--checkpoint-dir", s["checkpoints"], "--results-dir", results)
    s2 = json.loads((results / "02_per_layer.json").read_text())
    s3 = json.loads((results / "03_search.json").read_text())
    cal = s2["activation_calibration"]
    # stage 3 applies stage 2's multipliers to its own MSE ranges rather than searching them again
    assert cal["multipliers_from"] == "searched here" and s3["activation_calibration"]["multipliers_from"] == "the record"
    assert s3["activation_calibration"]["multipliers"] == cal["multipliers"]
    assert "loss-aware tensor ranges" not in stage3.stderr
    assert s2["quantization"]["act_calib"] == "kl" and s3["quantization"]["act_calib"] == "kl"
    assert "then kl" in cal["method"] and s3["activation_calibration"]["tensors"] == cal["tensors"]
    logits = [t["name"] for t in s2["tensors"] if t.get("logits")]
    assert set(cal["multipliers"]) == {t["name"] for t in s2["tensors"]} - set(logits)   # float logits: not searched
    for name, by_bits in cal["multipliers"].items():
        m = by_bits["4"]
        assert cal["tensors"][name]["scales"]["4"] == pytest.approx(
            mse["activation_calibration"]["tensors"][name]["scales"]["4"] * m, rel=1e-12)
