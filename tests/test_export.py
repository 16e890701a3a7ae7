"""ONNX export with integer QDQ (utils/export.py) and ONNX Runtime's CPU build running it: agreement with the
fake-quant PyTorch model, what the runtime fuses into integer kernels under each target, the structure of the
file (int8 per-channel weights, uint8/int8 tensors, int32 biases, one dynamic-batch float input), refused and
rounded-up widths, fine-tuned checkpoints, the command line's exit codes, and a smoke run of
benchmarks/deploy_speed.py. A ResNet-8 trained for a few seconds on synthetic images."""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

import utils.export as X
import utils.ort_run as R
import utils.onnx_export as G
import utils.qat as Q
from models import build_model
from quant.calibrate import calibrate
from quant.cost import kernel_table
from quant.fold import fold_bn
from quant.recipe import Recipe
from quant.widths import FLOAT_BITS, A, W
from utils.options import ExportOptions
from utils.checkpoint import save_checkpoint
from utils.data import make_synthetic
from utils.io import SCHEMA_VERSION, atomic_write_json, sha256_file
from utils.train import PAD, Normalizer

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
NORM = Normalizer(MEAN, STD, "cpu")
ORT = "ort-cpu"


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic()


@pytest.fixture
def data_once(synthetic, monkeypatch):
    """The command line's --dataset synthetic, generated once per module instead of once per call."""
    import utils.data
    monkeypatch.setattr(utils.data, "make_synthetic", lambda *a, **k: synthetic)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic):
    """A ResNet-8 (shortcut B) trained 50 steps on synthetic images, saved as a stage-1 style checkpoint; its 8-bit
    ranges under both targets (the ort-cpu ones recorded in a stage-2 style 02_per_layer.json); test images."""
    torch.manual_seed(0)
    model = build_model("resnet8", "B")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.from_numpy(synthetic.train_x[:1024]), torch.from_numpy(synthetic.train_y[:1024])
    model.train()
    for _ in range(50):
        i = torch.randint(0, len(y), (32,))
        loss = F.cross_entropy(model(NORM(x[i])), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    root = tmp_path_factory.mktemp("export")
    ckpt = root / "resnet8.pt"
    save_checkpoint(ckpt, {"model_args": model.model_args, "model": model.state_dict(), "finished": True,
                           "normalization": {"mean": MEAN, "std": STD},
                           "data": {"name": "synthetic", "seed": 0, "val_size": 0}})
    ranges = {t: calibrate(fold_bn(model), t, [NORM(x[:256])], [8]) for t in ("generic", ORT)}
    results = root / "results"
    atomic_write_json(results / "02_per_layer.json", {
        "stage": "2", "schema_version": SCHEMA_VERSION, "target": ORT,
        "quantization": {"granularity": "channel", "clip": "mse", "weights": "BN-folded"},
        "activation_calibration": {"tensors": ranges[ORT]},
        "provenance": {"inputs": {"checkpoint": {"path": str(ckpt), "sha256": sha256_file(ckpt)}}}})
    return {"model": model, "ckpt": ckpt, "results": results, "ranges": ranges, "root": root, "train_x": x,
            "train_y": y, "x": torch.from_numpy(synthetic.test_x[:600]), "y": torch.from_numpy(synthetic.test_y[:600])}


def space(model, target=ORT):
    return kernel_table(model, target).space


def exported(trained, cfg, target=ORT, signed_dtype=X.DEFAULT_SIGNED_DTYPE):
    qm = G.placed_model(trained["model"], cfg, trained["ranges"][target], target)
    return qm, G.to_onnx(qm, signed_dtype)


def inits(proto):
    return {i.name: i for i in proto.graph.initializer}


def producer(proto):
    return {o: n for n in proto.graph.node for o in n.output}


# ---------------------------------------------------------------- the runtime
def test_ort_cpu_w8a8_runs_in_integer_and_agrees(trained):
    """Under --target ort-cpu, W8A8 runs entirely in integer kernels (every conv QLinearConv, every add
    QLinearAdd, the linear layer QGemm, the pool QLinearGlobalAveragePool; one QuantizeLinear for the image, one
    DequantizeLinear for the logits), and ONNX Runtime classifies like the fake-quant PyTorch model."""
    qm, proto = exported(trained, space(trained["model"]).uniform(8, 8))
    f = R.fusion_report(proto)
    assert (f["convs"], f["adds"]) == (9, 3)
    assert f["integer_convs"] == 9 and f["integer_adds"] == 3 and f["integer_linears"] == 1 and f["integer_pools"] == 1
    assert f["quantize_nodes"] == 1 and f["dequantize_nodes"] == 1
    c = R.check_agreement(proto, qm, trained["x"], trained["y"], NORM)
    assert c["images"] == 600 and c["passed"], c
    assert c["agreement"] >= X.MIN_AGREEMENT and abs(c["acc_diff"]) <= X.MAX_ACC_DIFF
    assert c["torch_acc"] > 30     # a classifier, not chance: agreement means something


def test_generic_target_leaves_the_add_and_its_conv_float(trained):
    """Under the generic target the add is fused into conv2 and nothing quantized sits between them: ONNX Runtime
    runs conv2 (one per block) and the add in float; the export still computes what the simulation computes."""
    qm, proto = exported(trained, space(trained["model"], "generic").uniform(8, 8), "generic")
    f = R.fusion_report(proto)
    assert f["integer_convs"] == 9 - 3 and f["integer_adds"] == 0
    c = R.check_agreement(proto, qm, trained["x"], trained["y"], NORM)
    assert c["passed"], c


def test_fp32_export_computes_the_folded_float_model(trained):
    """Everything float: no Q/DQ at all, float initializers, and the same logits as the BN-folded model."""
    folded = fold_bn(trained["model"])
    proto = G.to_onnx(folded)
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert all(i.data_type == TensorProto.FLOAT for i in proto.graph.initializer if i.name.endswith(("weight", "bias")))
    a = R.ort_logits(R.ort_session(proto), trained["x"][:64], NORM)
    b = R.torch_logits(folded, trained["x"][:64], NORM)
    assert np.allclose(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the file
def test_qdq_structure(trained):
    """onnx.checker passes; one float NCHW input with a dynamic batch; int8 weight initializers with one scale per
    output channel (DequantizeLinear on axis 0, levels within -127..127, zero point 0); every quantized tensor one
    QuantizeLinear, uint8 with zero point 0 after a ReLU, the signed ones uint8 with zero point 128 (same grid) or,
    with signed_dtype int8, int8 with zero point 0; int32 biases with scale = input scale x weight scale."""
    sp = space(trained["model"])
    cfg = sp.uniform(8, 8)
    qm, proto = exported(trained, cfg)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    init, prod = inits(proto), producer(proto)
    convs = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == len(sp.layers)
    for n in convs:
        dq = prod[n.input[1]]
        assert dq.op_type == "DequantizeLinear" and {a.name: a.i for a in dq.attribute}.get("axis") == 0
        w, s, z = (numpy_helper.to_array(init[i]) for i in dq.input)
        assert w.dtype == np.int8 and np.abs(w).max() <= 127 and s.shape == (w.shape[0],) and not z.any()
        bdq = prod[n.input[2]]
        b, bs, _ = (numpy_helper.to_array(init[i]) for i in bdq.input)
        xdq = prod[n.input[0]]
        assert b.dtype == np.int32 and np.allclose(bs, numpy_helper.to_array(init[xdq.input[1]]) * s)
    signed = kernel_table(trained["model"], ORT).signed
    for signed_dtype in ("uint8", "int8"):
        proto = G.to_onnx(qm, signed_dtype)
        init = inits(proto)
        qs = {n.output[0]: n for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        assert len(qs) == len(sp.tensors)
        for t in trained["model"].tensors(ORT):      # each tensor's QuantizeLinear is named after its Slot
            tensor, z = t.name, numpy_helper.to_array(init[qs[f"{t.slot}.q"].input[2]])
            if not signed[tensor]:
                assert (z.dtype, int(z)) == (np.uint8, 0), tensor
            else:
                assert (z.dtype, int(z)) == ((np.uint8, 128) if signed_dtype == "uint8" else (np.int8, 0)), tensor
    sess = R.ort_session(proto)
    for batch in (1, 3):
        assert sess.run(None, {"input": np.zeros((batch, 3, 32, 32), np.float32)})[0].shape == (batch, 10)


def test_mixed_configuration_keeps_float_groups_float(trained):
    """A configuration with float weights and float tensors: those stay float (no QDQ, float initializers), a
    layer ONNX Runtime cannot fuse keeps a float bias, the rest is integer, and the export still agrees."""
    sp = space(trained["model"])
    cfg = sp.uniform(8, 8)
    cfg[W, "layer2.0.conv1"] = FLOAT_BITS       # a float conv: float weights and bias
    cfg[A, "layer1.0.conv1"] = FLOAT_BITS       # layer1.0.conv2 reads a float tensor: it cannot be fused
    qm, proto = exported(trained, cfg)
    init = inits(proto)
    assert init["layer2.0.conv1.weight"].data_type == TensorProto.FLOAT
    assert init["layer2.0.conv1.bias"].data_type == TensorProto.FLOAT
    assert init["layer1.0.conv2.bias"].data_type == TensorProto.FLOAT and "layer1.0.conv2.weight_int8" in init
    assert "layer1.0.q1.scale" not in init
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == len(sp.tensors) - 1
    f = R.fusion_report(proto)
    assert f["integer_convs"] == 9 - 3      # layer2.0.conv1 (float weights), layer1.0.conv1 and conv2 (float tensor)
    assert init["layer1.0.conv1.bias"].data_type == TensorProto.FLOAT
    assert R.check_agreement(proto, qm, trained["x"], trained["y"], NORM)["passed"]


def test_int4_weights_export_at_opset_21(trained):
    """4-bit weights are int4 initializers (opset 21); ONNX Runtime's CPU build runs those convs in float (it
    dequantizes the weights), and the export still computes what the simulation computes."""
    cfg = space(trained["model"]).uniform(8, 8)
    cfg[W, "layer3.0.conv2"] = 4
    qm, proto = exported(trained, cfg)
    assert proto.opset_import[0].version == G.OPSET_INT4
    assert inits(proto)["layer3.0.conv2.weight_int4"].data_type == TensorProto.INT4
    assert "layer3.0.conv2.bias" in inits(proto)      # float bias: not fused
    assert R.fusion_report(proto)["integer_convs"] == 9 - 1
    assert R.check_agreement(proto, qm, trained["x"], trained["y"], NORM)["passed"]


def test_exportable_widths_and_rounding():
    """8 bits and float for tensors; 8, 4 and float for weights; the rest refused, or rounded up."""
    cfg = {(W, "a"): 8, (W, "b"): 3, (W, "c"): 6, (W, "d"): 4, (W, "e"): 32,
           (A, "x"): 8, (A, "y"): 4, (A, "z"): 32}
    with pytest.raises(X.UserError, match="--round-up-widths"):
        G.exportable_config(cfg, round_up=False)
    out, changed = G.exportable_config(cfg, round_up=True)
    assert changed == {(W, "b"): (3, 4), (W, "c"): (6, 8), (A, "y"): (4, 8)}
    assert out == {**cfg, (W, "b"): 4, (W, "c"): 8, (A, "y"): 8}
    assert G.exportable_config({(W, "a"): 8, (A, "x"): 32}, False) == ({(W, "a"): 8, (A, "x"): 32}, {})


def test_mobilenetv2_exports_fully_integer_under_ort_cpu():
    """The other registered architecture (depthwise convs, signed block outputs): every conv and add integer
    under ort-cpu, with signed tensors stored as uint8 (ONNX Runtime's own int8->uint8 rewrite would miss some)."""
    torch.manual_seed(0)
    model = build_model("mobilenetv2")
    x = NORM(torch.from_numpy(make_synthetic(n_train=16, n_test=2).train_x))
    with torch.no_grad():
        model.train()
        model(x)
    model.eval()
    sp = space(model)
    qm = G.placed_model(model, sp.uniform(8, 8), calibrate(fold_bn(model), ORT, [x], [8]), ORT,
                        Recipe.for_target(ORT, clip="maxabs"))
    f = R.fusion_report(G.to_onnx(qm))
    assert f["integer_convs"] == f["convs"] == 57 and f["integer_adds"] == f["adds"] == 14


def test_shortcut_a_exports_as_slice_and_pad_on_the_integers():
    """Shortcut A (ResNet-8 A, W8A8, ort-cpu): the subsampling and the padding are a Slice and a Pad on the block
    input's quantized integers (no DequantizeLinear in front, the pad value its zero point), every conv and add
    runs in integer, and ONNX Runtime's logits agree with the fake-quant model's."""
    torch.manual_seed(0)
    model = build_model("resnet8", "A")
    data = make_synthetic(n_train=32, n_test=16)
    x = NORM(torch.from_numpy(data.train_x))
    with torch.no_grad():
        model.train()
        model(x)
    model.eval()
    qm = G.placed_model(model, space(model, ORT).uniform(8, 8), calibrate(fold_bn(model), ORT, [x], [8]), ORT,
                        Recipe.for_target(ORT, clip="maxabs"))
    proto = G.to_onnx(qm)
    prod = {o: n for n in proto.graph.node for o in n.output}
    for step, op in (("subsample", "Slice"), ("pad", "Pad")):
        nodes = [n for n in proto.graph.node if n.op_type == op]
        assert [n.name for n in nodes] == [f"{op}:layer{s}.0.shortcut.{step}" for s in (2, 3)]
        assert all(prod[n.input[0]].op_type in ("QuantizeLinear", "Slice") for n in nodes)
    f = R.fusion_report(proto)
    assert f["integer_convs"] == f["convs"] == 7 and f["integer_adds"] == f["adds"] == 3
    rep = R.check_agreement(proto, qm, torch.from_numpy(data.test_x), torch.from_numpy(data.test_y), NORM)
    assert rep["max_logit_diff"] < 0.05 * float(R.torch_logits(qm, torch.from_numpy(data.test_x), NORM).std())


# ---------------------------------------------------------------- the command line
def flat(text: str) -> str:
    """A wrapped message on one line (textwrap also breaks after the hyphens of a flag)."""
    return " ".join(text.replace("-\n", "-").split())


def cli(trained, *args):
    return X.main(["--checkpoint", str(trained["ckpt"]), "--results-dir", str(trained["results"]), "--device", "cpu",
                   *map(str, args)])


def test_cli_uniform_export_with_recorded_ranges(trained, tmp_path, capsys):
    """--w-bits 8 --a-bits 8 without data: the target and tensor ranges are stage 2's, the file is written, the
    output says what ONNX Runtime runs in integer."""
    out = tmp_path / "w8a8.onnx"
    assert cli(trained, "--w-bits", 8, "--a-bits", 8, "--check-images", 0, "--onnx", out) == 0
    text = capsys.readouterr().out
    assert "9 of 9 convolutions as QLinearConv" in text and "3 of 3 adds as QLinearAdd" in text
    assert "recorded them in" in text and "target ort-cpu" in text
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["target"] == ORT and json.loads(meta["config"])["format"] == "tensor-widths/1"
    assert json.loads(meta["normalization"]) == {"mean": MEAN, "std": STD}


def test_cli_refuses_unexecutable_widths_and_rounds_them_up(trained, tmp_path, capsys, data_once):
    """A configuration at widths the runtime cannot run: one paragraph, exit 2, no file; with --round-up-widths it
    is exported at 8 bits (with stage 2's 8-bit ranges), and the accuracy reported is that of the exported file,
    checked on ONNX Runtime."""
    sp = space(trained["model"])
    cfg = sp.uniform(8, 8)
    cfg[W, "layer1.0.conv1"], cfg[A, "layer2.0.conv1"] = 6, 4
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(sp.to_file(cfg)))
    out = tmp_path / "m.onnx"
    assert cli(trained, "--config", path, "--onnx", out, "--check-images", 0) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and "--round-up-widths" in flat(err)
    assert len(err.strip().split("\n\n")) == 1 and not out.exists()
    assert cli(trained, "--config", path, "--onnx", out, "--round-up-widths", "--check-images", 300) == 0
    text = capsys.readouterr().out
    assert "rounded up 2 group(s)" in text and "w6->8: 1" in text and "a4->8: 1" in text
    assert "check on 300 test-report images: ONNX Runtime" in text and "PASS" in text
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(out)).graph.node) == len(sp.tensors)


