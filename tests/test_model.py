"""The model registry (models/__init__.py) and its architectures: sizes, names, shapes, errors, and
the structure every model declares (models/structure.py): kernels, tensors (with the Slot where each
is written), segments and conv-BN pairs, under both targets."""
import pytest
import torch
import torch.nn as nn

from models import (ARCHS, arch_flags, arch_names, build_from_args, build_model, closest_architectures,
                    describe, normalize_model_args, resnet20, takes_shortcut)
from models.mobilenetv2 import MACS, PARAM_COUNT, MobileNetV2
from models.resnet import DEPTHS, PARAM_COUNTS, SHORTCUTS, CifarResNet, PadShortcut, count_parameters
from models.graph import TracedModel
from models.structure import (DEFAULT_TARGET, INPUT, TARGETS, Add, Kernel, Read, Segment, Slot, Tensor,
                              check_structure, quantizable_layers, widths_of_their_own)
from quant.cost import layer_table
from quant.fold import fold_bn
from quant.place import quantize_, slots
from quant.widths import Space

# He et al. 2015, table 6 (CIFAR-10, shortcut A): parameters in millions as published.
PUBLISHED_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}
# Shortcut B adds two 1x1 projections + BN: 16->32 and 32->64.
B_EXTRA = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64

# kuangliu/pytorch-cifar MobileNetV2, copied by hand: (expansion, out_planes, num_blocks, stride).
KUANGLIU_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]


def every_model():
    """(arch, shortcut) for every registered architecture and every shortcut it takes."""
    return [(a, s) for a in arch_names() for s in (SHORTCUTS if takes_shortcut(a) else (None,))]


def params(models):
    """pytest parameters (arch, shortcut) with ids like resnet20A, mobilenetv2."""
    return [pytest.param(a, s, id=a + (s or "")) for a, s in models]


def bn_keys(prefix):
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def expected_resnet_keys(depth, shortcut):
    """The state_dict keys of the common CIFAR ResNet convention, spelled out by hand."""
    n = (depth - 2) // 6
    keys = ["conv1.weight", *bn_keys("bn1")]
    for stage in (1, 2, 3):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys += [f"{p}.conv1.weight", *bn_keys(f"{p}.bn1"), f"{p}.conv2.weight", *bn_keys(f"{p}.bn2")]
            if shortcut == "B" and i == 0 and stage > 1:
                keys += [f"{p}.shortcut.0.weight", *bn_keys(f"{p}.shortcut.1")]
    return keys + ["linear.weight", "linear.bias"]


