"""Properties of the CIFAR ResNets (models/resnet.py): sizes, shapes, names, errors."""
import pytest
import torch

from models.resnet import (DEPTHS, PARAM_COUNTS, SHORTCUTS, CifarResNet, PadShortcut, build_model,
                           count_parameters, resnet20)



def expected_keys(depth, shortcut):
    """The state_dict keys of the common CIFAR ResNet convention, spelled out by hand."""
    def bn(prefix):
        return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    n = (depth - 2) // 6
    keys = ["conv1.weight", *bn("bn1")]
    for stage in (1, 2, 3):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys += [f"{p}.conv1.weight", *bn(f"{p}.bn1"), f"{p}.conv2.weight", *bn(f"{p}.bn2")]
            if shortcut == "B" and i == 0 and stage > 1:
                keys += [f"{p}.shortcut.0.weight", *bn(f"{p}.shortcut.1")]
    return keys + ["linear.weight", "linear.bias"]


def test_resnet20_parameter_counts():
    """ResNet-20 has 269,722 parameters with shortcut A (He et al.'s 0.27M) and 272,474 with B."""
    assert count_parameters(resnet20("A")) == 269_722
    assert count_parameters(resnet20("B")) == 272_474
    assert PARAM_COUNTS[(20, "A")] == 269_722 and PARAM_COUNTS[(20, "B")] == 272_474


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_parameter_counts_all_depths(depth, shortcut):
    """Every (depth, shortcut) in PARAM_COUNTS has exactly the listed parameter count, and B adds
    the same two 1x1 projections + BN (2,752 parameters) at every depth."""
    assert count_parameters(CifarResNet(depth, shortcut)) == PARAM_COUNTS[(depth, shortcut)]
    assert PARAM_COUNTS[(depth, "B")] - PARAM_COUNTS[(depth, "A")] == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_param_counts_table_complete():
    assert set(PARAM_COUNTS) == {(d, s) for d in DEPTHS for s in SHORTCUTS}


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_forward_shape(shortcut):
    """A batch of N 32x32 RGB images gives N x 10 finite logits, in train and eval mode."""
    model = resnet20(shortcut)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        out = model(x[:1])
    assert out.shape == (1, 10)


def test_forward_shape_num_classes():
    model = CifarResNet(8, "B", num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("depth", [0, 2, 7, 9, 19, 21, 22, -4])
def test_invalid_depth_raises(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth, "B")


@pytest.mark.parametrize("shortcut", ["C", "a", "b", "", None])
def test_invalid_shortcut_raises(shortcut):
    with pytest.raises(ValueError, match="shortcut"):
        CifarResNet(20, shortcut)


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_parameter_names_follow_convention(shortcut):
    """state_dict keys are exactly the common CIFAR ResNet names (conv1, bn1, layer1.0.conv1,
    layer2.0.shortcut.0/.1 for B, linear), in that order, so pretrained checkpoints load unchanged."""
    keys = list(resnet20(shortcut).state_dict())
    assert keys == expected_keys(20, shortcut)
    for k in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.2.bn2.running_var",
              "linear.weight", "linear.bias"):
        assert k in keys
    has_projection = {"layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight",
                      "layer3.0.shortcut.0.weight", "layer3.0.shortcut.1.running_mean"} <= set(keys)
    assert has_projection == (shortcut == "B")
    assert not any("shortcut" in k for k in keys) == (shortcut == "A")


def test_parameter_names_deeper():
    assert list(CifarResNet(32, "B").state_dict()) == expected_keys(32, "B")


def test_pad_shortcut_is_option_a():
    """Option A: stride-2 subsample, the input channels in the middle, zero channels either side."""
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    y = PadShortcut(16)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_build_model_round_trip(shortcut):
    """build_model(model.model_args) rebuilds the same architecture (same keys and shapes)."""
    m = CifarResNet(32, shortcut, num_classes=10)
    assert m.model_args == {"arch": "resnet", "depth": 32, "shortcut": shortcut, "num_classes": 10}
    r = build_model(m.model_args)
    assert {k: v.shape for k, v in r.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="arch"):
        build_model({"arch": "vgg"})


def test_segments_chain_equals_forward():
    """Running the segments (stem, every block, head) in order gives exactly forward()."""
    torch.manual_seed(0)
    model = CifarResNet(20, "A").eval()
    segs = model.segments()
    assert [n for n, _ in segs] == (["stem"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
                                     + ["head"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = x
        for _, f in segs:
            h = f(h)
        assert torch.equal(h, model(x))
