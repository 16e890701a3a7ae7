"""Arithmetic-intensity anchors of the reference work, hand counts, roofline and the command line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models.resnet import CifarResNet, resnet20
from utils import ai_calculator
from utils.ai_calculator import (DEVICES, attainable_flops, layer_bytes, layer_table, model_ai, model_cost,
                                 ridge_point, weight_bytes_saved)
from utils.config import quantizable_layers
from utils.errors import UserError
from utils.io import REPO_ROOT


@pytest.fixture(scope="module")
def table_b():
    return layer_table(resnet20("B"))


@pytest.fixture(scope="module")
def table_a():
    return layer_table(resnet20("A"))


def test_reference_anchors_shortcut_b(table_b):
    assert len(table_b) == 22
    assert sum(layer.macs for layer in table_b) == 40_813_184
    names = [layer.name for layer in table_b]
    assert round(model_ai(table_b), 2) == 29.85
    assert round(model_ai(table_b, {n: 8 for n in names}), 2) == 42.47
    assert round(model_ai(table_b, {n: 4 for n in names}), 2) == 45.69


def test_reference_anchors_shortcut_a(table_a):
    assert len(table_a) == 20
    assert sum(layer.macs for layer in table_a) == 40_551_040
    assert round(model_ai(table_a), 2) == 31.47


def test_flops_match_torch_flop_counter(table_b):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        resnet20("B").eval()(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == 81_626_368
    assert sum(layer.flops for layer in table_b) == 81_626_368
    assert model_cost(table_b)["flops"] == 81_626_368


def test_names_and_order_match_quantizable_layers(table_b, table_a):
    for table, shortcut in ((table_b, "B"), (table_a, "A")):
        assert [layer.name for layer in table] == list(quantizable_layers(resnet20(shortcut)))
    assert table_b[0].name == "conv1" and table_b[-1].name == "linear"
    assert {layer.kind for layer in table_b[:-1]} == {"conv"} and table_b[-1].kind == "linear"


def test_training_mode_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    model.train()
    layer_table(model)
    assert all(m.training for m in model.modules())
    model.eval()
    layer_table(model)
    assert not any(m.training for m in model.modules())


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def test_hand_count_tiny_network():
    conv, lin = layer_table(tiny_net(), input_shape=(1, 3, 8, 8))
    # conv: 4x8x8 = 256 outputs, each 3*3*3 = 27 MACs; linear: 256 in x 5 out
    assert (conv.name, conv.kind, conv.macs, conv.flops) == ("0", "conv", 256 * 27, 2 * 256 * 27)
    assert (conv.weights, conv.bias, conv.in_elems, conv.out_elems) == (108, 4, 192, 256)
    assert (lin.name, lin.kind, lin.macs, lin.weights, lin.bias, lin.in_elems, lin.out_elems) == \
        ("2", "linear", 1280, 1280, 5, 256, 5)
    conv_bytes = 108 * 4 + 4 * 4 + (192 + 256) * 4        # 2240
    lin_bytes = 1280 * 4 + 5 * 4 + (256 + 5) * 4          # 6184
    assert layer_bytes(conv) == conv_bytes and layer_bytes(lin) == lin_bytes
    cost = model_cost([conv, lin])
    assert cost["bytes"] == conv_bytes + lin_bytes
    assert cost["ai"] == pytest.approx(2 * (6912 + 1280) / (conv_bytes + lin_bytes))
    # 4-bit conv weights: bias stays fp32, activations unchanged
    assert model_cost([conv, lin], {"0": 4})["layers"][0]["bytes"] == 108 * 0.5 + 16 + 448 * 4
    # the ai is the ratio of totals, not the mean of per-layer AIs
    assert cost["ai"] != pytest.approx(np.mean([layer["ai"] for layer in cost["layers"]]))


def test_batch_size_layer_table_is_per_sample():
    assert layer_table(tiny_net(), input_shape=(3, 3, 8, 8)) == layer_table(tiny_net(), input_shape=(1, 3, 8, 8))


def test_batch_and_activation_bit_scaling(table_b):
    for info in table_b:
        fixed = info.weights * 4 + info.bias * 4
        act = (info.in_elems + info.out_elems) * 4
        assert layer_bytes(info) == fixed + act
        assert layer_bytes(info, batch_size=2) == fixed + 2 * act        # weights read once per batch
        assert layer_bytes(info, a_bits=8) == fixed + act / 4
        assert layer_bytes(info, w_bits=8, a_bits=8, batch_size=3) == info.weights + info.bias * 4 + 3 * act / 4
    one, two = model_cost(table_b), model_cost(table_b, batch_size=2)
    assert two["flops"] == 2 * one["flops"]
    assert one["bytes"] < two["bytes"] < 2 * one["bytes"]
    assert two["ai"] > one["ai"]
    assert model_ai(table_b, a_bits=8) > model_ai(table_b)


def test_per_layer_rows(table_b):
    config = {"layer3.2.conv2": 2}
    cost = model_cost(table_b, config)
    rows = {r["name"]: r for r in cost["layers"]}
    assert rows["layer3.2.conv2"]["w_bits"] == 2 and rows["conv1"]["w_bits"] == 32
    assert sum(r["bytes"] for r in cost["layers"]) == cost["bytes"]
    assert all(r["ai"] == r["flops"] / r["bytes"] for r in cost["layers"])
    assert weight_bytes_saved(table_b, config) == 36_864 * 30 / 8
    assert model_cost(table_b)["bytes"] - cost["bytes"] == weight_bytes_saved(table_b, config)


@pytest.mark.parametrize("config", [{"layer9.conv1": 8}, {"conv1": 1}, {"conv1": 16}, {"conv1": 8.0}])
def test_bad_config_raises_user_error(table_b, config):
    with pytest.raises(UserError):
        model_cost(table_b, config)


def test_roofline():
    h100 = DEVICES["H100 SXM"]
    ridge = ridge_point("H100 SXM")
    assert ridge == pytest.approx(989e12 / 3.35e12)
    assert attainable_flops(ridge / 2, "H100 SXM") == pytest.approx(ridge / 2 * 3.35e12)
    assert attainable_flops(ridge * 2, h100) == 989e12
    arr = attainable_flops(np.array([1.0, 1e6]), "A100 SXM 80GB")
    assert arr.tolist() == [2.039e12, 312e12]
    assert ridge_point("H200 SXM") < ridge
    assert all(d["note"] and d["peak_flops"] > 0 and d["bandwidth"] > 0 for d in DEVICES.values())
    with pytest.raises(UserError):
        ridge_point("TPU v9")


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """Real `python -m` runs, started before the first test so their seconds of torch import overlap it.

    Only the cases where a separate process matters (stdout holds nothing but the JSON; no
    traceback escapes); the other CLI cases run in-process through the same `cli()`.
    """
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "bad.json").write_text(json.dumps({"layer9.conv1": 4}))
    commands = {
        "fp32": ["--arch", "resnet20", "--shortcut", "B", "--json"],
        "bad": ["--arch", "resnet20", "--config", str(tmp / "bad.json")],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "utils.ai_calculator", *a], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, a in commands.items()}
    finished = {}

    def result(key):
        if key not in finished:
            out, err = procs[key].communicate(timeout=120)
            finished[key] = (procs[key].returncode, out, err)
        return finished[key]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_json(cli_runs):
    code, out, err = cli_runs("fp32")
    assert code == 0, err
    obj = json.loads(out)  # stdout holds only the JSON
    assert round(obj["ai"], 2) == 29.85 and obj["flops"] == 81_626_368
    assert len(obj["layers"]) == 22 and {"name", "flops", "bytes"} <= set(obj["layers"][0])


def test_cli_w_bits_and_config_file(tmp_path, capsys):
    assert ai_calculator.cli(["--arch", "resnet20", "--shortcut", "B", "--w-bits", "8", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["ai"], 2) == 42.47
    names = [layer.name for layer in layer_table(resnet20("B"))]
    path = tmp_path / "int4.json"
    path.write_text(json.dumps({n: 4 for n in names}))
    assert ai_calculator.cli(["--arch", "resnet20", "--shortcut", "B", "--config", str(path), "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["ai"], 2) == 45.69


def test_cli_bad_config_exits_2_without_traceback(cli_runs):
    code, out, err = cli_runs("bad")
    assert code == 2
    assert "Traceback" not in err and "layer9.conv1" in err


def test_cli_table_in_process(capsys):
    assert ai_calculator.cli(["--arch", "resnet32", "--shortcut", "A", "--a-bits", "8"]) == 0
    out = capsys.readouterr().out
    assert "layer3.4.conv2" in out and "shortcut.0" not in out
    assert f"AI {model_ai(layer_table(CifarResNet(32, 'A')), a_bits=8):.2f}" in out


def test_cli_bad_input_in_process(tmp_path, capsys):
    assert ai_calculator.cli(["--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for argv in (["--arch", "resnet21"], ["--w-bits", "8", "--config", "x.json"], ["--w-bits", "9"],
                 ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            ai_calculator.cli(argv)
        assert exc.value.code == 2, argv
