"""Cost models (fused and reference), the trace of the real tensors, configuration files and the
ai_calculator command line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models import arch_names, build_model, resnet20
from models.structure import INPUT, TARGETS, Read, input_shape, quantizable_layers
from quant.calibrate import calibrate
from quant.cost import DEVICES, CostModel, attainable_flops, kernel_table, layer_table, ridge_point
from quant.fold import fold_bn
from quant.place import quantize_
from quant.trace import trace
from quant.widths import FLOAT_BITS, FORMAT, A, W
from utils import ai_calculator
from utils.config import load_config
from utils.errors import UserError
from utils.io import REPO_ROOT

FUSED = CostModel.named("fused")
REFERENCE = CostModel.named("reference")


@pytest.fixture(scope="module")
def table_b():
    return kernel_table(resnet20("B"))


@pytest.fixture(scope="module")
def table_a():
    return kernel_table(resnet20("A"))


# ---------------------------------------------------------------------------------------------
# the reference convention


def test_reference_anchors_shortcut_b(table_b):
    sp = table_b.space
    assert len(table_b.layers) == 22 and sum(li.macs for li in table_b.layers) == 40_813_184
    assert round(REFERENCE.ai(table_b, sp.uniform(32, 32)), 2) == 29.85
    assert round(REFERENCE.ai(table_b, sp.uniform(8, 32)), 2) == 42.47
    assert round(REFERENCE.ai(table_b, sp.uniform(4, 32)), 2) == 45.69
    assert round(REFERENCE.ai(table_b, sp.uniform(2, 32)) / REFERENCE.ai(table_b, sp.uniform(32, 32)), 2) == 1.59


def test_reference_anchors_shortcut_a(table_a):
    assert len(table_a.layers) == 20 and sum(li.macs for li in table_a.layers) == 40_551_040
    assert round(REFERENCE.ai(table_a, table_a.space.uniform(32, 32)), 2) == 31.47


def test_reference_refuses_narrowed_tensors(table_b):
    cfg = table_b.space.full({(A, "layer1.0.conv1"): 8})
    for fn in (REFERENCE.ai, REFERENCE.cost, REFERENCE.total_bytes):
        with pytest.raises(UserError, match="reference cost model charges activations in float"):
            fn(table_b, cfg)
    with pytest.raises(UserError):
        REFERENCE.group_bytes(table_b, (A, "input"), 8)
    assert REFERENCE.group_bytes(table_b, (A, "input"), FLOAT_BITS) == 0.0


def test_reference_exact_against_independent_count():
    """The reference convention, by hand: per layer weights*w/8 + own bias*4 + (in + out)*4 per image."""
    table = kernel_table(build_model("resnet20", "B"))
    rng = np.random.default_rng(0)
    for batch in (1, 7):
        cm = CostModel.named("reference", batch)
        cfg = table.space.full({(W, li.name): int(rng.choice([2, 4, 8, 32])) for li in table.layers})
        hand = sum(li.weights * cfg[W, li.name] / 8 + li.bias * 4 + (li.in_elems + li.out_elems) * 4 * batch
                   for li in table.layers)
        assert cm.total_bytes(table, cfg) == hand == cm.cost(table, cfg)["bytes"]


# ---------------------------------------------------------------------------------------------
# the fused cost model


# The table (independent counts, every tensor and weight at one width): FP32, W8 with fp32
# tensors, W8A8, W4A8, W4A4. Shortcut B's 1x1 stride-2 projection is charged the quarter of its input it uses
# (issue 27: 26.99, 107.61 and 214.32 for ResNet-20 B, about 0.8% more for ResNet-56 B).
FUSED_ANCHORS = {
    ("resnet20", "B"): (26.99, 36.90, 107.61, 131.00, 214.32),
    ("resnet20", "A"): (27.81, 38.42, 110.94, 135.88, 221.04),
    ("resnet56", "B"): (28.60, 40.31, 114.07, 141.37, 227.26),
    ("mobilenetv2", None): (7.78, 10.94, 30.83, 38.12, 60.93),
}


@pytest.mark.parametrize("arch,shortcut", list(FUSED_ANCHORS))
def test_fused_anchors(arch, shortcut):
    table = kernel_table(build_model(arch, shortcut))
    got = [FUSED.ai(table, table.space.uniform(w, a)) for w, a in ((32, 32), (8, 32), (8, 8), (4, 8), (4, 4))]
    assert got == pytest.approx(FUSED_ANCHORS[arch, shortcut], abs=0.01)
    if (arch, shortcut) == ("resnet20", "B"):
        assert got[4] / got[0] == pytest.approx(7.94, abs=0.01)


def hand_kernels(depth, shortcut, target="generic"):
    """[(kernel, {layer: weights}, bias, [(tensor, elements read)], (tensor, elements written), macs)] of a
    CIFAR ResNet under a target's fusion, from the paper's structure alone, and {tensor: the tensor whose width
    it is moved at}. Under ort-cpu the add is its own kernel, and shortcut A's Slice and Pad (what the export
    writes) are kernels writing copies of the block input's values at its width."""
    n = (depth - 2) // 6
    ks = [("conv1", {"conv1": 3 * 16 * 9}, 16, [(INPUT, 3 * 1024)], ("conv1", 16 * 1024), 3 * 16 * 9 * 1024)]
    prev, cin, hw, width = "conv1", 16, 32, {}
    for stage, planes in enumerate((16, 32, 64), start=1):
        for i in range(n):
            stride = 2 if (i == 0 and stage > 1) else 1
            o = hw // stride
            p = f"layer{stage}.{i}"
            ks.append((f"{p}.conv1", {f"{p}.conv1": cin * planes * 9}, planes, [(prev, cin * hw * hw)],
                       (f"{p}.conv1", planes * o * o), cin * planes * 9 * o * o))
            if stride == 1 and cin == planes:
                sc = (prev, cin * hw * hw)
            elif shortcut == "B":
                # the 1x1 stride-2 projection uses every other row and column: a quarter of its input
                ks.append((f"{p}.shortcut.0", {f"{p}.shortcut.0": cin * planes}, planes, [(prev, cin * o * o)],
                           (f"{p}.shortcut.0", planes * o * o), cin * planes * o * o))
                sc = (f"{p}.shortcut.0", planes * o * o)
            elif target == "generic":   # A: the subsampled input, no padding read
                sc = (prev, cin * o * o)
            else:   # A under ort-cpu: Slice writes the kept quarter, Pad the zero-padded channels
                sub, pad = f"{p}.shortcut.subsample", f"{p}.shortcut.pad"
                ks.append((sub, {}, 0, [(prev, cin * o * o)], (sub, cin * o * o), 0))
                ks.append((pad, {}, 0, [(sub, cin * o * o)], (pad, planes * o * o), 0))
                width[sub] = width[pad] = prev
                sc = (pad, planes * o * o)
            conv2_reads = [(f"{p}.conv1", planes * o * o)] + ([sc] if target == "generic" else [])
            ks.append((f"{p}.conv2", {f"{p}.conv2": planes * planes * 9}, planes, conv2_reads,
                       (f"{p}.conv2", planes * o * o), planes * planes * 9 * o * o))
            prev = f"{p}.conv2"
            if target == "ort-cpu":
                ks.append((f"{p}.add", {}, 0, [(prev, planes * o * o), sc], (f"{p}.add", planes * o * o), 0))
                prev = f"{p}.add"
            cin, hw = planes, o
    ks.append(("pool", {}, 0, [(prev, 64 * 64)], ("pool", 64), 0))
    ks.append(("linear", {"linear": 640}, 10, [("pool", 64)], ("linear", 10), 640))
    return ks, width


