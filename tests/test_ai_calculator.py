"""Arithmetic-intensity anchors of the reference work, the cost model against an independent count
(mixed weight/activation widths, batch sizes, both shortcut kinds, every registered architecture),
roofline and the command line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models import arch_names, build_model
from models.resnet import CifarResNet, resnet20
from models.structure import quantizable_layers
from utils import ai_calculator
from utils.ai_calculator import (DEVICES, REFERENCE, CostModel, attainable_flops, layer_bytes, layer_table, model_ai,
                                 model_cost, ridge_point)
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


@pytest.mark.parametrize("arch", arch_names())
def test_every_architecture_matches_flop_counter(arch):
    """The hook-based table counts exactly the FLOPs torch's FlopCounterMode counts, for every
    registered architecture (MobileNetV2's depthwise convs: in_channels / groups MACs per output)."""
    model = build_model(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    table = layer_table(model)
    assert sum(t.flops for t in table) == counter.get_total_flops()
    assert [t.name for t in table] == list(quantizable_layers(model))


def test_mobilenetv2_hand_count():
    """MobileNetV2 (CIFAR): 58 layers, 91,154,944 MACs, counted here from the block table alone."""
    from models.mobilenetv2 import CFG
    macs, hw, cin, layers = 3 * 32 * 9 * 32 * 32, 32, 32, 1            # stem 3x3, 3 -> 32
    for expansion, cout, n, stride in CFG:
        for i in range(n):
            s = stride if i == 0 else 1
            mid = expansion * cin
            out_hw = hw // s
            macs += cin * mid * hw * hw + mid * 9 * out_hw * out_hw + mid * cout * out_hw * out_hw
            layers += 3
            if s == 1 and cin != cout:
                macs += cin * cout * hw * hw
                layers += 1
            cin, hw = cout, out_hw
    macs += 320 * 1280 * hw * hw + 1280 * 10                          # head 1x1 conv, classifier
    layers += 2
    table = layer_table(build_model("mobilenetv2"))
    assert (len(table), sum(t.macs for t in table)) == (layers, macs) == (58, 91_154_944)
    depthwise = [t for t in table if t.name.startswith("layers.") and t.name.endswith(".conv2")]
    assert len(depthwise) == 17 and all(t.macs == t.out_elems * 9 for t in depthwise)


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
    one, two = model_cost(table_b), model_cost(table_b, cost_model=CostModel(batch_size=2))
    assert two["flops"] == 2 * one["flops"]
    assert one["bytes"] < two["bytes"] < 2 * one["bytes"]
    assert two["ai"] > one["ai"]
    assert model_ai(table_b, cost_model=CostModel(a_bits=8)) > model_ai(table_b)


def test_joint_anchors(table_b):
    """With activations at the layer's width: W8A8 = 4.0x, W4A8 = 5.0x, W4A4 = 8.0x FP32 AI (the issue's table);
    weight bits alone can reach at most 1.59x."""
    names = [t.name for t in table_b]
    ai = {wa: model_ai(table_b, {n: {"w": wa[0], "a": wa[1]} for n in names}) for wa in ((8, 8), (4, 8), (4, 4))}
    assert [round(v, 1) for v in ai.values()] == [119.4, 148.9, 238.8]
    assert round(model_ai(table_b, {n: 2 for n in names}) / model_ai(table_b), 2) == 1.59


def hand_table_resnet(depth, shortcut):
    """(name, weights, bias, in_elems, out_elems, macs) of a CIFAR ResNet from the paper's structure alone."""
    n = (depth - 2) // 6
    rows = [("conv1", 3 * 16 * 9, 0, 3 * 1024, 16 * 1024, 3 * 16 * 9 * 1024)]
    cin, hw = 16, 32
    for stage, planes in enumerate((16, 32, 64), start=1):
        for i in range(n):
            stride = 2 if (i == 0 and stage > 1) else 1
            out_hw = hw // stride
            p = f"layer{stage}.{i}"
            rows.append((f"{p}.conv1", cin * planes * 9, 0, cin * hw * hw, planes * out_hw * out_hw,
                         cin * planes * 9 * out_hw * out_hw))
            rows.append((f"{p}.conv2", planes * planes * 9, 0, planes * out_hw ** 2, planes * out_hw ** 2,
                         planes * planes * 9 * out_hw ** 2))
            if shortcut == "B" and (stride != 1 or cin != planes):
                rows.append((f"{p}.shortcut.0", cin * planes, 0, cin * hw * hw, planes * out_hw ** 2,
                             cin * planes * out_hw ** 2))
            cin, hw = planes, out_hw
    return rows + [("linear", 640, 10, 64, 10, 640)]


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_cost_model_exact_against_independent_count(shortcut, batch):
    """Random mixed (w, a) configurations, batch sizes and both shortcut kinds: the cost model's bytes,
    FLOPs and AI equal a count made from the architecture's definition, to the byte."""
    table = layer_table(CifarResNet(20, shortcut))
    hand = hand_table_resnet(20, shortcut)
    assert [(t.name, t.weights, t.bias, t.in_elems, t.out_elems, t.macs) for t in table] == hand
    rng = np.random.default_rng(batch)
    cm = CostModel(a_bits=32, batch_size=batch)
    for _ in range(5):
        cfg = {name: {"w": int(rng.choice([2, 3, 4, 6, 8, 32])), "a": int(rng.choice([4, 6, 8, 32]))}
               for name, *_ in hand if rng.random() < 0.8}
        nbytes = flops = 0
        for name, w, b, i, o, macs in hand:
            wb, ab = (cfg[name]["w"], cfg[name]["a"]) if name in cfg else (32, 32)
            nbytes += w * wb / 8 + b * 4 + (i + o) * ab / 8 * batch
            flops += 2 * macs * batch
        cost = cm.cost(table, cfg)
        assert cost["bytes"] == nbytes and cost["flops"] == flops and cost["ai"] == flops / nbytes


def test_per_layer_rows(table_b):
    config = {"layer3.2.conv2": 2, "layer1.0.conv1": {"w": 8, "a": 6}, "linear": {"a": 8}}
    cost = model_cost(table_b, config)
    rows = {r["name"]: r for r in cost["layers"]}
    assert (rows["layer3.2.conv2"]["w_bits"], rows["layer3.2.conv2"]["a_bits"]) == (2, 32)
    assert (rows["layer1.0.conv1"]["w_bits"], rows["layer1.0.conv1"]["a_bits"]) == (8, 6)
    assert (rows["linear"]["w_bits"], rows["linear"]["a_bits"]) == (32, 8)
    assert rows["conv1"]["w_bits"] == 32
    assert sum(r["bytes"] for r in cost["layers"]) == cost["bytes"]
    assert all(r["ai"] == r["flops"] / r["bytes"] for r in cost["layers"])
    assert model_cost(table_b)["bytes"] - model_cost(table_b, {"layer3.2.conv2": 2})["bytes"] == 36_864 * 30 / 8


def test_default_activation_width_and_charges(table_b):
    """Layers that name no activation width take the cost model's default; `charge` leaves out what
    is not counted; the object round-trips through its JSON record."""
    names = [t.name for t in table_b]
    cm8 = CostModel(a_bits=8)
    assert cm8.ai(table_b, {n: 4 for n in names}) == model_ai(table_b, {n: {"w": 4, "a": 8} for n in names})
    assert cm8.ai(table_b, {"conv1": {"w": 4}}) == model_ai(table_b, {**{n: {"a": 8} for n in names},
                                                                      "conv1": {"w": 4, "a": 8}})
    weights_only = CostModel(charge=("weights",))
    assert weights_only.cost(table_b)["bytes"] == sum(t.weights * 4 for t in table_b)
    assert CostModel.from_json(cm8.to_json()) == cm8 and CostModel.from_json(None) == REFERENCE
    with pytest.raises(UserError):
        CostModel(charge=("weights", "cache"))


def test_old_weight_only_config_file_still_loads(tmp_path, table_b):
    """A pre-activation file {layer: bits} means weight bits with float activations: same AI as before."""
    names = [t.name for t in table_b]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({n: 4 for n in names}))
    from utils.config import load_config
    full = load_config(path, names)
    assert set(full.values()) == {(4, 32)}
    assert round(model_ai(table_b, full), 2) == 45.69


@pytest.mark.parametrize("config", [{"layer9.conv1": 8}, {"conv1": 1}, {"conv1": 16}, {"conv1": 8.0},
                                    {"conv1": {"w": 4, "a": 1}}, {"conv1": {"w": 4, "x": 8}}, {"conv1": "8"}])
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
    assert f"AI {model_ai(layer_table(CifarResNet(32, 'A')), cost_model=CostModel(a_bits=8)):.2f}" in out


def test_cli_joint_config_and_mobilenetv2(tmp_path, capsys):
    """--config with {"w", "a"} entries and --a-bits for the rest; JSON carries the per-layer table and the
    cost model; any registered architecture by name."""
    names = [t.name for t in layer_table(resnet20("B"))]
    path = tmp_path / "joint.json"
    path.write_text(json.dumps({n: {"w": 4, "a": 8} for n in names[1:]} | {"conv1": 8}))
    assert ai_calculator.cli(["--config", str(path), "--a-bits", "8", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["cost_model"]["a_bits"] == 8 and obj["layers"][0]["a_bits"] == 8 and obj["layers"][0]["w_bits"] == 8
    assert all(r["w_bits"] == 4 and r["a_bits"] == 8 for r in obj["layers"][1:])
    assert obj["ai"] == pytest.approx(model_ai(layer_table(resnet20("B")), {**{n: {"w": 4, "a": 8} for n in names},
                                                                             "conv1": {"w": 8, "a": 8}}))
    assert ai_calculator.cli(["--arch", "mobilenetv2", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["model_args"]["arch"] == "mobilenetv2" and len(obj["layers"]) == 58


def test_cli_bad_input_in_process(tmp_path, capsys):
    assert ai_calculator.cli(["--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ai_calculator.cli(["--arch", "mobilenetv2", "--shortcut", "A"]) == 2
    assert "ResNets only" in capsys.readouterr().err
    for argv in (["--arch", "resnet21"], ["--w-bits", "8", "--config", "x.json"], ["--w-bits", "9"],
                 ["--batch-size", "0"], ["--a-bits", "1"]):
        with pytest.raises(SystemExit) as exc:
            ai_calculator.cli(argv)
        assert exc.value.code == 2, argv