def write_search(trained, tmp_path):
    """A results folder with stage 2's file and a stage-3 style 03_search.json under ort-cpu whose answer keeps
    layer1.0.conv1's weights float (a float layer reading a quantized tensor)."""
    sp = space(trained["model"])
    searched = sp.uniform(8, 8)
    searched[W, "layer1.0.conv1"] = FLOAT_BITS
    results = tmp_path / "results"
    results.mkdir()
    (results / "02_per_layer.json").write_bytes((trained["results"] / "02_per_layer.json").read_bytes())
    atomic_write_json(results / "03_search.json", {
        "stage": "3", "schema_version": SCHEMA_VERSION, "target": ORT, "best": "greedy",
        "greedy": {"config": sp.to_file(searched), "ai": 50.0, "val_acc": 50.0},
        "quantization": {"granularity": "channel", "clip": "mse"},
        "activation_calibration": {"tensors": trained["ranges"][ORT]},
        "provenance": {"inputs": {"checkpoint": {"sha256": sha256_file(trained["ckpt"])}}}})
    return results


def test_cli_exports_stage_3_answer(trained, tmp_path, capsys):
    """--config 03_search.json exports the search's answer under its target with the ranges it used; a float
    layer reading a quantized tensor stays float in the file and the output says how to keep it float in ONNX
    Runtime; --target contradicting the search is refused."""
    results = write_search(trained, tmp_path)
    out = tmp_path / "searched.onnx"
    base = ["--checkpoint", str(trained["ckpt"]), "--config", str(results / "03_search.json"), "--onnx", str(out),
            "--check-images", "0", "--results-dir", str(tmp_path / "none")]
    assert X.main(base + ["--target", "generic"]) == 2 and "searched under --target ort-cpu" in flat(
        capsys.readouterr().err)
    assert X.main(base) == 0
    text = flat(capsys.readouterr().out)
    assert "the answer of" in text and "as the search used them" in text and "target ort-cpu" in text
    assert "disabled_optimizers=['WeightBiasQuantization']" in text and "8 of 9 convolutions as QLinearConv" in text
    init = inits(onnx.load(str(out)))
    assert init["layer1.0.conv1.weight"].data_type == TensorProto.FLOAT