def expected_mobilenet_shapes(num_classes=10):
    """{key: shape} of kuangliu's CIFAR MobileNetV2 state_dict, in its order, built from its cfg."""
    out = {"conv1.weight": (32, 3, 3, 3)}

    def bn(prefix, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{s}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 32)
    i, cin = 0, 32
    for expansion, cout, num_blocks, stride in KUANGLIU_CFG:
        for s in [stride] + [1] * (num_blocks - 1):
            p, planes = f"layers.{i}", expansion * cin
            out[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
            bn(f"{p}.bn1", planes)
            out[f"{p}.conv2.weight"] = (planes, 1, 3, 3)
            bn(f"{p}.bn2", planes)
            out[f"{p}.conv3.weight"] = (cout, planes, 1, 1)
            bn(f"{p}.bn3", cout)
            if s == 1 and cin != cout:
                out[f"{p}.shortcut.0.weight"] = (cout, cin, 1, 1)
                bn(f"{p}.shortcut.1", cout)
            i, cin = i + 1, cout
    out["conv2.weight"] = (1280, 320, 1, 1)
    bn("bn2", 1280)
    out["linear.weight"] = (num_classes, 1280)
    out["linear.bias"] = (num_classes,)
    return out


# ----------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("depth", sorted(PUBLISHED_M))
def test_resnet_parameter_counts_match_published_table(depth):
    """Shortcut A has exactly PARAM_COUNTS[(depth, 'A')] parameters, which rounds to He et al.'s
    published 0.27M / 0.46M / 0.66M / 0.85M / 1.7M; B adds the two 1x1 projections + BN (2,752)."""
    a = count_parameters(build_model(f"resnet{depth}", "A"))
    b = count_parameters(build_model(f"resnet{depth}", "B"))
    assert a == PARAM_COUNTS[(depth, "A")] and b == PARAM_COUNTS[(depth, "B")]
    digits = 1 if depth == 110 else 2
    assert round(a / 1e6, digits) == PUBLISHED_M[depth]
    assert b - a == B_EXTRA


def test_resnet_parameter_counts_exact_values():
    """The published depths' entries of the table in models/resnet.py, spelled out (a typo in
    PARAM_COUNTS cannot hide behind itself), and every registered depth has both shortcuts in it,
    with the count a freshly built model has."""
    published = {
        (20, "A"): 269_722, (20, "B"): 272_474, (32, "A"): 464_154, (32, "B"): 466_906,
        (44, "A"): 658_586, (44, "B"): 661_338, (56, "A"): 853_018, (56, "B"): 855_770,
        (110, "A"): 1_727_962, (110, "B"): 1_730_714}
    assert {k: PARAM_COUNTS[k] for k in published} == published
    assert set(PARAM_COUNTS) == {(d, s) for d in DEPTHS for s in SHORTCUTS}
    assert set(PUBLISHED_M) <= set(DEPTHS)
    for (depth, shortcut), n in PARAM_COUNTS.items():
        if depth not in PUBLISHED_M:  # the published ones are built by the test above
            assert count_parameters(CifarResNet(depth, shortcut)) == n
            assert PARAM_COUNTS[(depth, "B")] - PARAM_COUNTS[(depth, "A")] == B_EXTRA
    assert count_parameters(resnet20("A")) == 269_722 and count_parameters(resnet20("B")) == 272_474


def test_mobilenetv2_size_layers_and_macs():
    """MobileNetV2 (CIFAR) has 2,296,922 parameters, 58 Conv2d/Linear layers (17 depthwise) and
    91,154,944 MACs per 32x32 image."""
    m = build_model("mobilenetv2")
    assert count_parameters(m) == PARAM_COUNT == 2_296_922
    layers = quantizable_layers(m)
    assert len(layers) == 58
    assert sum(1 for l in layers.values() if isinstance(l, nn.Conv2d) and l.groups > 1) == 17
    assert sum(t.macs for t in layer_table(m)) == MACS == 91_154_944


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_resnet_parameter_names_follow_convention(shortcut):
    """state_dict keys are exactly the common CIFAR ResNet names (conv1, bn1, layer1.0.conv1,
    layer2.0.shortcut.0/.1 for B, linear), in that order, so pretrained checkpoints load unchanged."""
    keys = list(resnet20(shortcut).state_dict())
    assert keys == expected_resnet_keys(20, shortcut)
    has_projection = {"layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight",
                      "layer3.0.shortcut.0.weight", "layer3.0.shortcut.1.running_mean"} <= set(keys)
    assert has_projection == (shortcut == "B")
    assert (not any("shortcut" in k for k in keys)) == (shortcut == "A")


@pytest.mark.parametrize("depth", [32, 110])
def test_resnet_parameter_names_deeper(depth):
    """Deeper ResNets follow the same naming (n blocks per stage)."""
    for shortcut in SHORTCUTS:
        assert list(build_model(f"resnet{depth}", shortcut).state_dict()) == expected_resnet_keys(depth, shortcut)


def test_mobilenetv2_state_dict_follows_kuangliu():
    """MobileNetV2's state_dict has exactly kuangliu/pytorch-cifar's keys (conv1, bn1, layers.0.conv1,
    layers.0.shortcut.0, ..., conv2, bn2, linear), in order and with its shapes, so its checkpoints
    load; projection shortcuts sit on exactly the 4 stride-1 blocks that change width."""
    sd = build_model("mobilenetv2").state_dict()
    expected = expected_mobilenet_shapes()
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    for k in ("conv1.weight", "bn1.weight", "layers.0.conv1.weight", "layers.0.shortcut.0.weight",
              "layers.16.conv3.weight", "conv2.weight", "bn2.running_var", "linear.bias"):
        assert k in sd
    projections = sorted({int(k.split(".")[1]) for k in sd if ".shortcut.0." in k})
    assert projections == [0, 1, 10, 16]
    MobileNetV2().load_state_dict(sd)  # strict load into a fresh instance


# ----------------------------------------------------------------------------- registry

def test_registry_lists_every_architecture():
    """The registry names a ResNet for every depth in DEPTHS (at least the paper's five) and
    MobileNetV2, and only the ResNets take a shortcut."""
    names = arch_names()
    assert list(ARCHS) == names
    assert [a for a in names if a.startswith("resnet")] == [f"resnet{d}" for d in DEPTHS]
    assert {f"resnet{d}" for d in PUBLISHED_M} | {"mobilenetv2"} <= set(names)
    assert all(takes_shortcut(a) == a.startswith("resnet") for a in names)


@pytest.mark.parametrize("arch,shortcut", params(every_model()))
def test_registry_builds_every_architecture(arch, shortcut):
    """build_model builds every registered (arch, shortcut); its model_args name it and rebuild a
    model with the same keys and shapes through build_from_args; num_classes sizes the classifier."""
    m = build_model(arch, shortcut)
    assert m.model_args == {"arch": arch, **({"shortcut": shortcut} if shortcut else {}), "num_classes": 10}
    assert normalize_model_args(m.model_args) == m.model_args
    r = build_from_args(m.model_args)
    assert isinstance(r, TracedModel) and type(r).__name__ == type(m).__name__   # each GraphModule has its class
    assert r.kernels() == m.kernels() and r.code == m.code
    assert {k: v.shape for k, v in r.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    m7 = build_model(arch, shortcut, num_classes=7)
    assert m7.linear.out_features == 7 and m7.model_args["num_classes"] == 7


def test_registry_default_shortcut_is_b():
    """A ResNet built without a shortcut gets B (the reference work's choice)."""
    assert build_model("resnet20").model_args["shortcut"] == "B"
    assert count_parameters(build_model("resnet56")) == PARAM_COUNTS[(56, "B")]


@pytest.mark.parametrize("arch", ["resnet", "resnet18", "resnet19", "vgg16", "MobileNetV2", "", "mobilenet"])
def test_registry_rejects_unknown_arch(arch):
    """Unknown architectures are a ValueError naming the choices, also through build_from_args."""
    with pytest.raises(ValueError, match="mobilenetv2"):
        build_model(arch)
    if arch != "resnet":  # {"arch": "resnet"} is the legacy form (depth 20)
        with pytest.raises(ValueError):
            build_from_args({"arch": arch})


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_registry_rejects_shortcut_for_mobilenetv2(shortcut):
    """A shortcut applies to ResNets only: mobilenetv2 with any shortcut is a ValueError."""
    with pytest.raises(ValueError, match="ResNets only"):
        build_model("mobilenetv2", shortcut)
    with pytest.raises(ValueError):
        build_from_args({"arch": "mobilenetv2", "shortcut": shortcut, "num_classes": 10})


@pytest.mark.parametrize("shortcut", ["C", "a", "", 1])
def test_registry_rejects_bad_shortcut(shortcut):
    """A ResNet shortcut other than 'A' or 'B' is a ValueError."""
    with pytest.raises(ValueError, match="shortcut"):
        build_model("resnet20", shortcut)


@pytest.mark.parametrize("legacy,today", [
    ({"arch": "resnet", "depth": 20}, {"arch": "resnet20", "shortcut": "B", "num_classes": 10}),
    ({"arch": "resnet", "depth": 56, "shortcut": "A", "num_classes": 10},
     {"arch": "resnet56", "shortcut": "A", "num_classes": 10}),
    ({"arch": "resnet", "depth": 110, "shortcut": "B", "num_classes": 100},
     {"arch": "resnet110", "shortcut": "B", "num_classes": 100}),
    ({"depth": 32}, {"arch": "resnet32", "shortcut": "B", "num_classes": 10}),
    ({}, {"arch": "resnet20", "shortcut": "B", "num_classes": 10}),
    ({"arch": "resnet44", "shortcut": "A"}, {"arch": "resnet44", "shortcut": "A", "num_classes": 10}),
    ({"arch": "mobilenetv2"}, {"arch": "mobilenetv2", "num_classes": 10}),
])
def test_legacy_model_args_normalize(legacy, today):
    """Pre-registry model_args ({"arch": "resnet", "depth": N}) and partial ones normalize to today's
    form, idempotently, without changing the caller's dict, and build that model."""
    before = dict(legacy)
    assert normalize_model_args(legacy) == today
    assert legacy == before
    assert normalize_model_args(today) == today
    m = build_from_args(legacy)
    assert m.model_args == today


def test_describe_and_arch_flags():
    """describe() and arch_flags() name the architecture, with the shortcut for ResNets only."""
    assert describe({"arch": "resnet", "depth": 20}) == "resnet20 (shortcut B)"
    assert describe({"arch": "resnet56", "shortcut": "A", "num_classes": 10}) == "resnet56 (shortcut A)"
    assert describe({"arch": "mobilenetv2", "num_classes": 10}) == "mobilenetv2"
    assert arch_flags({"arch": "resnet", "depth": 32, "shortcut": "A"}) == "--arch resnet32 --shortcut A"
    assert arch_flags({"arch": "mobilenetv2"}) == "--arch mobilenetv2"


@pytest.mark.parametrize("arch,shortcut", params([("resnet20", "A"), ("resnet56", "B"), ("resnet110", "A"),
                                                  ("mobilenetv2", None)]))
def test_closest_architectures_names_the_right_one(arch, shortcut):
    """For a state dict of some registered model, closest_architectures puts that model first with
    a perfect fit (1.0) and every other (arch, shortcut) strictly below."""
    sd = build_model(arch, shortcut).state_dict()
    ranked = closest_architectures(sd)
    assert len(ranked) == len(every_model())
    (best, score), (_, second) = ranked[0], ranked[1]
    assert best == normalize_model_args({"arch": arch, **({"shortcut": shortcut} if shortcut else {})})
    assert score == 1.0 and second < 1.0
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)


def test_closest_architectures_partial_fit():
    """A foreign checkpoint (a resnet32 A trained for 100 classes, read as 10 classes) still names
    resnet32 A first, with a fit below 1.0; told num_classes=100 it fits exactly."""
    sd = build_model("resnet32", "A", num_classes=100).state_dict()
    best, score = closest_architectures(sd)[0]
    assert best == {"arch": "resnet32", "shortcut": "A", "num_classes": 10}
    assert 0.9 < score < 1.0
    best, score = closest_architectures(sd, num_classes=100)[0]
    assert best == {"arch": "resnet32", "shortcut": "A", "num_classes": 100} and score == 1.0
    # kuangliu-style MobileNetV2 keys with a few entries missing still map to mobilenetv2
    sd = {k: v for k, v in build_model("mobilenetv2").state_dict().items() if not k.startswith("linear")}
    best, score = closest_architectures(sd)[0]
    assert best["arch"] == "mobilenetv2" and 0.9 < score < 1.0


# ----------------------------------------------------------------------------- CifarResNet details

@pytest.mark.parametrize("depth", [0, 2, 7, 9, 19, 21, 22, -4])
def test_invalid_depth_raises(depth):
    """Depths that are not 6n+2 (n >= 1) are a ValueError naming the rule."""
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth, "B")


