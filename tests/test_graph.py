"""Structure derived from the traced graph (models/graph.py) and models from outside the registry
(models/outside.py): the hand declarations are the test data, torchvision networks go through the cost model
and the trace, and what the rules do not cover is a clear error."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import ARCHS, build_from_args, build_model
from models.graph import TracedModel, trace_model
from models.outside import build_outside
from models.resnet import SHORTCUTS
from models.structure import TARGETS, check_structure
from quant.calibrate import calibrate
from quant.cost import CostModel, kernel_table
from quant.errors import UserError
from quant.fold import fold_bn
from quant.place import quantize_
from quant.widths import FLOAT_BITS, A, W
from declared import declared_model
from test_ai_calculator import _randomize_bn, trace_random_config
from utils import ai_calculator

REGISTRY = [(a, s) for a in ARCHS for s in (SHORTCUTS if a.startswith("resnet") else (None,))]
FUSED, REFERENCE = CostModel.named("fused"), CostModel.named("reference")


def _kernel_view(kernels):
    return [(k.name, k.layers, k.reads, k.writes, sorted(k.ops)) for k in kernels]


@pytest.mark.parametrize("arch,shortcut", REGISTRY, ids=[f"{a}{s or ''}" for a, s in REGISTRY])
def test_derived_structure_equals_the_declared_one(arch, shortcut):
    """Every registry model under both targets: the kernels (layers, reads with their fractions, writes, ops), the
    tensors (names, Slots, signs, order) and the conv-BN pairs derived from the traced graph are the declared ones;
    every declared segment boundary is a derived one, and a segment both have has the same name; forward
    and the segments in order compute the model's output. The registry builds the derived one (build_model)."""
    model = _randomize_bn(declared_model(arch, shortcut), 1)
    derived = build_model(arch, shortcut)
    derived.load_state_dict(model.state_dict())
    derived.train(model.training)
    assert isinstance(derived, TracedModel) and not hasattr(type(derived), "_kernels_by_segment")
    for target in TARGETS:
        check_structure(derived, target)
        assert _kernel_view(derived.kernels(target)) == _kernel_view(model.kernels(target))
        assert derived.tensors(target) == model.tensors(target)
        ends = {s.kernels[-1] for s in derived.segments(target)}
        assert {s.kernels[-1] for s in model.segments(target)} <= ends
        named = {s.kernels: s.name for s in derived.segments(target)}
        assert all(named[s.kernels] == s.name for s in model.segments(target) if s.kernels in named)
    assert set(derived.conv_bn_pairs()) == set(model.conv_bn_pairs())
    assert list(derived.state_dict()) == list(model.state_dict())   # in the module's order
    mods = dict(derived.named_modules())   # the module's own tree: its blocks and containers, not plain modules
    assert all(type(mods[n]) is type(m) for n, m in model.named_modules() if n)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = x
        for seg in derived.segments("generic"):
            y = seg.fn(y)
        assert torch.equal(derived(x), model(x)) and torch.equal(y, model(x))


@pytest.mark.parametrize("arch,shortcut", [("resnet20", "A"), ("resnet20", "B"), ("mobilenetv2", None)])
def test_derived_and_declared_models_cost_the_same(arch, shortcut):
    """The same fused and reference AI for random mixed configurations, under both targets."""
    model, derived = declared_model(arch, shortcut), build_model(arch, shortcut)
    rng = np.random.default_rng(3)
    for target in TARGETS:
        a, b = kernel_table(model, target), kernel_table(derived, target)
        assert a.elements == b.elements and a.weights == b.weights and a.kernels == b.kernels
        for _ in range(20):
            cfg = a.space.full({g: int(rng.choice([2, 3, 4, 6, 8, 32])) for g in a.space.groups})
            assert FUSED.ai(a, cfg) == FUSED.ai(b, cfg)
        w_only = a.space.full({g: int(rng.choice([4, 8, 32])) if g[0] == W else FLOAT_BITS for g in a.space.groups})
        assert REFERENCE.ai(a, w_only) == REFERENCE.ai(b, w_only)