@pytest.mark.parametrize("depth,shortcut,target", [(20, "A", "generic"), (20, "B", "generic"), (8, "A", "generic"),
                                                   (32, "B", "generic"), (20, "A", "ort-cpu"), (20, "B", "ort-cpu")])
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_fused_exact_against_independent_count(depth, shortcut, target, batch):
    """Random mixed configurations: the fused cost model's bytes, FLOPs and AI equal a count made from the
    architecture's definition, to the byte; and the search's per-group bytes add up to the same total."""
    table = kernel_table(build_model(f"resnet{depth}", shortcut), target)
    hand, width = hand_kernels(depth, shortcut, target)
    assert table.follows == width
    assert [k.name for k in table.kernels] == [h[0] for h in hand]
    rng = np.random.default_rng(depth * 1000 + batch)
    cm = CostModel.named("fused", batch)
    for _ in range(5):
        cfg = table.space.full({g: int(rng.choice([2, 3, 4, 6, 8, 32])) for g in table.space.groups
                                if rng.random() < 0.8})
        nbytes = flops = 0
        for _, weights, bias, reads, (wt, we), macs in hand:
            nbytes += sum(e * cfg[W, n] / 8 for n, e in weights.items()) + bias * 4
            bits = {t: cfg[A, width.get(t, t)] for t, _ in reads + [(wt, we)]}
            nbytes += (sum(e * bits[t] / 8 for t, e in reads) + we * bits[wt] / 8) * batch
            flops += 2 * macs * batch
        cost = cm.cost(table, cfg)
        assert cost["bytes"] == nbytes and cost["flops"] == flops and cost["ai"] == flops / nbytes
        assert cm.constant_bytes(table) + sum(cm.group_bytes(table, g, b) for g, b in cfg.items()) == nbytes
        assert sum(r["bytes"] for r in cost["rows"]) == nbytes