def test_cli_bad_input(trained, tmp_path, capsys):
    """Exit 2 with one paragraph and no file for: no configuration; both --config and --w-bits; a width outside
    2-8; a file that is no checkpoint; a checkpoint of no registered model (the old test_qat export test)."""
    out = tmp_path / "x.onnx"
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    empty = tmp_path / "empty.pt"
    torch.save({"model": {}}, empty)
    cases = [((), "--w-bits N --a-bits N"), (("--config", junk, "--w-bits", 8), "not both"),
             (("--w-bits", 9), "width")]
    for args, phrase in cases:
        assert cli(trained, *args, "--onnx", out, "--check-images", 0) == 2, args
        err = flat(capsys.readouterr().err)
        assert phrase in err and "Traceback" not in err and not out.exists(), (args, err)
    for bad, phrase in ((junk, "could not be loaded"), (empty, "does not fit")):
        assert X.main(["--checkpoint", str(bad), "--onnx", str(out), "--w-bits", "8", "--check-images", "0"]) == 2
        err = flat(capsys.readouterr().err)
        assert phrase in err and "Traceback" not in err and not out.exists()


def test_cli_exit_code_1_when_the_check_fails(trained, tmp_path, monkeypatch, capsys, data_once):
    """The file is written, the check's verdict is FAIL, and the exit code says so."""
    monkeypatch.setattr(R, "MIN_AGREEMENT", 100.1)   # the check (utils.ort_run) reads its own threshold
    out = tmp_path / "m.onnx"
    assert cli(trained, "--w-bits", 8, "--a-bits", 8, "--onnx", out, "--check-images", 100) == 1
    assert "FAIL" in capsys.readouterr().out and out.exists()