def test_traced_model_copies_folds_and_quantizes_like_a_declared_one():
    """A deep copy keeps the derived structure; BN folding and placement act on the rewritten graph (a quantizer
    in a Slot changes what forward and the segments compute)."""
    derived = trace_model(_randomize_bn(declared_model("resnet8", "A"), 2))
    copy = fold_bn(derived)
    assert copy.kernels("ort-cpu") == derived.kernels("ort-cpu") and copy.conv_bn_pairs() == derived.conv_bn_pairs()
    assert type(copy).__name__ == "DeclaredCifarResNet" and isinstance(copy.layer2, nn.Sequential)
    assert copy.layer2[0].shortcut.pad is not derived.layer2[0].shortcut.pad
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(copy(x), derived(x), atol=1e-4)
        table = kernel_table(derived)
        ranges = calibrate(copy, "generic", [x], [4])
        before = copy(x)
        quantize_(copy, table.space.uniform(8, 4), ranges, "generic")
        after = copy(x)
        y = x
        for seg in copy.segments("generic"):
            y = seg.fn(y)
    assert not torch.equal(before, after) and torch.equal(y, after)


def _trace_chain(model, target, size, seed=0, widths=(4, 8, 32)):
    """trace_random_config (tests/test_ai_calculator.py) plus the FLOPs torch's FlopCounterMode counts."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    table, cfg, _, tr = trace_random_config(model, target, seed, widths, calib_images=4)
    return table, cfg, tr, fc.get_total_flops()


@pytest.mark.parametrize("name,target", [("resnet18", "generic"), ("mobilenet_v2", "ort-cpu"),
                                         ("mobilenet_v3_small", "generic"), ("mobilenet_v3_small", "ort-cpu")])
def test_torchvision_networks_through_the_cost_model_and_the_trace(name, target):
    """Random weights, a random mixed configuration: what is charged is what the simulated network reads and writes,
    each kernel's reads are the derived ones, nothing reads a tensor undeclared, quantized tensors hold at most
    2^bits values, and FLOPs are what torch's FlopCounterMode counts (squeeze-excitation's scaling counts zero)."""
    model = build_outside(f"torchvision:{name}", num_classes=10, input_size=32)
    check_structure(model, target)
    table, cfg, tr, counted = _trace_chain(model, target, 32)
    cost = FUSED.cost(table, cfg)
    assert tr["total_bytes"] == cost["bytes"] and tr["total_flops"] == cost["flops"] == counted
    assert tr["undeclared_reads"] == []
    declared = {k.name: sorted((r.tensor, int(table.elements[r.tensor] * r.fraction)) for r in k.reads)
                for k in model.kernels(target)}
    assert {k["name"]: sorted((r["tensor"], r["elements"]) for r in k["reads"]) for k in tr["kernels"]} == declared
    for k in tr["kernels"]:
        for r in k["reads"] + k["writes"]:
            assert r["bits"] == cfg[A, table.width_group(r["tensor"])]
            assert r["bits"] == FLOAT_BITS or r["distinct"] <= 2 ** r["bits"]
    if name == "mobilenet_v3_small":   # squeeze-excitation: pooled, two 1x1 convs, the product its own kernel
        se = [k for k in model.kernels(target) if k.name.endswith(".mul")]
        assert se and all(len(k.reads) == 2 and not k.layers for k in se)


def test_fusion_rules_on_a_torchvision_resnet():
    """torchvision's ResNet-18 under generic: each block's add fused into its second conv (the deeper input), the
    1x1 stride-2 downsample its own kernel reading a quarter of the block input, the max-pool its own kernel;
    under ort-cpu every add is a kernel of its own whose tensor cannot be negative (ReLU after it)."""
    model = build_outside("torchvision:resnet18", num_classes=10, input_size=32)
    k = {x.name: x for x in model.kernels("generic")}
    assert [r.tensor for r in k["layer2.0.conv2"].reads] == ["layer2.0.conv1", "layer2.0.downsample.0"]
    assert k["layer2.0.downsample.0"].reads[0].fraction == 0.25
    assert k["layer1.0.conv2"].reads[1].tensor == "maxpool" and k["maxpool"].reads[0].tensor == "conv1"
    ort = {x.name: x for x in model.kernels("ort-cpu")}
    signed = {t.name: t.signed for t in model.tensors("ort-cpu")}
    assert "layer1.0.add" in ort and not signed["layer1.0.add"] and signed["layer1.0.conv2"]
    assert ("layer1.0.conv1", "layer1.0.bn1") in model.conv_bn_pairs()


class _PreActivation(nn.Module):   # BN in front of the conv: nothing to fold it into
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn(F.relu(self.conv(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Sorts(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.sort(self.conv(x).flatten(1), dim=1).values[:, :10]


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x)).mean((2, 3))


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else x


@pytest.mark.parametrize("model,words", [
    (_PreActivation(), ["BatchNorm2d", "'bn'", "follow a conv"]),
    (_Sorts(), ["sort", "node 'sort'", "Rewrite that part of the model"]),
    (_Reused(), ["'conv'", "called twice"]),
    (_Branches(), ["torch.fx cannot trace", "control flow"]),
])
def test_ops_the_rules_do_not_cover_are_named(model, words):
    """An op the fusion rules do not cover, a module called twice or untraceable control flow: a UserError that
    names the op, its node and where it sits; nothing is priced by guess."""
    with pytest.raises(UserError) as e:
        trace_model(model)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_user_file_model_rebuilds_from_its_model_args(tmp_path):
    """`path/file.py:function` with keyword arguments: traced, recorded in model_args, rebuilt by build_from_args
    to the same structure and the same seeded weights; bad specs are clear errors."""
    f = tmp_path / "net.py"
    f.write_text(textwrap.dedent("""
        import torch.nn as nn
        def build(width=4, num_classes=10):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width), nn.BatchNorm2d(width),
                                 nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    """))
    m = build_outside(f"{f}:build", {"width": 6}, num_classes=5, input_size=16)
    assert m.model_args == {"arch": f"{f}:build", "model_kwargs": {"width": 6}, "num_classes": 5, "input_size": 16}
    again = build_from_args(m.model_args)
    assert again.kernels() == m.kernels() and all(torch.equal(a, b) for a, b in
                                                  zip(again.state_dict().values(), m.state_dict().values()))
    assert [k.name for k in m.kernels()] == ["0", "3", "6", "8"] and m.conv_bn_pairs() == [("0", "1"), ("3", "4")]
    assert kernel_table(m).elements["input"] == 3 * 16 * 16
    signed = {t.name: t.signed for t in m.tensors()}
    assert signed == {"input": True, "0": False, "3": True, "6": True, "8": True}   # Hardswish can be negative
    for spec, words in [(f"{tmp_path}/none.py:build", "is missing"), (f"{f}:nothing", "no function 'nothing'"),
                        ("torchvision:nope", "no classification model 'nope'")]:
        with pytest.raises(UserError, match=words):
            build_outside(spec)
    with pytest.raises(UserError, match="refused the arguments"):
        build_outside(f"{f}:build", {"depth": 3})


def test_calculator_prices_a_torchvision_model(capsys):
    """python -m utils.ai_calculator --model: the JSON's AI is the cost model's on the derived table; --trace
    charges what it simulates; flags that belong to the registry or to --model alone exit 2 with one paragraph."""
    args = ["--model", "torchvision:mobilenet_v3_small", "--input-size", "32", "--num-classes", "10",
            "--w-bits", "8", "--a-bits", "8"]
    assert ai_calculator.cli(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = build_outside("torchvision:mobilenet_v3_small", num_classes=10, input_size=32)
    table = kernel_table(model)
    assert out["ai"] == FUSED.ai(table, table.space.uniform(8, 8)) and out["model_args"] == model.model_args
    assert ai_calculator.cli(args + ["--trace", "--json", "--ranges", "random"]) == 0
    tr = json.loads(capsys.readouterr().out)
    assert tr["total_bytes"] == tr["charged_bytes"] == out["bytes"]
    for bad in (["--model", "torchvision:resnet18", "--arch", "resnet20"], ["--input-size", "64"],
                ["--model", "torchvision:resnet18", "--model-kwargs", "{not json"]):
        assert ai_calculator.cli(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def _outside_checkpoint(path, spec, plain: bool):
    """A seeded torchvision network at 32x32 with 10 classes, saved with its model_args or (`plain`) as a bare
    state_dict, the form a user's own training leaves."""
    from utils.checkpoint import save_checkpoint
    m = build_outside(spec, num_classes=10, input_size=32)
    _randomize_bn(m, 0)   # at BN's init the networks are near-constant (MobileNetV3's squeeze-excitation saturates)
    if plain:
        torch.save(m.state_dict(), path)
    else:
        save_checkpoint(path, {"model_args": m.model_args, "model": m.state_dict(), "finished": True})
    return m