def test_one_tensor_one_width_shared_by_its_readers(table_b):
    """A tensor read by two kernels (a block input read by conv1 and the projection) is charged once per
    read at its one width, each reader for the elements it uses (the 1x1 stride-2 projection: a quarter):
    narrowing it saves bytes on every reader."""
    t = "layer1.2.conv2"      # the input of layer2.0: read by conv1 and shortcut.0, written once
    readers = [k.name for k in table_b.kernels if any(r == t for r, _ in k.reads)]
    assert readers == ["layer2.0.conv1", "layer2.0.shortcut.0"]
    assert table_b.traffic(t) == (1 + 1 + 0.25) * 16 * 32 * 32    # written, read whole, read a quarter
    base = FUSED.total_bytes(table_b, table_b.space.uniform(32, 32))
    assert base - FUSED.total_bytes(table_b, table_b.space.full({(A, t): 8})) == 2.25 * 16384 * 24 / 8


def test_identity_shortcut_and_pooling_are_charged(table_b):
    conv2 = next(k for k in table_b.kernels if k.name == "layer1.1.conv2")
    assert conv2.reads == (("layer1.1.conv1", 16384), ("layer1.0.conv2", 16384))
    pool = next(k for k in table_b.kernels if k.name == "pool")
    assert pool.reads == (("layer3.2.conv2", 4096),) and pool.writes == ("pool", 64) and pool.flops == 0


def test_ort_cpu_target_has_separate_add_kernels():
    m = resnet20("B")
    gen, ort = kernel_table(m, "generic"), kernel_table(m, "ort-cpu")
    assert len(gen.kernels) == 23 and len(ort.kernels) == 32 and len(ort.space.tensors) == 33
    add = next(k for k in ort.kernels if k.name == "layer2.0.add")
    assert add.reads == (("layer2.0.conv2", 8192), ("layer2.0.shortcut.0", 8192)) and add.flops == 0
    assert gen.flops == ort.flops == 81_626_368
    assert FUSED.ai(ort, ort.space.uniform(8, 8)) < FUSED.ai(gen, gen.space.uniform(8, 8))


def test_cost_model_json_round_trip_and_bad_values():
    """The conventions are classes (no branch on a name): built by name and from their JSON, equal by batch
    size and class; only the fused one prices tensors, and refusing a tensor width is one check."""
    from quant.cost import FusedCost, ReferenceCost
    cm = CostModel.named("reference", 4)
    assert type(cm) is ReferenceCost and type(CostModel.named("fused")) is FusedCost and cm != FusedCost(4)
    assert CostModel.from_json(cm.to_json("generic")) == cm and CostModel.from_json(None) == FUSED
    assert FUSED.prices_tensors and not cm.prices_tensors
    cm.check_tensor_widths([32], "x", "y")     # float only: nothing to refuse
    FUSED.check_tensor_widths([8, 4], "x", "y")
    with pytest.raises(UserError, match="cannot price tensor widths 8. Hint."):
        cm.check_tensor_widths([32, 8], "tensor widths 8", "Hint.")
    assert cm.to_json("ort-cpu")["target"] == "ort-cpu" and "per-layer" in cm.to_json()["convention"]
    for bad in (("cheap", 1), ("fused", 0)):
        with pytest.raises(UserError):
            CostModel.named(*bad)