# ---------------------------------------------------------------- fine-tuned checkpoints
@pytest.fixture(scope="module")
def finetuned(trained):
    """One epoch of QAT (ort-cpu) for two configurations: one the runtime executes (8 bits and float), one with
    a 4-bit tensor and 3-bit weights."""
    sp = space(trained["model"])
    ok = sp.uniform(8, 8)
    ok[W, "layer3.0.conv1"], ok[A, "layer2.0.conv1"] = FLOAT_BITS, FLOAT_BITS
    narrow = sp.uniform(8, 8)
    narrow[W, "layer1.0.conv2"], narrow[A, "layer1.0.conv1"] = 3, 4
    ranges = {**trained["ranges"][ORT]}
    four = calibrate(fold_bn(trained["model"]), ORT, [NORM(trained["train_x"][:128])], [4], ["layer1.0.conv1"])
    ranges["layer1.0.conv1"] = {"signed": False, "scales": {**ranges["layer1.0.conv1"]["scales"],
                                                            **four["layer1.0.conv1"]["scales"]}}
    padded = F.pad(trained["train_x"][:256], (0, 0, PAD, PAD, PAD, PAD))
    paths = {}
    for name, cfg in (("ok", ok), ("narrow", narrow)):
        qat = Q.prepare_qat(trained["model"], cfg, ranges, ORT)
        meta = {"name": name, "config": [[list(g), b] for g, b in cfg.items()],
                "model_args": trained["model"].model_args, "normalization": {"mean": MEAN, "std": STD},
                "quantization": {"granularity": "channel"}, "target": ORT}
        paths[name] = trained["root"] / f"qat_{name}.pt"
        Q.finetune(qat, paths[name], {"config": name}, meta, padded, trained["train_y"][:256], NORM, 1, 0.001, 64, 0)
    return paths