CHAIN = [("torchvision:resnet18", False), ("torchvision:mobilenet_v2", True), ("torchvision:mobilenet_v3_small", True)]


@pytest.mark.parametrize("spec,plain", CHAIN, ids=[s.split(":")[1] for s, _ in CHAIN])
def test_outside_model_through_stages_2_3_and_the_export(tmp_path, spec, plain):
    """A torchvision network (random weights, synthetic data: 16 search, 16 report and 16 calibration images)
    through a quick stage 2 (8 and 4 bits, nearest rounding), stage 3 (at most 10 evaluations) and its W8A8 export,
    on which ONNX Runtime agrees with the fake-quant model (16 check images); MobileNetV2 also through stages 4
    and 5. A plain state_dict loads with
    --model and its flags; a checkpoint that records its model needs none. The stage-2 table is the derived one."""
    from utils import export
    from utils.cli import run_stage, script_module
    ckpt, holdout = tmp_path / "m.pt", tmp_path / "holdout.json"
    model = _outside_checkpoint(ckpt, spec, plain)
    holdout.write_text(json.dumps({"search": {"set": "test", "indices": list(range(16))},
                                   "report": {"set": "test", "indices": list(range(16, 32))}}))
    flags = ["--model", spec, "--num-classes", "10", "--input-size", "32"] if plain else []
    common = ["--checkpoint", ckpt, *flags, "--dataset", "synthetic", "--quick", "--device", "cpu",
              "--results-dir", tmp_path, "--checkpoint-dir", tmp_path, "--holdout", holdout,
              "--confirm-size", "0", "--select-size", "0"]
    r2, _ = run_stage("2_per_layer_analysis.py", [*common, "--bits", "8", "4", "--a-bits", "8", "4", "--ptq",
                                                  "nearest", "--stats-correction", "none", "--calib-images", "16"])
    r3, _ = run_stage("3_greedy_search.py", [*common, "--max-evaluations", "10"])
    assert r3["max_evaluations"] == 10 and 0 < r3["evaluations"] <= 10
    assert r2["model_args"] == model.model_args and r3["model_args"] == model.model_args
    assert {e["name"] for e in r2["layers"]} == set(kernel_table(model).weights)
    assert {e["name"] for e in r2["tensors"]} == set(kernel_table(model).space.tensors)
    out = tmp_path / "m.onnx"
    assert export.main([*map(str, common), "--onnx", str(out), "--w-bits", "8", "--a-bits", "8", "--ptq", "nearest",
                        "--stats-correction", "none", "--check-images", "16", "--calib-images", "16"]) == 0
    assert out.stat().st_size > 0
    if spec.endswith("mobilenet_v2"):   # and stages 4 and 5, from the results alone
        r4, _ = run_stage("4_create_baselines.py", common)
        assert r4["model_args"] == model.model_args and {"uniform_w8a8", "greedy"} <= {e["name"] for e in r4["configs"]}
        plots = script_module("5_generate_plots.py")
        plots.main(plots.get_args_parser().parse_args(["--results-dir", str(tmp_path)]))
        assert (tmp_path / "plots" / "pareto.png").stat().st_size > 0 and (tmp_path / "summary.md").is_file()