def test_kernel_table_needs_the_unfolded_model():
    with pytest.raises(ValueError, match="before BN folding"):
        kernel_table(fold_bn(resnet20("B")))


# ---------------------------------------------------------------------------------------------
# FLOPs and the per-layer table


def test_flops_match_torch_flop_counter(table_b):
    counter, model = FlopCounterMode(display=False), resnet20("B").eval()   # built outside: tracing runs it once
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() == 81_626_368 == table_b.flops


@pytest.mark.parametrize("arch", arch_names())
def test_every_architecture_matches_flop_counter(arch):
    """The hook-based tables count exactly the FLOPs torch's FlopCounterMode counts, for every registered
    architecture (MobileNetV2's depthwise convs: in_channels / groups MACs per output)."""
    model = build_model(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    table = kernel_table(model)
    assert table.flops == sum(li.flops for li in table.layers) == counter.get_total_flops()
    assert sorted(li.name for li in table.layers) == sorted(quantizable_layers(model))


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


def test_training_mode_restored():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    model.train()
    layer_table(model)
    assert all(m.training for m in model.modules())
    model.eval()
    layer_table(model)
    assert not any(m.training for m in model.modules())


def test_hand_count_tiny_network():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    conv, lin = layer_table(net, input_shape=(1, 3, 8, 8))
    assert (conv.name, conv.kind, conv.macs, conv.flops) == ("0", "conv", 256 * 27, 2 * 256 * 27)
    assert (conv.weights, conv.bias, conv.in_elems, conv.out_elems) == (108, 4, 192, 256)
    assert (lin.name, lin.kind, lin.macs, lin.weights, lin.bias, lin.in_elems, lin.out_elems) == \
        ("2", "linear", 1280, 1280, 5, 256, 5)
    assert layer_table(net, input_shape=(3, 3, 8, 8)) == layer_table(net, input_shape=(1, 3, 8, 8))


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


# ---------------------------------------------------------------------------------------------
# the trace: what is charged is what is simulated


def _randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def _traced(arch, shortcut, target, seed, widths=(2, 3, 4, 6, 8, 32)):
    torch.manual_seed(seed)
    return trace_random_config(build_model(arch, shortcut), target, seed, widths)


def trace_random_config(model, target, seed, widths, calib_images=8):
    """(kernel table, a random configuration of `widths`, the quantized model, its trace of one random image):
    `model`'s BN statistics randomized, ranges calibrated on seeded random images of its input size."""
    model = _randomize_bn(model, seed)
    shape = input_shape(model)
    table = kernel_table(model, target)
    folded = fold_bn(model)
    g = torch.Generator().manual_seed(seed)
    ranges = calibrate(folded, target, [torch.randn(calib_images, *shape[1:], generator=g)],
                       [b for b in widths if b != 32])
    rng = np.random.default_rng(seed)
    cfg = table.space.full({grp: int(rng.choice(widths)) for grp in table.space.groups})
    quantize_(folded, cfg, ranges, target)
    tr = trace(folded, target, {n: b for (k, n), b in cfg.items() if k == W}, torch.randn(1, *shape[1:], generator=g))
    return table, cfg, folded, tr


@pytest.mark.parametrize("arch,shortcut", [("resnet20", "A"), ("resnet20", "B"), ("resnet56", "B"),
                                           ("mobilenetv2", None)])
@pytest.mark.parametrize("target", TARGETS)
def test_trace_equals_cost_model_and_declarations(arch, shortcut, target):
    """Random mixed configurations: the bytes measured on the real tensors equal the fused cost model's, the
    reads each kernel really performs equal its declared reads, nothing reads a tensor undeclared, and every
    quantized tensor holds at most 2^bits distinct values (a copy that follows a tensor, shortcut A's Slice and
    Pad under ort-cpu, at that tensor's width)."""
    table, cfg, model, tr = _traced(arch, shortcut, target, seed=len(arch) + len(target))
    cost = FUSED.cost(table, cfg)
    assert tr["total_bytes"] == cost["bytes"] and tr["total_flops"] == cost["flops"]
    assert tr["undeclared_reads"] == []
    declared = {k.name: [(r.tensor, int(table.elements[r.tensor] * r.fraction)) for r in k.reads]
                for k in model.kernels(target)}
    measured = {k["name"]: [(r["tensor"], r["elements"]) for r in k["reads"]] for k in tr["kernels"]}
    assert {k: sorted(v) for k, v in measured.items()} == {k: sorted(v) for k, v in declared.items()}
    for k in tr["kernels"]:
        for r in k["reads"] + k["writes"]:
            assert r["bits"] == cfg[A, table.width_group(r["tensor"])]
            if r["bits"] != FLOAT_BITS:
                assert r["distinct"] <= 2 ** r["bits"], (k["name"], r)
    narrowed = [r for k in tr["kernels"] for r in k["writes"] if r["bits"] <= 4]
    assert narrowed, "the random configuration should narrow some tensor"
    assert bool(table.follows) == (shortcut == "A" and target == "ort-cpu")


def test_consumers_read_values_on_the_tensors_grid():
    """What a consumer receives from a quantized tensor is an integer multiple of that tensor's scale within its
    grid: the convs, the residual add (its shortcut operand), the shortcut-A subsampling, pooling and the
    classifier read the quantized tensor, not a float copy."""
    torch.manual_seed(0)
    model = _randomize_bn(build_model("resnet20", "A"), 0)
    folded = fold_bn(model)
    table = kernel_table(model)
    ranges = calibrate(folded, "generic", [torch.randn(8, 3, 32, 32)], [4])
    quantize_(folded, table.space.uniform(FLOAT_BITS, 4), ranges, "generic")
    quant = {t.name: folded.get_submodule(t.slot).quant for t in folded.tensors()}
    # reader module, which argument, the tensor it must be
    readers = [("layer1.0.conv1", 0, "conv1"), ("layer1.0.add", 1, "conv1"),
               ("layer2.0.shortcut.subsample", 0, "layer1.2.conv2"),
               ("pool", 0, "layer3.2.conv2"), ("linear", 0, "pool"), ("layer3.2.add", 1, "layer3.1.conv2")]
    seen = []

    def check(name, arg, tensor):
        def hook(_m, inputs):
            q = quant[tensor]
            levels = inputs[arg] / q.scale
            assert torch.allclose(levels, levels.round(), atol=1e-3), name
            assert levels.min() >= q.qmin and levels.max() <= q.qmax and q.bits == 4, name
            assert len(levels.round().unique()) > 4, name     # not trivially constant
            seen.append(name)
        return hook

    hs = [folded.get_submodule(n).register_forward_pre_hook(check(n, i, t)) for n, i, t in readers]
    with torch.no_grad():
        folded(torch.randn(2, 3, 32, 32))
    for h in hs:
        h.remove()
    assert seen == [n for n, _, _ in readers][:1] + ["layer1.0.add", "layer2.0.shortcut.subsample", "layer3.2.add",
                                                     "pool", "linear"]


def test_trace_flags_reads_the_declaration_leaves_out(monkeypatch):
    """A model whose structure forgets that the residual add reads the shortcut: the trace sees the real
    read (by an op of no kernel, or a read the kernel does not declare) and its bytes no longer equal the
    declared cost. The trace is measured, not copied from the table."""
    from models.graph import TracedModel   # the class every copy of a traced model shares (each has its own subclass)
    model = resnet20("B")
    real = TracedModel.kernels

    def forgetful(self, target="generic"):
        out = []
        for k in real(self, target):
            if k.name == "layer1.1.conv2":
                k = type(k)(k.name, k.layers, (Read("layer1.1.conv1"),), k.writes, ("layer1.1.conv2",))
            out.append(k)
        return out

    monkeypatch.setattr(TracedModel, "kernels", forgetful)
    table = kernel_table(model)
    folded = fold_bn(model)
    ranges = calibrate(folded, "generic", [torch.randn(4, 3, 32, 32)], [8])
    cfg = table.space.uniform(8, 8)
    quantize_(folded, cfg, ranges, "generic")
    tr = trace(folded, "generic", {n: 8 for n in table.space.layers}, torch.randn(1, 3, 32, 32))
    assert tr["undeclared_reads"] == [{"op": "layer1.1.add", "tensor": "layer1.0.conv2", "elements": 16384}]
    assert tr["total_bytes"] == FUSED.total_bytes(table, cfg)    # the forgetful table and the trace both miss it
    monkeypatch.undo()
    assert FUSED.total_bytes(kernel_table(resnet20("B")), cfg) - tr["total_bytes"] == 16384


# ---------------------------------------------------------------------------------------------
# configuration files


def test_file_format_round_trip_and_defaults(table_b, tmp_path):
    sp = table_b.space
    rng = np.random.default_rng(1)
    cfg = sp.full({g: int(rng.choice([2, 4, 8, 32])) for g in sp.groups})
    obj = sp.to_file(cfg)
    assert obj["format"] == FORMAT and obj["input"] == {"a": cfg[A, "input"]} and set(obj["pool"]) == {"a"}
    assert set(obj["conv1"]) == {"w", "a"} and list(obj)[1:3] == ["input", "conv1"]
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(obj))
    assert load_config(path, sp) == cfg
    # names left out: float weights, tensors at the default width
    partial = sp.parse({"format": FORMAT, "conv1": {"w": 4}}, default_a=8)
    assert partial[W, "conv1"] == 4 and partial[W, "linear"] == 32 and set(v for (k, _), v in partial.items()
                                                                           if k == A) == {8}