def test_finetuned_checkpoint_round_trip(trained, finetuned, tmp_path, capsys):
    """A fine-tuned checkpoint exports its own learned weights and scales (the configuration comes with it): the
    int8 levels are its quantizers' levels, and ONNX Runtime predicts what the fine-tuned model predicts."""
    out = tmp_path / "qat.onnx"
    assert X.main(["--checkpoint", str(finetuned["ok"]), "--onnx", str(out), "--check-images", "0"]) == 0
    assert "target ort-cpu" in capsys.readouterr().out
    qat, _ = Q.load_qat(finetuned["ok"])
    proto = onnx.load(str(out))
    init = inits(proto)
    layer = qat.get_submodule("layer2.0.conv2")
    q = layer.parametrizations.weight[0]
    assert np.array_equal(numpy_helper.to_array(init["layer2.0.conv2.weight_int8"]),
                          q.integers(layer.parametrizations.weight.original).numpy().astype(np.int8))
    assert np.allclose(numpy_helper.to_array(init["layer2.0.conv2.weight_scale"]), q.scale.detach().numpy())
    assert init["layer3.0.conv1.weight"].data_type == TensorProto.FLOAT and "layer2.0.q1.scale" not in init
    c = R.check_agreement(proto, qat, trained["x"], trained["y"], NORM)
    assert c["passed"] and c["max_logit_diff"] < 0.5, c