def test_outside_model_flags_and_checkpoints_that_disagree(tmp_path, capsys):
    """--model without --checkpoint, a checkpoint whose recorded model the flags contradict, a plain state_dict whose
    classifier --num-classes does not fit, and data of another image size: each one paragraph, exit 2."""
    from utils.cli import run, script_module
    stage2 = script_module("2_per_layer_analysis.py")
    ours, plain = tmp_path / "ours.pt", tmp_path / "plain.pt"
    _outside_checkpoint(ours, "torchvision:resnet18", plain=False)
    _outside_checkpoint(plain, "torchvision:resnet18", plain=True)
    base = ["--dataset", "synthetic", "--quick", "--device", "cpu", "--results-dir", tmp_path,
            "--checkpoint-dir", tmp_path]
    cases = [(["--model", "torchvision:resnet18"], "needs --checkpoint"),
             (["--checkpoint", ours, "--model", "torchvision:resnet34"], "--model torchvision:resnet34"),
             (["--checkpoint", ours, "--model", "torchvision:resnet18", "--input-size", "64"], "--input-size 64"),
             (["--checkpoint", plain, "--model", "torchvision:resnet18", "--input-size", "32"], "--num-classes"),
             (["--checkpoint", plain, "--model", "torchvision:resnet18", "--num-classes", "10", "--input-size", "64"],
              "takes 64x64 images"),
             (["--checkpoint", ours, "--arch", "resnet20", "--model", "torchvision:resnet18"], "no --arch")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as stop:
            run(stage2.main, stage2.get_args_parser(), [str(a) for a in base + argv])
        err = " ".join(capsys.readouterr().err.split())   # one paragraph, wrapped
        assert stop.value.code == 2 and words in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "02_per_layer.json").exists()