def test_unmarked_weight_only_file_still_loads(table_b, tmp_path):
    """A file written before tensors had widths, {layer: bits}: weight widths, tensors float; same AI."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({n: 4 for n in table_b.space.layers}))
    full = load_config(path, table_b.space)
    assert full == table_b.space.uniform(4, 32)
    assert round(REFERENCE.ai(table_b, full), 2) == 45.69


def test_unmarked_file_with_a_is_refused_with_the_change_explained(table_b, tmp_path):
    path = tmp_path / "old_joint.json"
    path.write_text(json.dumps({"layer1.0.conv1": {"w": 4, "a": 8}}))
    with pytest.raises(UserError) as e:
        load_config(path, table_b.space)
    msg = str(e.value)
    assert "format" in msg and "input" in msg and "writes" in msg and "one tensor was read at two widths" in msg


@pytest.mark.parametrize("obj,match", [
    ({"layer9.conv1": 8}, "does not have"), ({"conv1": 1}, "width"), ({"conv1": 16}, "width"),
    ({"conv1": 8.0}, "width"), ({"format": FORMAT, "conv1": {"w": 4, "a": 1}}, "width"),
    ({"conv1": {"w": 4, "x": 8}}, "only"), ({"conv1": "8"}, "width"), ({"input": 8}, "without weights"),
    ({"format": FORMAT, "pool": {"w": 8}}, "without weights"), ({"format": "tensor-widths/9"}, "reads"),
    ([1, 2], "JSON object")])
def test_bad_config_raises_user_error(table_b, obj, match):
    with pytest.raises(UserError, match=match):
        table_b.space.parse(obj)


def test_stage3_results_file_gives_its_best_configuration(table_b, tmp_path):
    sp = table_b.space
    obj = {"stage": "3", "best": "pareto", "greedy": {"config": sp.to_file(sp.uniform(8, 8))},
           "pareto": {"config": sp.to_file(sp.uniform(4, 8))}}
    path = tmp_path / "03_search.json"
    path.write_text(json.dumps(obj))
    assert load_config(path, sp) == sp.uniform(4, 8)
    path.write_text(json.dumps(dict(obj, best=None)))
    with pytest.raises(UserError, match="without a searched configuration"):
        load_config(path, sp)


def test_bad_config_files(tmp_path, table_b):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.json", table_b.space)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path / "bad.json", table_b.space)


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """Real `python -m` runs, started before the first test so their seconds of torch import overlap it."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "bad.json").write_text(json.dumps({"layer9.conv1": 4}))
    commands = {
        "fp32": ["--arch", "resnet20", "--shortcut", "B", "--json"],
        "bad": ["--arch", "resnet20", "--config", str(tmp / "bad.json")],
        "trace": ["--trace", "--w-bits", "4", "--a-bits", "8", "--json", "--ranges", "random"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "utils.ai_calculator", *a], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, a in commands.items()}
    finished = {}

    def result(key):
        if key not in finished:
            out, err = procs[key].communicate(timeout=300)
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
    assert round(obj["ai"], 2) == 26.99 and obj["flops"] == 81_626_368
    assert obj["cost_model"]["name"] == "fused" and len(obj["rows"]) == 23
    assert obj["config"]["format"] == FORMAT