def test_finetuned_checkpoint_widths_and_flags(trained, finetuned, tmp_path, capsys):
    """A fine-tuned configuration at widths the runtime cannot run is refused, and exported with
    --round-up-widths (its learned clip ranges kept); --config or --w-bits with a fine-tuned checkpoint is refused."""
    out = tmp_path / "qat.onnx"
    base = ["--checkpoint", str(finetuned["narrow"]), "--onnx", str(out), "--check-images", "0"]
    assert X.main(base) == 2 and "--round-up-widths" in flat(capsys.readouterr().err) and not out.exists()
    assert X.main(base + ["--w-bits", "8"]) == 2 and "fine-tuned checkpoint" in capsys.readouterr().err
    assert X.main(base + ["--target", "generic"]) == 2 and "fine-tuned under" in capsys.readouterr().err
    assert X.main(base + ["--round-up-widths"]) == 0 and out.exists()
    qat, _ = Q.load_qat(finetuned["narrow"])
    learned = qat.get_submodule("layer1.0.q1").quant
    init = inits(onnx.load(str(out)))
    assert "layer1.0.conv2.weight_int4" in init            # 3 -> 4 bits
    s8 = float(numpy_helper.to_array(init["layer1.0.q1.scale"]))
    assert s8 * 255 == pytest.approx(float(learned.scale) * 15, rel=1e-6)    # the same clip range at 8 bits