@pytest.mark.parametrize("shortcut", ["C", "a", "b", "", None])
def test_invalid_shortcut_raises(shortcut):
    """CifarResNet accepts shortcut 'A' or 'B' only."""
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(20, shortcut)


def test_pad_shortcut_is_option_a():
    """Option A: stride-2 subsample, the input channels in the middle, zero channels either side; its Slots
    hold no state (old checkpoints load)."""
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    y = PadShortcut(16)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()
    assert PadShortcut(16).state_dict() == {}


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("arch,shortcut", params(every_model()))
def test_forward_shape(arch, shortcut):
    """A batch of N 32x32 RGB images gives N x num_classes finite logits, in train and eval mode."""
    torch.manual_seed(0)
    model = build_model(arch, shortcut)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)
        assert build_model(arch, shortcut, num_classes=3).eval()(x).shape == (2, 3)


def test_forward_shape_small_resnet():
    """CifarResNet itself also builds depth 8 (n = 1), for quick tests, with any class count."""
    model = CifarResNet(8, "B", num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


# ----------------------------------------------------------------------------- declared structure

def every_model_target():
    """(arch, shortcut, target) for every registered model under both targets."""
    return [pytest.param(a, s, t, id=f"{a}{s or ''}-{t}") for a, s in every_model() for t in TARGETS]


def expected_resnet_kernels(depth, shortcut, target):
    """(name, layers, ((tensor, fraction), ...), writes) of a CIFAR ResNet's kernels, written out from
    the issue's table: the stem; per block conv1+BN+ReLU, the B projection as its own kernel, then
    conv2+BN+add+ReLU (generic) or conv2+BN and add+ReLU (ort-cpu); pool; linear. The add reads the
    block input (shortcut A where the shape changes: the quarter of it the subsampling uses; under ort-cpu
    the subsampling and the padding are kernels of their own, as ONNX Runtime's Slice and Pad)."""
    out = [("conv1", ("conv1",), ((INPUT, 1.0),), "conv1")]
    prev = "conv1"
    for stage in (1, 2, 3):
        for i in range((depth - 2) // 6):
            p, changes = f"layer{stage}.{i}", i == 0 and stage > 1
            out.append((f"{p}.conv1", (f"{p}.conv1",), ((prev, 1.0),), f"{p}.conv1"))
            if changes and shortcut == "B":
                out.append((f"{p}.shortcut.0", (f"{p}.shortcut.0",), ((prev, 0.25),), f"{p}.shortcut.0"))
                sc = (f"{p}.shortcut.0", 1.0)
            elif changes and target == "ort-cpu":   # the export's Slice and Pad: tensors ONNX Runtime writes
                sub, pad = f"{p}.shortcut.subsample", f"{p}.shortcut.pad"
                out += [(sub, (), ((prev, 0.25),), sub), (pad, (), ((sub, 1.0),), pad)]
                sc = (pad, 1.0)
            else:
                sc = (prev, 0.25 if changes else 1.0)
            if target == "generic":
                out.append((f"{p}.conv2", (f"{p}.conv2",), ((f"{p}.conv1", 1.0), sc), f"{p}.conv2"))
                prev = f"{p}.conv2"
            else:
                out.append((f"{p}.conv2", (f"{p}.conv2",), ((f"{p}.conv1", 1.0),), f"{p}.conv2"))
                out.append((f"{p}.add", (), ((f"{p}.conv2", 1.0), sc), f"{p}.add"))
                prev = f"{p}.add"
    return out + [("pool", (), ((prev, 1.0),), "pool"), ("linear", ("linear",), (("pool", 1.0),), "linear")]


def as_tuples(kernels):
    return [(k.name, k.layers, tuple((r.tensor, r.fraction) for r in k.reads), k.writes) for k in kernels]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shortcut", SHORTCUTS)
@pytest.mark.parametrize("depth", [8, 20, 56])
def test_resnet_kernels_follow_the_fusion_table(depth, shortcut, target):
    """A CIFAR ResNet declares exactly the kernels of the fusion table, in order, under each target;
    every kernel writes the tensor named after it, and tensors() lists the image and those tensors in
    that order, with the Slot each is written in and its signedness: the image, the projections (conv +
    BN, no ReLU), the pre-add conv2 outputs (ort-cpu) and the logits can be negative, ReLU outputs and
    the pooled features cannot."""
    model = build_model(f"resnet{depth}", shortcut)
    kernels = model.kernels(target)
    assert as_tuples(kernels) == expected_resnet_kernels(depth, shortcut, target)
    tensors = model.tensors(target)
    assert [t.name for t in tensors] == [INPUT] + [k.writes for k in kernels]
    slot_of = {t.name: t.slot for t in tensors}
    assert (slot_of[INPUT], slot_of["conv1"], slot_of["pool"], slot_of["linear"]) == (
        "q_input", "q_stem", "q_pool", "q_logits")
    signed = {t.name for t in tensors if t.signed}
    for name, slot in slot_of.items():
        if name.endswith(".conv1"):
            assert slot == name[:-len("conv1")] + "q1"
        elif name.endswith(".shortcut.0"):
            assert slot == name[:-len("shortcut.0")] + "q_sc"
        elif name.endswith(".conv2"):
            assert slot == name[:-len("conv2")] + ("q_out" if target == "generic" else "q_mid")
        elif name.endswith(".add"):
            assert slot == name[:-len("add")] + "q_out"
        elif name.endswith((".shortcut.subsample", ".shortcut.pad")):
            assert slot == name.replace(".shortcut.", ".shortcut.q_")
    follows = {t.name: t.follows for t in tensors if t.follows}
    block_input = {k.writes: k.reads[0].tensor for k in kernels if k.name.endswith(".conv1")}
    assert follows == {n: block_input[n.replace("shortcut.subsample", "conv1").replace("shortcut.pad", "conv1")]
                       for n in slot_of if ".shortcut." in n and not n.endswith(".0")}
    assert bool(follows) == (shortcut == "A" and target == "ort-cpu")
    expected_signed = {INPUT, "linear"} | {n for n in slot_of if n.endswith(".shortcut.0")}
    if target == "ort-cpu":
        expected_signed |= {n for n in slot_of if n.endswith(".conv2")}
    assert signed == expected_signed
    assert model.kernels() == model.kernels(DEFAULT_TARGET) == model.kernels("generic")
    assert model.tensors() == model.tensors("generic")


def test_resnet20_declared_counts():
    """ResNet-20 B (generic): 22 weight layers, 23 kernels, 24 tensors; A has no projections (20, 21,
    22); ort-cpu adds one add kernel and one tensor per block (9), and for A the Slice and Pad of its two
    subsampling shortcuts (4)."""
    for shortcut, (layers, kernels) in {"B": (22, 23), "A": (20, 21)}.items():
        m = resnet20(shortcut)
        assert len(quantizable_layers(m)) == layers
        assert len(m.kernels()) == kernels and len(m.tensors()) == kernels + 1
        extra = 9 + 4 * (shortcut == "A")
        assert len(m.kernels("ort-cpu")) == kernels + extra and len(m.tensors("ort-cpu")) == kernels + extra + 1
    names = [t.name for t in resnet20("B").tensors()]
    assert names[:6] == [INPUT, "conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert names[-6:] == ["layer3.1.conv1", "layer3.1.conv2", "layer3.2.conv1", "layer3.2.conv2", "pool", "linear"]
    assert {"layer2.0.shortcut.0", "layer3.0.shortcut.0"} <= set(names)


def test_mobilenetv2_declarations():
    """MobileNetV2: per block expand, depthwise and project kernels; the 4 projection shortcuts as their
    own kernels; the residual add fused into the project conv (generic) or its own kernel in the 14
    stride-1 blocks (ort-cpu); the head's conv2, pool, linear. The project outputs (linear bottlenecks),
    the add outputs, the projections, the image and the logits are signed."""
    m = build_model("mobilenetv2")
    residual = [i for i, b in enumerate(m.layers) if b.residual]
    assert len(residual) == 14 and [i for i, b in enumerate(m.layers) if b.projection] == [0, 1, 10, 16]
    for target, n_kernels in (("generic", 1 + 17 * 3 + 4 + 3), ("ort-cpu", 1 + 17 * 3 + 4 + 3 + 14)):
        kernels = {k.name: k for k in m.kernels(target)}
        assert len(kernels) == n_kernels and len(m.tensors(target)) == n_kernels + 1
        assert [t.name for t in m.tensors(target)] == [INPUT] + list(kernels)
        assert kernels["layers.1.conv1"].reads == (Read("layers.0.conv3" if target == "generic" else "layers.0.add"),)
        assert kernels["layers.2.conv1"].reads == (Read("layers.1.conv3" if target == "generic" else "layers.1.add"),)
        assert kernels["layers.3.conv3"].reads == (Read("layers.3.conv2"),)      # stride 2: no residual
        if target == "generic":
            assert kernels["layers.1.conv3"].reads == (Read("layers.1.conv2"), Read("layers.1.shortcut.0"))
            assert kernels["layers.2.conv3"].reads == (Read("layers.2.conv2"), Read("layers.1.conv3"))
            assert kernels["layers.2.conv3"].ops == ("layers.2.conv3", "layers.2.add")
        else:
            assert kernels["layers.2.conv3"].reads == (Read("layers.2.conv2"),)
            assert kernels["layers.2.add"].reads == (Read("layers.2.conv3"), Read("layers.1.add"))
            assert kernels["layers.2.add"].layers == ()
        assert [k for k in kernels][-3:] == ["conv2", "pool", "linear"]
        assert kernels["conv2"].reads == (Read("layers.16.conv3" if target == "generic" else "layers.16.add"),)
        signed = {t.name for t in m.tensors(target) if t.signed}
        expected = ({INPUT, "linear"} | {f"layers.{i}.conv3" for i in range(17)}
                    | {f"layers.{i}.shortcut.0" for i in (0, 1, 10, 16)})
        if target == "ort-cpu":
            expected |= {f"layers.{i}.add" for i in residual}
        assert signed == expected


@pytest.mark.parametrize("arch,shortcut,target", every_model_target())
def test_check_structure_accepts_every_model(arch, shortcut, target):
    """check_structure accepts every registered model under both targets; its segments list every
    kernel once, in order, so every Conv2d/Linear sits in exactly one segment; block segments hold
    only their own kernels; its conv-BN pairs name every BN of the model (each follows one conv)."""
    model = build_model(arch, shortcut)
    check_structure(model, target)
    segs = model.segments(target)
    assert all(isinstance(s, Segment) for s in segs)
    assert [k for s in segs for k in s.kernels] == [k.name for k in model.kernels(target)]
    layers_of = {k.name: k.layers for k in model.kernels(target)}
    covered = [n for s in segs for k in s.kernels for n in layers_of[k]]
    assert sorted(covered) == sorted(quantizable_layers(model)) and len(set(covered)) == len(covered)
    assert segs[0].name == "stem" and segs[0].kernels == ("conv1",) and layers_of["conv1"] == ("conv1",)
    assert segs[-1].name == "head" and segs[-1].kernels[-2:] == ("pool", "linear")
    for s in segs[1:-1]:
        assert s.kernels and all(k == s.name or k.startswith(s.name + ".") for k in s.kernels)
    mods = dict(model.named_modules())
    bns = {n for n, m in mods.items() if isinstance(m, nn.BatchNorm2d)}
    assert {bn for _, bn in model.conv_bn_pairs()} == bns
    assert all(isinstance(mods[t.slot], Slot) for t in model.tensors(target))
    if arch.startswith("resnet"):
        depth = int(arch[len("resnet"):])
        assert len(covered) == depth + (2 if shortcut == "B" else 0)  # 6n+2 layers + 2 projections
        assert len(segs) == 3 * (depth - 2) // 6 + 2
    else:   # 17 blocks, stem and head; the 3 stride-2 blocks split at each conv (one tensor live), the head at conv2
        assert len(covered) == 58 and len(segs) == 17 + 2 + 3 * 2 + 1


@pytest.mark.parametrize("target", ["", "cpu", "ort", "GENERIC", None])
def test_unknown_target_is_refused(target):
    """A target other than 'generic' or 'ort-cpu' is a ValueError naming the choices, wherever it is given."""
    m = resnet20("B")
    for f in (m.kernels, m.tensors, m.segments, lambda t: check_structure(m, t)):
        with pytest.raises(ValueError, match="ort-cpu"):
            f(target)
    with pytest.raises(ValueError, match="ort-cpu"):
        build_model("mobilenetv2").kernels(target)


@pytest.mark.parametrize("arch,shortcut,target", every_model_target())
def test_slots_run_once_in_order_and_signedness_holds(arch, shortcut, target):
    """In a forward pass every declared Slot runs exactly once, in the declared tensor order (the image
    first, then kernel order); a tensor declared never negative is never negative, and one declared
    signed does go negative (so no declaration wastes half a grid)."""
    torch.manual_seed(0)
    model = build_model(arch, shortcut).eval()
    fired, lows = [], {}
    tensors = model.tensors(target)

    def hook(name):
        def f(_m, _inputs, out):
            fired.append(name)
            lows[name] = float(out.min())
        return f

    handles = [model.get_submodule(t.slot).register_forward_hook(hook(t.name)) for t in tensors]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    for h in handles:
        h.remove()
    assert fired == [t.name for t in tensors]
    assert {t.name for t in tensors if t.signed} == {n for n, lo in lows.items() if lo < 0}


def test_slot_and_add_modules():
    """A Slot is the identity (the very tensor) until a quantizer is set, then applies it; it holds no
    parameters or buffers, so float checkpoints are unchanged by it. Add adds."""
    s = Slot()
    x = torch.randn(3, 4)
    assert s(x) is x
    assert not list(s.parameters()) and not list(s.buffers()) and s.state_dict() == {}
    s.quant = lambda t: 2 * t
    assert torch.equal(s(x), 2 * x)
    y = torch.randn(3, 4)
    assert torch.equal(Add()(x, y), x + y) and not list(Add().parameters())


def hand_ranges(model, target, bits=4, scale=0.1):
    """A fixed range for every tensor at `bits` (no calibration: these tests need some grid, not a good one)."""
    return {t.name: {"signed": t.signed, "scales": {str(bits): scale}} for t in model.tensors(target)}


@pytest.mark.parametrize("arch,shortcut,target", every_model_target())
def test_segments_chain_equals_forward(arch, shortcut, target):
    """Running the segments in order gives exactly (bit for bit) what forward() gives, in eval mode,
    for the float model and for its BN-folded copy with every weight and tensor quantized (the Slots sit
    inside the segments, so the chain quantizes what forward quantizes)."""
    torch.manual_seed(0)
    model = build_model(arch, shortcut).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    space = Space(tuple(quantizable_layers(model)), tuple(t.name for t in widths_of_their_own(model.tensors(target))))
    quantized = quantize_(fold_bn(model), space.uniform(4, 4), hand_ranges(model, target), target, clip="maxabs")
    assert all(s.quant is not None for s in slots(quantized, target).values())
    with torch.no_grad():
        outs = []
        for m in (model, quantized):
            h = x
            for seg in m.segments(target):
                h = seg.fn(h)
            assert torch.equal(h, m(x))
            outs.append(h)
    assert not torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)   # the quantizers ran


def test_resnet20_segment_names():
    """ResNet-20's segments are the stem, its nine blocks by module name, and the head; a projection
    block's segment holds its conv1, projection and conv2 kernels (and its add, ort-cpu)."""
    for target in TARGETS:
        segs = resnet20("A").segments(target)
        assert [s.name for s in segs] == (["stem"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
                                          + ["head"])
        b = resnet20("B")
        seg = b.segments(target)[4]
        extra = ("layer2.0.add",) if target == "ort-cpu" else ()
        assert seg.kernels == ("layer2.0.conv1", "layer2.0.shortcut.0", "layer2.0.conv2") + extra
        layers_of = {k.name: k.layers for k in b.kernels(target)}
        assert tuple(n for k in seg.kernels for n in layers_of[k]) == ("layer2.0.conv1", "layer2.0.shortcut.0",
                                                                      "layer2.0.conv2")
        assert b.segments(target)[-1].kernels == ("pool", "linear")


class _Tiny(nn.Module):
    """Image slot, conv-BN-ReLU, linear; a spare BN with the wrong channel count and a spare Slot. The
    declarations are overridden per test case below."""

    def __init__(self):
        super().__init__()
        self.q_in = Slot()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.q_conv = Slot()
        self.other = nn.BatchNorm2d(3)
        self.linear = nn.Linear(4, 2)
        self.q_lin = Slot()
        self.spare = Slot()

    def stem(self, x):
        return self.q_conv(torch.relu(self.bn(self.conv(self.q_in(x)))))

    def head(self, x):
        return self.q_lin(self.linear(x.mean((2, 3))))

    def forward(self, x):
        return self.head(self.stem(x))


def tiny_kernels(**changes):
    """The tiny model's correct kernels, with fields of named kernels replaced: changes = {kernel: {field: value}}."""
    ks = {"conv": dict(name="conv", layers=("conv",), reads=(Read(INPUT),), writes="conv", ops=("conv",)),
          "linear": dict(name="linear", layers=("linear",), reads=(Read("conv"),), writes="linear", ops=("linear",))}
    for k, fields in changes.items():
        ks[k].update(fields)
    return [Kernel(**v) for v in ks.values()]


GOOD_TENSORS = [Tensor(INPUT, "q_in", True), Tensor("conv", "q_conv", False), Tensor("linear", "q_lin", True)]


def tiny(kernels=None, tensors=None, segments=(("conv",), ("linear",)), pairs=(("conv", "bn"),)):
    m = _Tiny()
    kernels = tiny_kernels() if kernels is None else kernels
    tensors = GOOD_TENSORS if tensors is None else tensors
    m.kernels = lambda target=DEFAULT_TARGET: list(kernels)
    m.tensors = lambda target=DEFAULT_TARGET: list(tensors)
    m.segments = lambda target=DEFAULT_TARGET: [Segment(f"s{i}", (m.stem, m.head)[min(i, 1)], tuple(ks))
                                                for i, ks in enumerate(segments)]
    m.conv_bn_pairs = lambda: list(pairs)
    return m


@pytest.mark.parametrize("model,message", [
    (lambda: tiny(), None),
    # weight layers: every Conv2d/Linear in exactly one kernel
    (lambda: tiny(tiny_kernels(linear={"layers": ()})), "missing \\['linear'\\]"),
    (lambda: tiny(tiny_kernels(linear={"layers": ("linear", "conv")})), "repeated \\['conv'\\]"),
    (lambda: tiny(tiny_kernels(linear={"layers": ("linear", "fc")})), "unknown \\['fc'\\]"),
    (lambda: tiny(tiny_kernels(linear={"layers": ("linear", "bn")})), "unknown \\['bn'\\]"),
    # reads: only tensors already written (the image, or an earlier kernel's)
    (lambda: tiny(tiny_kernels(conv={"reads": (Read("nothing"),)})), "reads 'nothing' before any kernel writes"),
    (lambda: tiny(tiny_kernels(conv={"reads": (Read("linear"),)})), "reads 'linear' before any kernel writes"),
    (lambda: tiny(tiny_kernels(linear={"reads": (Read("conv"), Read("conv", 0.0))})), "fraction 0.0"),
    (lambda: tiny(tiny_kernels(linear={"reads": (Read("conv", 1.5),)})), "fraction 1.5"),
    # writes: one new tensor named after the kernel
    (lambda: tiny(tiny_kernels(linear={"writes": "out"})), "must write one new tensor"),
    (lambda: tiny(tiny_kernels(linear={"writes": "conv"})), "must write one new tensor"),
    (lambda: tiny(tiny_kernels(linear={"name": "conv", "writes": "conv"})), "must write one new tensor"),
    # ops: modules of the model
    (lambda: tiny(tiny_kernels(linear={"ops": ("fc",)})), "ops \\['fc'\\]"),
    (lambda: tiny(tiny_kernels(linear={"ops": ()})), "ops \\(none\\)"),
    # tensors: exactly the image and one per kernel, each in its own Slot
    (lambda: tiny(tensors=GOOD_TENSORS[:2]), "missing \\['linear'\\]"),
    (lambda: tiny(tensors=GOOD_TENSORS[1:]), "missing \\['input'\\]"),
    (lambda: tiny(tensors=GOOD_TENSORS + [Tensor("extra", "spare", False)]), "unknown \\['extra'\\]"),
    (lambda: tiny(tensors=GOOD_TENSORS + [Tensor("conv", "spare", False)]), "repeated \\['conv'\\]"),
    (lambda: tiny(tensors=[GOOD_TENSORS[0], Tensor("conv", "conv", False), GOOD_TENSORS[2]]), "not a Slot"),
    (lambda: tiny(tensors=[GOOD_TENSORS[0], Tensor("conv", "q_nope", False), GOOD_TENSORS[2]]), "not a Slot"),
    (lambda: tiny(tensors=[GOOD_TENSORS[0], Tensor("conv", "q_in", False), GOOD_TENSORS[2]]), "share one Slot"),
    # segments: every kernel once, in kernel order
    (lambda: tiny(segments=(("conv",), ())), "segments\\(\\) must list"),
    (lambda: tiny(segments=(("linear",), ("conv",))), "segments\\(\\) must list"),
    (lambda: tiny(segments=(("conv",), ("linear", "linear"))), "segments\\(\\) must list"),
    # conv-BN pairs
    (lambda: tiny(pairs=(("conv", "nope"),)), "does not name"),
    (lambda: tiny(pairs=(("linear", "bn"),)), "does not name"),
    (lambda: tiny(pairs=(("conv", "other"),)), "channel mismatch"),
    (lambda: tiny(pairs=(("conv", "bn"), ("conv", "bn"))), "folded twice"),
])
def test_check_structure_rejects_wrong_declarations(model, message):
    """check_structure raises ValueError for a weight layer in no kernel, in two or unknown; a kernel
    reading a tensor no one wrote (or one written later), or a fraction outside (0, 1]; a kernel writing
    a tensor not named after it, or one already written; ops that are not modules; tensors() missing
    the image or a kernel's tensor, naming an unknown one or one twice, a tensor whose slot is no Slot,
    two tensors in one Slot; segments that skip, repeat or reorder kernels; and a conv-BN pair that is
    not a Conv2d + BatchNorm2d of its channels, or folds a BN twice. The correct declaration passes."""
    m = model()
    if message is None:
        for target in TARGETS:
            check_structure(m, target)
        return
    with pytest.raises(ValueError, match=message):
        check_structure(m)


def test_a_strided_kernel_is_charged_the_elements_it_uses():
    """One rule for what a convolution reads: the elements under at least one of its windows. The declaration's
    fraction (models.structure.strided_fraction) and the trace's view of the real tensor (quant.trace.
    conv_read_view) agree: a 1x1 stride-2 projection uses a quarter of its input (x[:, :, ::2, ::2]), a 3x3
    stride-2 convolution with padding all of it, a 2-wide kernel at stride 3 two thirds of each axis."""
    import torch.nn as nn
    from models.structure import strided_fraction
    from quant.trace import conv_read_view
    x = torch.arange(2 * 12 * 12, dtype=torch.float32).reshape(1, 2, 12, 12)
    cases = [(nn.Conv2d(2, 4, 1, stride=2), 0.25), (nn.Conv2d(2, 4, 3, stride=2, padding=1), 1.0),
             (nn.Conv2d(2, 4, 1), 1.0), (nn.Conv2d(2, 4, 2, stride=3), 4 / 9), (nn.Conv2d(2, 4, 1, stride=3), 1 / 9)]
    for conv, fraction in cases:
        used = conv_read_view(conv, x)
        assert strided_fraction(conv) == pytest.approx(fraction)
        assert used.numel() == pytest.approx(fraction * x.numel())
    assert torch.equal(conv_read_view(nn.Conv2d(2, 4, 1, stride=2), x), x[:, :, ::2, ::2])
    b = resnet20("B")
    (proj,) = [r for k in b.kernels() if k.name == "layer2.0.shortcut.0" for r in k.reads]
    assert proj.fraction == 0.25 and proj.tensor == "layer1.2.conv2"