def test_cli_trace_json_equals_cost_model(cli_runs):
    """The acceptance check of the issue: the trace's total_bytes equals the bytes of the same configuration
    as `--json` reports them."""
    code, out, err = cli_runs("trace")
    assert code == 0, err
    tr = json.loads(out)
    table = kernel_table(resnet20("B"))
    assert tr["total_bytes"] == tr["charged_bytes"] == FUSED.total_bytes(table, table.space.uniform(4, 8))
    assert round(tr["ai"], 2) == 131.00 and "random" in tr["ranges"]
    k = tr["kernels"][0]
    assert k["name"] == "conv1" and k["reads"][0]["tensor"] == "input" and k["reads"][0]["bits"] == 8
    assert all(r["distinct"] <= 256 for k in tr["kernels"] for r in k["reads"] + k["writes"])


def test_cli_reference_and_cost_model_flag(capsys):
    assert ai_calculator.cli(["--cost-model", "reference", "--w-bits", "8", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["ai"], 2) == 42.47
    assert ai_calculator.cli(["--cost-model", "reference", "--a-bits", "8"]) == 2
    assert "cannot price a configuration that narrows a tensor" in capsys.readouterr().err


def test_cli_config_file_and_default_widths(tmp_path, capsys):
    table = kernel_table(resnet20("B"))
    path = tmp_path / "w4.json"
    path.write_text(json.dumps({"format": FORMAT, **{n: {"w": 4} for n in table.space.layers}}))
    assert ai_calculator.cli(["--config", str(path), "--a-bits", "8", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["ai"] == pytest.approx(131.00, abs=0.01)
    assert obj["config"]["input"] == {"a": 8} and obj["config"]["conv1"] == {"w": 4, "a": 8}


def test_cli_table_in_process(capsys):
    assert ai_calculator.cli(["--arch", "resnet32", "--shortcut", "A", "--a-bits", "8", "--target", "ort-cpu"]) == 0
    out = capsys.readouterr().out
    assert "layer3.4.conv2" in out and "layer3.4.add" in out and "shortcut.0" not in out and "modelled" in out
    table = kernel_table(build_model("resnet32", "A"), "ort-cpu")
    assert f"AI {FUSED.ai(table, table.space.uniform(32, 8)):.2f}" in out
    assert ai_calculator.cli(["--arch", "mobilenetv2", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["model_args"]["arch"] == "mobilenetv2" and round(obj["ai"], 2) == 7.78


def test_cli_trace_table_with_checkpoint(capsys):
    ck = REPO_ROOT / "pretrained" / "resnet20_cifar10jpeg_30ep.pt"
    assert ai_calculator.cli(["--trace", "--checkpoint", str(ck), "--w-bits", "8", "--a-bits", "8",
                              "--ranges", "random"]) == 0
    out = capsys.readouterr().out
    assert "layer2.0.conv2" in out and "reads layer2.0.conv1[8192x8b" in out and "AI 107.61" in out


def test_cli_bad_config_exits_2_without_traceback(cli_runs):
    code, out, err = cli_runs("bad")
    assert code == 2
    assert "Traceback" not in err and "layer9.conv1" in err


def test_cli_bad_input_in_process(tmp_path, capsys):
    assert ai_calculator.cli(["--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ai_calculator.cli(["--trace", "--a-bits", "8", "--ranges", str(tmp_path / "none.json")]) == 2
    assert "--ranges random" in capsys.readouterr().err
    (tmp_path / "s2.json").write_text(json.dumps({"activation_calibration": {"tensors": {}}}))
    assert ai_calculator.cli(["--trace", "--a-bits", "8", "--ranges", str(tmp_path / "s2.json")]) == 2
    assert "no calibrated range for tensor 'conv1' at 8 bits" in " ".join(capsys.readouterr().err.split())
    assert ai_calculator.cli(["--arch", "mobilenetv2", "--shortcut", "A"]) == 2
    assert "ResNets only" in capsys.readouterr().err
    for argv in (["--arch", "resnet21"], ["--w-bits", "9"], ["--batch-size", "0"], ["--a-bits", "1"],
                 ["--target", "tpu"], ["--cost-model", "cheap"]):
        with pytest.raises(SystemExit) as exc:
            ai_calculator.cli(argv)
        assert exc.value.code == 2, argv