def test_a_conv_whose_windows_do_not_fit_is_charged_what_it_reads():
    """A 3x3 stride-2 conv without padding on 32x32 reads rows and columns 0..30 (31 of 32): the derived read
    charges exactly that, and the trace of the real tensor measures the same."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 1, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    model = trace_model(net)
    table, cfg, tr, _ = _trace_chain(model, "generic", 32)
    assert table.kernels[0].reads == (("input", 3 * 31 * 31),)
    assert table.kernels[1].reads == (("0", 4 * 8 * 8),)   # 1x1 stride 2 on 15x15: rows 0, 2, ..., 14
    assert tr["total_bytes"] == FUSED.cost(table, cfg)["bytes"]


class _FunctionalShortcutA(nn.Module):   # option A written with functions: a slice and a pad
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.conv(x) + sc)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_slice_and_pad_are_kernels_that_follow_their_input_under_ort_cpu():
    """A traced slice and pad: under generic the add's kernel looks through both and reads the kept quarter of
    the stem's tensor; under ort-cpu (ONNX Runtime materializes Slice and Pad) each is a kernel writing a copy
    that follows the stem's tensor: moved at its width, no width of its own in the space; the trace of a random
    configuration measures exactly what the cost model charges, each copy at the stem tensor's width."""
    model = trace_model(_FunctionalShortcutA())
    generic = {k.name: k for k in model.kernels("generic")}
    assert [k.name for k in model.kernels("ort-cpu")] == ["stem", "getitem", "pad", "conv", "add", "adaptive_avg_pool2d",
                                                          "head"]
    assert generic["conv"].reads[1].tensor == "stem" and generic["conv"].reads[1].fraction == 0.25
    ort = {k.name: k for k in model.kernels("ort-cpu")}
    assert ort["getitem"].reads[0].fraction == 0.25 and ort["pad"].reads[0].tensor == "getitem"
    assert {t.name: t.follows for t in model.tensors("ort-cpu") if t.follows} == {"getitem": "stem", "pad": "stem"}
    table, cfg, tr, _ = _trace_chain(model, "ort-cpu", 32)
    stem, kept, padded = 8 * 32 * 32, 8 * 16 * 16, 16 * 16 * 16
    # written, read by conv; the quarter read by the slice, written by it, read by the pad; written, read by the add
    assert "getitem" not in table.space.tensors and table.traffic("stem") == 2 * stem + 3 * kept + 2 * padded
    assert tr["total_bytes"] == FUSED.cost(table, cfg)["bytes"] and tr["undeclared_reads"] == []
    copies = [r for k in tr["kernels"] for r in k["writes"] if r["tensor"] in ("getitem", "pad")]
    assert [r["bits"] for r in copies] == [cfg[A, "stem"]] * 2
    with pytest.raises(UserError, match="copy of 'stem'"):
        quantize_(fold_bn(model), {**cfg, (A, "pad"): 8}, {}, "ort-cpu")


class _WithUnusedHead(nn.Module):   # an auxiliary classifier that only training would call
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.spare = nn.Sequential()   # weightless, called: kept
        self.aux = nn.Linear(4, 10)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.spare(self.body(x)), 1), 1))


def test_traced_model_keeps_the_module_tree_without_unused_weights():
    """The traced model keeps the module's own containers (a Sequential stays one) but not the weights forward
    never uses: they are neither priced nor quantized, and a checkpoint holding them names them as unexpected."""
    model = trace_model(_WithUnusedHead())
    assert isinstance(model.body, nn.Sequential) and isinstance(model.spare, nn.Sequential)
    assert not hasattr(model, "aux") and "aux.weight" not in model.state_dict()
    assert [k.layers for k in model.kernels()] == [("body.0",), (), ("head",)]