# ---------------------------------------------------------------- the benchmark
def test_deploy_speed_smoke(trained, tmp_path, data_once):
    """benchmarks/deploy_speed.py in-process with tiny settings: fp32, uniform W8A8, the searched configuration
    of an ort-cpu 03_search.json, and ONNX Runtime's quantize_static, in the JSON shape stage 5 reads."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import deploy_speed
    results = write_search(trained, tmp_path)
    out = tmp_path / "speed.json"
    deploy_speed.main(["--checkpoint", str(trained["ckpt"]), "--results-dir", str(results), "--device", "cpu",
                       "--out", str(out), "--threads", "1", "--rounds", "1", "--latency-runs", "2",
                       "--throughput-runs", "1", "--test-images", "200", "--calib-images", "64",
                       "--ort-calib-images", "32"])
    r = json.loads(out.read_text())
    assert r["runtime"].startswith("onnxruntime ") and r["threads"] == 1 and r["images"] == 200
    names = [e["name"] for e in r["results"]]
    assert names == ["fp32", "uniform_w8a8", "searched", "ort_quantize_static"]
    for e in r["results"]:
        assert e["latency_ms_b1"] > 0 and e["throughput_b64"] > 0 and 0 <= e["test_acc"] <= 100
    by = {e["name"]: e for e in r["results"]}
    assert by["uniform_w8a8"]["fusion"]["integer_convs"] == 9 and by["searched"]["fusion"]["integer_convs"] == 8
    assert by["ort_quantize_static"]["fusion"]["integer_convs"] == 9 and by["fp32"]["fusion"]["integer_convs"] == 0
    assert by["uniform_w8a8"]["agreement"]["agreement"] >= 99 and "met" in r["goal"]
    assert by["fp32"]["drop_vs_fp32"] == 0 and len(r["goal"]["uniform_w8a8_acc_minus_ort_quantizer_ci95"]) == 2
    assert set(r["machine"]) >= {"load_average_before", "load_average_after", "cores"}


# ---------------------------------------------------------------- x86 CPUs without VNNI
def test_ort_cpu_default_range_7_levels_are_exported_exactly(trained):
    """Under ort-cpu the 8-bit weights default to range 7: the file's int8 levels are the simulated quantizer's
    levels (-63..63) and its scales the quantizer's scales, bit for bit; the evaluator that stages 2-4 use
    computes the same weights; every conv still runs in integer and ONNX Runtime agrees with the simulation."""
    from quant.evaluation import CachedEvaluator
    model = trained["model"]
    cfg = space(model).uniform(8, 8)
    qm, proto = exported(trained, cfg)
    ev = CachedEvaluator(model, kernel_table(model, ORT), trained["x"][:8], trained["y"][:8], NORM,
                         trained["ranges"][ORT], weight_range=7)
    init = inits(proto)
    for name in space(model).layers:
        layer = qm.get_submodule(name)
        q = layer.parametrizations.weight[0]
        assert (q.qmin, q.qmax) == (-63, 63)
        levels = numpy_helper.to_array(init[f"{name}.weight_int8"])
        assert np.array_equal(levels, q.integers(layer.parametrizations.weight.original).numpy())
        assert levels.min() >= -63 and levels.max() <= 63 and np.abs(levels).max() == 63
        scale = numpy_helper.to_array(init[f"{name}.weight_scale"])
        assert np.array_equal(scale, q.scale.detach().numpy())
        simulated = ev.weight(name, 8).numpy()
        assert np.allclose(levels.reshape(len(scale), -1) * scale[:, None], simulated.reshape(len(scale), -1),
                           rtol=1e-6, atol=0)
    f = R.fusion_report(proto)
    assert f["integer_convs"] == 9 and f["integer_adds"] == 3
    assert R.check_agreement(proto, qm, trained["x"], trained["y"], NORM)["passed"]


def test_cli_weight_range_default_recorded_and_followed(trained, tmp_path, capsys):
    """Without a stage-2 record the export uses range 7 under ort-cpu and records it (report, file metadata) with
    the machine that ran it; a stage-2 file that records no range is followed as range 8 (what it simulated);
    --weight-range overrides it, with a note; a fine-tuned checkpoint refuses another range."""
    out = tmp_path / "w8a8.onnx"
    rep = X.export(ExportOptions.from_args(X.get_args_parser().parse_args(
        ["--checkpoint", str(trained["ckpt"]), "--results-dir", str(tmp_path / "none"), "--w-bits", "8", "--a-bits",
         "8", "--target", ORT, "--check-images", "0", "--calib-images", "64", "--dataset", "synthetic", "--onnx",
         str(out), "--ptq", "nearest", "--stats-correction", "none"])))
    assert rep["quantization"]["weight_range"] == 7 and rep["int8_weight_layers"] == 10
    assert rep["quantization"]["correction"] == "none"
    with pytest.raises(X.UserError, match="needs 512 calibration images; only 64 are loaded.*--stats-correction none"):
        X.export(ExportOptions.from_args(X.get_args_parser().parse_args(     # the default correction, too few images
            ["--checkpoint", str(trained["ckpt"]), "--results-dir", str(tmp_path / "none"), "--w-bits", "8",
             "--a-bits", "8", "--target", ORT, "--check-images", "0", "--calib-images", "64", "--dataset",
             "synthetic", "--onnx", str(tmp_path / "refused.onnx"), "--ptq", "nearest"])))
    assert not (tmp_path / "refused.onnx").exists()
    assert set(rep["machine"]["cpu"]) >= {"model", "vnni", "int8_isa"} and rep["machine"]["onnxruntime"]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["quantization"])["weight_range"] == 7
    assert "8-bit weights in range 7" in capsys.readouterr().out
    assert cli(trained, "--w-bits", 8, "--a-bits", 8, "--check-images", 0, "--onnx", out) == 0
    assert "8-bit weights in range 8" in capsys.readouterr().out
    assert numpy_helper.to_array(inits(onnx.load(str(out)))["conv1.weight_int8"]).max() > 63
    assert cli(trained, "--w-bits", 8, "--a-bits", 8, "--check-images", 0, "--onnx", out, "--weight-range", 7) == 0
    text = flat(capsys.readouterr().out)
    assert "--weight-range 7 differs from the range 8 that stage 2 measured" in text and "range 7" in text


def test_finetuned_checkpoint_keeps_its_weight_range(trained, finetuned, tmp_path, capsys):
    out = tmp_path / "qat.onnx"
    assert X.main(["--checkpoint", str(finetuned["ok"]), "--onnx", str(out), "--check-images", "0",
                   "--weight-range", "7"]) == 2
    err = flat(capsys.readouterr().err)
    assert "fine-tuned with 8-bit weights in range 8" in err and not out.exists()


def test_failed_check_names_the_saturation_on_cpus_without_vnni(trained, tmp_path, monkeypatch, capsys, data_once):
    """When the check fails with full-range 8-bit weights on a CPU without VNNI, the message names the cause
    (the 16-bit pair sums of vpmaddubsw) and the remedy (--weight-range 7) in one paragraph; in range 7 it does
    not blame the instruction set."""
    no_vnni = {"cpu": {"model": "AVX2 test CPU", "machine": "x86_64", "logical_cpus": 2, "int8_isa": ["avx2"],
                       "vnni": False}, "onnxruntime": "test", "providers": ["CPUExecutionProvider"]}
    monkeypatch.setattr(X, "runtime_machine", lambda: no_vnni)
    monkeypatch.setattr(R, "MIN_AGREEMENT", 100.1)   # the check (utils.ort_run) reads its own threshold
    out = tmp_path / "m.onnx"
    assert cli(trained, "--w-bits", 8, "--a-bits", 8, "--onnx", out, "--check-images", 100, "--weight-range", 8) == 1
    text = flat(capsys.readouterr().out)
    assert "FAIL" in text and "vpmaddubsw" in text and "AVX2 test CPU (without VNNI" in text
    assert "export with --weight-range 7" in text
    assert cli(trained, "--w-bits", 8, "--a-bits", 8, "--onnx", out, "--check-images", 100, "--weight-range", 7) == 1
    text = flat(capsys.readouterr().out)
    assert "FAIL" in text and "vpmaddubsw" not in text and "disagree beyond rounding" in text


def test_pair_sums_saturate_like_vpmaddubsw():
    """The emulation by hand: two products of 255 x 127 add to 64,770, which int16 saturation cuts to 32,767
    (and -32,768 below); in range 7 the largest pair, 2 x 255 x 63 = 32,130, is exact; an odd K pairs the last
    product with zero; unsaturated pair sums are the exact int32 product."""
    from utils.ort_x86 import pair_sums
    x = torch.tensor([[255], [255], [255]])
    exact, emul, sat, big = pair_sums(x, torch.tensor([[127, 127, 1], [-127, -127, 0], [63, 63, 63]]))
    assert exact.flatten().tolist() == [64770 + 255, -64770, 3 * 255 * 63]
    assert emul.flatten().tolist() == [32767 + 255, -32768, 3 * 255 * 63] and sat == 2 and big == 64770
    g = torch.Generator().manual_seed(0)
    xs, ws = torch.randint(0, 256, (64, 50), generator=g), torch.randint(-63, 64, (8, 64), generator=g)
    exact, emul, sat, big = pair_sums(xs, ws)
    assert sat == 0 and big <= 32130 and torch.equal(exact, emul) and torch.equal(exact, ws @ xs)


SHIPPED = Path(__file__).resolve().parent.parent / "pretrained" / "resnet20_cifar10jpeg_30ep.pt"
JPEG = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not (SHIPPED.exists() and JPEG.exists()), reason="needs the shipped model and the JPEG data")
def test_shipped_model_saturates_without_vnni_on_the_full_range_only():
    """The non-VNNI kernel emulated on the shipped ResNet-20's exported integer convolutions (W8A8, ort-cpu,
    8 test images): on the full int8 grid pair sums pass int16 and change conv outputs, in both K orders, most
    of all in the first conv; in range 7, the default, none does."""
    from utils.checkpoint import load_model
    from utils.data import load_dataset
    from utils.ort_x86 import conv_saturation
    model, meta = load_model(SHIPPED)
    data = load_dataset("cifar10", JPEG)
    norm = Normalizer(meta["normalization"]["mean"], meta["normalization"]["std"], "cpu")
    rng = np.random.default_rng(0)
    calib = norm(torch.from_numpy(data.train_x[rng.choice(len(data.train_y), 256, replace=False)]))
    x = norm(torch.from_numpy(data.test_x[rng.choice(len(data.test_y), 8, replace=False)])).numpy()
    ranges = calibrate(fold_bn(model), ORT, [calib], [8])
    cfg = space(model).uniform(8, 8)
    for r in (8, 7):
        proto = G.to_onnx(G.placed_model(model, cfg, ranges, ORT, Recipe.for_target(ORT, weight_range=r)))
        for order in ("hwc", "chw"):
            rep = conv_saturation(proto, x, order)
            assert len(rep) == 21
            saturated = [c for c in rep if c["saturated_pairs"]]
            if r == 8:
                # the first conv reads the image, signed, stored as uint8 around 128: it spreads over 0..255
                assert rep[0]["name"] == "Conv:conv1" and rep[0]["outputs_changed"] > 0.05 * rep[0]["outputs"], rep
                assert len(saturated) >= 2 and max(c["max_abs_pair_sum"] for c in rep) > 2 ** 15 - 1
            else:
                assert not saturated and max(c["max_abs_pair_sum"] for c in rep) <= 2 * 255 * 63, rep
