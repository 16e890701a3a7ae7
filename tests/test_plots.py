"""Plots and summary of stage 5, from realistic ResNet-20 (shortcut B) fixture results, plus joint
(weight + activation), fine-tuned and 58-layer (MobileNetV2) results."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from models import build_model, resnet20
from quant.cost import CostModel, kernel_table
from utils.errors import UserError
from utils.io import REPO_ROOT, SCHEMA_VERSIONS
from utils.plots.allocation import plot_bit_allocation
from utils.plots.pareto import _upper_envelope, plot_pareto
from utils.plots.sensitivity import plot_sensitivity
from utils.plots.summary import bits_summary, summary_markdown
from utils.stages.generate_plots import INPUTS, PLOTS, figure_title, generate_plots, load_inputs, style

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = ("pareto", "sensitivity", "bit_allocation", "search_trajectory", "roofline", "training_curve")
BITS = [8, 6, 4, 3, 2]
MAX_DROP = 1.0


def _common(stage, synthetic):
    return {
        "stage": stage, "schema_version": SCHEMA_VERSIONS[stage],
        "dataset": {"name": "synthetic" if synthetic else "cifar10",
                    "source": "generated (seed 0)" if synthetic else "data/cifar-10-batches-py",
                    "synthetic": synthetic},
        "model_args": {"arch": "resnet20", "shortcut": "B", "num_classes": 10},
        "segments": {n: seg.name for seg in resnet20("B").segments() for n in seg.kernels},
        "provenance": {"args": {}, "inputs": {}, "git_commit": None, "seconds": 1.0},
    }


def stage_of(name):
    """The sensitivity level the fixture gives a layer (test data only; the plots read segments)."""
    if name == "conv1":
        return "stem"
    return "head" if name == "linear" else name.split(".")[0]


def write_fixture_results(folder, synthetic=False, seed=0):
    """Write 01-04 results JSONs like the stages would for a trained ResNet-20 B; returns the folder."""
    rng = np.random.default_rng(seed)
    ktable = kernel_table(resnet20("B"))
    table = ktable.layers
    names = [l.name for l in table]
    params = {l.name: l.weights for l in table}
    reference = CostModel.named("reference")

    def full(cfg):
        return ktable.space.full({("w", n): b for n, b in cfg.items()})

    def ai(cfg):
        return reference.ai(ktable, full(cfg))

    def nbytes(cfg):
        return reference.total_bytes(ktable, full(cfg))

    fp32_ai = ai({})
    base_val, base_test = 91.86, 91.62
    # stage 1
    epochs = 30
    hist = []
    for e in range(1, epochs + 1):
        t = e / epochs
        hist.append(dict(epoch=e, train_loss=1.9 * math.exp(-4 * t) + 0.05, train_acc=99 - 60 * math.exp(-4.5 * t),
                         lr=0.05 * (1 + math.cos(math.pi * t)), val_loss=1.7 * math.exp(-3.5 * t) + 0.3,
                         val_acc=min(base_val, 92 - 55 * math.exp(-4 * t)), seconds=12.5))
    b01 = dict(_common("1", synthetic), test_acc=base_test, val_acc=base_val, epochs=epochs,
               seconds_per_epoch=12.5, train_seconds=12.5 * epochs, history=hist)
    # stage 2: drops grow as width shrinks; the stem, shortcuts and head are the sensitive ones
    factor = {8: 0.01, 6: 0.03, 4: 0.12, 3: 0.7, 2: 5.0}
    layers = []
    drops = {}
    for l in table:
        g = stage_of(l.name)
        s = {"stem": 3.5, "head": 2.2, "layer1": 1.3, "layer2": 0.8, "layer3": 0.3}[g]
        if "shortcut" in l.name:
            s = 1.6
        res = []
        for b in BITS:
            d = round(min(80.0, s * factor[b] * (1 + 0.3 * rng.standard_normal())) + 0.03 * rng.standard_normal(), 2)
            drops[l.name, b] = d
            cfg = {l.name: b}
            res.append(dict(bits=b, val_acc=round(base_val - d, 2), drop=d, drop_se=0.1, kl=d / 50, model_ai=ai(cfg)))
        layers.append(dict(name=l.name, kind=l.kind, params=l.weights, macs=l.macs, results=res))
    p02 = dict(_common("2", synthetic), baseline_val_acc=base_val, bits=BITS, fp32_ai=fp32_ai, layers=layers)

    def est(cfg):
        return sum(max(0.0, drops[n, b]) for n, b in cfg.items() if b != 32)

    def measured(cfg):
        return round(base_val - 1.1 * est(cfg) + 0.05 * rng.standard_normal(), 2)

    # stage 3: greedy (one layer one step narrower, best AI gain per estimated drop)
    ladder = [32] + BITS
    cfg = {n: 32 for n in names}
    traj = [dict(step=0, layer=None, from_bits=None, bits=None, ai=fp32_ai, val_acc=base_val, estimated_drop=0.0)]
    while True:
        best = None
        for n in names:
            i = ladder.index(cfg[n])
            if i + 1 == len(ladder):
                continue
            new = dict(cfg, **{n: ladder[i + 1]})
            gain = ai(new) - ai(cfg)
            cost = max(0.01, est(new) - est(cfg))
            if best is None or gain / cost > best[0]:
                best = (gain / cost, n, new)
        if best is None:
            break
        _, n, new = best
        acc = measured(new)
        if base_val - acc > MAX_DROP:
            break
        traj.append(dict(step=len(traj), layer=n, from_bits=cfg[n], bits=new[n], ai=ai(new), val_acc=acc,
                         estimated_drop=est(new)))
        cfg = new
    greedy = dict(trajectory=traj, config=cfg, ai=ai(cfg), val_acc=traj[-1]["val_acc"], evaluations=len(traj) + 3)
    # estimated Pareto frontier: the non-dominated ones among mutations of the greedy's configurations
    pts = [(0.0, nbytes({}), {n: 32 for n in names})]
    for t in range(1, len(traj)):
        base_cfg = {n: 32 for n in names}
        for e in traj[1:t + 1]:
            base_cfg[e["layer"]] = e["bits"]
        for _ in range(12):
            c = dict(base_cfg)
            for n in rng.choice(names, size=3, replace=False):
                c[n] = int(ladder[min(len(ladder) - 1, max(0, ladder.index(c[n]) + int(rng.integers(-1, 2))))])
            pts.append((est(c), nbytes(c), c))
    pts.sort(key=lambda t: (t[0], t[1]))
    frontier, best_bytes = [], float("inf")
    for d, by, c in pts:
        if by < best_bytes:
            best_bytes = by
            frontier.append(dict(config=c, estimated_drop=d, ai=ai(c), bytes=by))
    for f in sorted(frontier, key=lambda f: -f["ai"]):   # verify, highest AI first
        if f["estimated_drop"] <= MAX_DROP:
            f["val_acc"] = measured(f["config"])
            if base_val - f["val_acc"] <= MAX_DROP:
                chosen = f
                break
    pareto = dict(frontier=frontier, config=chosen["config"], ai=chosen["ai"], val_acc=chosen["val_acc"],
                  evaluations=3)
    s03 = dict(_common("3", synthetic), max_drop=MAX_DROP, baseline_val_acc=base_val, fp32_ai=fp32_ai, bits=BITS,
               best="greedy" if greedy["ai"] >= pareto["ai"] else "pareto", greedy=greedy, pareto=pareto,
               layers=[dict(name=n, params=params[n]) for n in names])
    # stage 4
    uni_acc = {8: (91.8, 91.55), 6: (91.5, 91.3), 4: (89.7, 89.4), 3: (81.9, 81.2), 2: (18.3, 17.6)}
    configs = [dict(name="fp32", config={}, ai=fp32_ai, bytes=nbytes({}), val_acc=base_val, test_acc=base_test,
                    test_acc_ci95=[base_test - 0.8, base_test + 0.7], test_drop=0.0, test_drop_ci95=[0.0, 0.0])]
    for b in BITS:
        c = {n: b for n in names}
        configs.append(dict(name=f"uniform_w{b}", config=c, ai=ai(c), bytes=nbytes(c), val_acc=uni_acc[b][0],
                            test_acc=uni_acc[b][1], test_acc_ci95=[uni_acc[b][1] - 0.8, uni_acc[b][1] + 0.7],
                            test_drop=base_test - uni_acc[b][1], test_drop_ci95=[0.0, 1.0]))
    for name, res in (("greedy", greedy), ("pareto", pareto)):
        t = round(res["val_acc"] - 0.3, 2)
        configs.append(dict(name=name, config=res["config"], ai=res["ai"], bytes=nbytes(res["config"]),
                            val_acc=res["val_acc"], test_acc=t, test_acc_ci95=[t - 0.8, t + 0.7],
                            test_drop=round(base_test - t, 2), test_drop_ci95=[0.3, 1.2],
                            search_drop=round(base_val - res["val_acc"], 2), confirm_drop=None,
                            budget_holds_on_test=base_test - t <= MAX_DROP))
    dominates = {}
    for s in configs[-2:]:
        dominates[s["name"]] = [u["name"] for u in configs[1:-2]
                                if s["ai"] >= u["ai"] and s["val_acc"] >= u["val_acc"]
                                and (s["ai"], s["val_acc"]) != (u["ai"], u["val_acc"])]
    b04 = dict(_common("4", synthetic), baseline="fp32", configs=configs, dominates=dominates,
               eval_split="val", max_drop=MAX_DROP)
    folder.mkdir(parents=True, exist_ok=True)
    for obj, (fname, _) in zip((b01, p02, s03, b04), INPUTS.values()):
        (folder / fname).write_text(json.dumps(obj, indent=1))
    return folder


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    """Fixture results, made once: {"real": folder, "synthetic": folder} (copy before changing them)."""
    real = write_fixture_results(tmp_path_factory.mktemp("fixture") / "real")
    synth = real.parent / "synthetic"
    synth.mkdir()
    for fname, _ in INPUTS.values():
        obj = json.loads((real / fname).read_text())
        obj["dataset"] = {"name": "synthetic", "source": "generated (seed 0)", "synthetic": True}
        (synth / fname).write_text(json.dumps(obj))
    return {"real": real, "synthetic": synth}


@pytest.fixture(scope="module")
def results(fixture_dirs, tmp_path_factory):
    """The script run end to end on the fixture results (the one full rendering in this file)."""
    folder = tmp_path_factory.mktemp("run") / "results"
    shutil.copytree(fixture_dirs["real"], folder)
    p = subprocess.run([sys.executable, "5_generate_plots.py", "--results-dir", str(folder)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return folder, p


def _check_png(path):
    from matplotlib.image import imread
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    img = imread(path)
    h, w = img.shape[:2]
    assert 600 <= w <= 4000 and 600 <= h <= 4000, (path.name, img.shape)


def test_script_makes_every_plot_as_png_and_pdf(results):
    folder, p = results
    assert f"6 plots (PNG + PDF) in {folder / 'plots'}: {', '.join(PLOTS)}" in p.stdout
    assert set(PLOTS) == set(PLOT_NAMES)
    assert "skipped" not in p.stdout and "synthetic" not in p.stdout and "Traceback" not in p.stderr
    for name in PLOT_NAMES:
        _check_png(folder / "plots" / f"{name}.png")
        pdf = folder / "plots" / f"{name}.pdf"
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000
    assert sorted(f.name for f in (folder / "plots").iterdir()) == sorted(
        f"{n}.{ext}" for n in PLOT_NAMES for ext in ("png", "pdf"))   # no temp files left behind


def test_summary_table(results):
    folder, _ = results
    text = (folder / "summary.md").read_text()
    b04 = json.loads((folder / "04_baselines.json").read_text())
    for c in b04["configs"]:
        row = next(l for l in text.splitlines() if l.startswith(f"| {c['name']} |"))
        assert f"{c['ai']:.2f}" in row and f"{c['test_acc']:.2f}" in row
    assert "| fp32 | all fp32 | 29.85 | 1.00 |" in text
    assert "| uniform_w8 | all 8-bit | 42.47 | 1.42 |" in text
    fp = b04["configs"][0]
    assert f"[{fp['test_acc_ci95'][0]:.2f}, {fp['test_acc_ci95'][1]:.2f}]" in text   # intervals shown
    assert "- greedy: search drop" in text and "budget held on test" in text
    for searched in b04["dominates"]:
        assert f"- {searched} dominates" in text
    assert "CIFAR-10" in text and "synthetic" not in text


def test_bits_summary():
    names = ["a", "b", "c", "d"]
    params = {"a": 10, "b": 10, "c": 20, "d": 60}
    assert bits_summary({}, names) == "all fp32"
    assert bits_summary({n: 4 for n in names}, names, params) == "all 4-bit"
    assert bits_summary({"a": 8, "b": 4, "c": 4}, names, params) == "fp32×1 8b×1 4b×2 (21.20 bits/weight)"
    joint = {"a": {"w": 8, "a": 8}, "b": {"w": 4, "a": 8}, "c": {"w": 4, "a": 6}, "d": {"w": 4, "a": 6}}
    assert bits_summary(joint, names) == "W: 8b×1 4b×3; A: 8b×2 6b×2"


def test_missing_inputs_skip_only_their_plots(fixture_dirs, tmp_path, capsys):
    folder = tmp_path / "r"
    shutil.copytree(fixture_dirs["real"], folder)
    (folder / "01_baseline.json").unlink()
    (folder / "02_per_layer.json").write_text("{not json")
    s03 = json.loads((folder / "03_search.json").read_text())
    s03.update(greedy=None, best="pareto")
    (folder / "03_search.json").write_text(json.dumps(s03))
    out = generate_plots(folder, progress=False)
    assert set(out["skipped"]) == {"training_curve", "sensitivity", "search_trajectory"}
    assert "01_baseline.json does not exist" in out["skipped"]["training_curve"]
    assert "not valid JSON" in out["skipped"]["sensitivity"]
    assert "greedy" in out["skipped"]["search_trajectory"]
    assert set(out["made"]) == {"pareto", "bit_allocation", "roofline"}
    assert "pareto search" in out["made"]["bit_allocation"]["title"]   # falls back to the method that ran
    assert not (folder / "plots" / "training_curve.png").exists()
    assert out["summary"].is_file()
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("skipped")]
    assert len(notes) == 3 and all(l.count("\n") == 0 for l in notes)


def test_no_results_at_all(tmp_path):
    with pytest.raises(UserError, match="Run stages 1-4 first"):
        generate_plots(tmp_path, progress=False)
    p = subprocess.run([sys.executable, "5_generate_plots.py", "--results-dir", str(tmp_path / "none")],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "stages 1-4" in p.stderr
    assert not (tmp_path / "none" / "plots").exists()


def test_synthetic_titles(fixture_dirs):
    data, why = load_inputs(fixture_dirs["synthetic"])
    assert not why
    with style():
        for name, (_, build) in PLOTS.items():
            assert "synthetic data" in figure_title(build(data, True)), name
        assert "synthetic data" not in figure_title(PLOTS["training_curve"][1](data, False))
    assert "synthetic data" in summary_markdown(data["baselines"], data["search"], synthetic=True)


def test_dominance_lines():
    b04 = {"baseline": "fp32", "eval_split": "val", "max_drop": 1.0,
           "configs": [dict(name="fp32", config={}, ai=29.85, val_acc=91.0, test_acc=90.5),
                       dict(name="uniform_w4", config={"a": 4, "b": 4}, ai=45.69, val_acc=89.0, test_acc=88.0),
                       dict(name="greedy", config={"a": 4, "b": 3}, ai=46.0, val_acc=None, test_acc=90.0)],
           "dominates": {"greedy": ["uniform_w4"], "pareto": []}}
    text = summary_markdown(b04)
    assert "- greedy dominates uniform_w4." in text
    assert "- pareto dominates none of the uniform configurations." in text
    assert "| greedy | 4b×1 3b×1 | 46.00 | 1.54 | – | 90.00 | – | – | – |" in text


def test_off_scale_points_are_labelled():
    b04 = {"baseline": "fp32", "max_drop": 1.0, "configs": [
        dict(name="fp32", ai=29.85, test_acc=91.6), dict(name="uniform_w2", ai=47.0, test_acc=10.0),
        dict(name="greedy", ai=46.0, test_acc=90.9)]}
    fig = plot_pareto(b04)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("uniform W2" in t and "off scale" in t for t in texts)
    assert fig.axes[0].get_ylim()[0] > 50


def test_joint_and_fine_tuned_results_are_drawn():
    """Joint configurations (W/A) get their own markers; the Pareto plot draws every interval and, after
    fine-tuning, an arrow from each PTQ point to its QAT point and a log AI axis for a 1.5x-8x span."""
    b04 = {"baseline": "fp32", "max_drop": 1.0, "report_split": "test", "configs": [
        dict(name="fp32", ai=29.85, test_acc=86.0, test_acc_ci95=[85.3, 86.7], qat_test_acc=86.2, qat_epochs=2),
        dict(name="uniform_w8a8", ai=119.4, test_acc=85.8, test_acc_ci95=[85.1, 86.5], qat_test_acc=86.0, qat_epochs=2),
        dict(name="uniform_w4a4", ai=238.8, test_acc=70.0, test_acc_ci95=[69.1, 70.9], qat_test_acc=84.9, qat_epochs=2),
        dict(name="greedy", ai=150.0, test_acc=85.3, test_acc_ci95=[84.6, 86.0]),
        dict(name="pareto", ai=160.0, test_acc=85.5, test_acc_ci95=[84.8, 86.2], qat_test_acc=85.7, qat_epochs=2,
             qat_test_acc_sd=0.07, qat_test_drop=0.5, qat_test_drop_ci95=[0.2, 0.8], qat_answer="post-training")],
        "qat_selected_on": "confirm"}
    fig = plot_pareto(b04)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    arrows = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None and t.get_text() == ""]
    assert len(arrows) == 4
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("uniform W4A4" in t and "QAT" in t for t in legend) and any("fine-tuned" in t for t in legend)
    assert any("85.70% QAT (post-training kept)" in t for t in legend)
    text = summary_markdown(b04)
    assert "answer (selected on confirm)" in text
    assert "| 85.70 ± 0.07 | 0.50 [0.20, 0.80] | post-training (fine-tunes ended below it) |" in text
    assert "| 84.90 | 1.30 | –" in text          # no recorded drop: the difference of the means; no answer recorded


def test_sensitivity_and_allocation_for_tensors_and_many_layers():
    """Tensor columns sit beside the weight ones, one row per name (tensor-only names have n/a weight cells);
    a 110-layer model keeps a bounded, readable heat map (colour only, thinner rows), and a 58-layer one a
    weight bar per layer and a tensor bar per tensor for a joint configuration."""
    def declared(arch):
        m = build_model(arch)
        t = kernel_table(m)
        return t, {n: seg.name for seg in m.segments() for n in seg.kernels} | {"input": "stem"}
    table, segments = declared("resnet110")
    layers = [dict(name=t.name, params=t.weights, macs=t.macs, segment=segments[t.name],
                   results=[dict(bits=b, drop=0.1 * b, val_acc=90.0) for b in (8, 4)]) for t in table.layers]
    tensors = [dict(name=t, segment=segments[t], results=[dict(a_bits=a, drop=0.2 * a, val_acc=90.0) for a in (8, 6)])
               for t in table.space.tensors]
    p02 = dict(baseline_val_acc=90.0, bits=[8, 4], a_bits=[8, 6], layers=layers, tensors=tensors, segments=segments)
    fig = plot_sensitivity(p02)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["W8", "W4", "A8", "A6"]
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["input", "conv1"]
    assert len(ax.texts) == 0 and fig.get_size_inches()[1] < 0.2 * len(table.space.tensors) + 3
    small = dict(p02, layers=layers[:3], tensors=tensors[:4])
    texts = [t.get_text() for t in plot_sensitivity(small).axes[0].texts]
    assert texts.count("n/a") == 2 and "0.80" in texts and "1.60" in texts    # input has no weights
    table, segments = declared("mobilenetv2")
    cfg = table.space.to_file(table.space.uniform(4, 8))
    s03 = dict(greedy=dict(config=cfg, ai=100.0, val_acc=89.0), best="greedy", joint=True,
               layers=[dict(name=t.name, params=t.weights) for t in table.layers], segments=segments)
    fig = plot_bit_allocation(s03)
    assert fig.get_size_inches()[0] <= 26
    assert sum(len(c) for c in fig.axes[0].containers) == len(table.layers) + len(table.space.tensors)


def test_frontier_drawn_is_monotone_and_undominated():
    """The frontier line drawn keeps exactly the points that no other point beats in AI and
    estimated accuracy, so it falls monotonically as AI grows."""
    rng = np.random.default_rng(0)
    pts = [(float(a), float(b)) for a, b in zip(rng.uniform(30, 240, 300), rng.uniform(70, 87, 300))]
    env = _upper_envelope(pts)
    assert [a for a, _ in env] == sorted(a for a, _ in env)
    assert all(b1 > b2 for (_, b1), (_, b2) in zip(env, env[1:]))
    dominated = {p for p in pts if any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts)}
    assert set(env) == set(pts) - dominated


def test_measured_speed_is_merged_when_present(fixture_dirs, tmp_path):
    """A deploy_speed.json beside the stage results adds the measured panel to the Pareto plot (throughput
    against accuracy on the runtime) and the measured table to summary.md, next to the modelled AI; a file
    that is not one is reported and ignored."""
    folder = tmp_path / "r"
    shutil.copytree(fixture_dirs["real"], folder)
    deploy = {"benchmark": "deploy_speed", "runtime": "onnxruntime 1.x CPUExecutionProvider", "threads": 2,
              "images": 10000, "results": [
                  {"name": "fp32", "throughput_b64": 2700.0, "latency_ms_b1": 0.41, "speedup_b64": 1.0,
                   "speedup_b1": 1.0, "test_acc": 86.45, "modelled_ai": 21.56},
                  {"name": "uniform_w8a8", "throughput_b64": 6400.0, "latency_ms_b1": 0.30, "speedup_b64": 2.37,
                   "speedup_b1": 1.37, "test_acc": 86.55, "modelled_ai": 86.01},
                  {"name": "ort_quantize_static", "throughput_b64": 6300.0, "latency_ms_b1": 0.28,
                   "speedup_b64": 2.33, "speedup_b1": 1.46, "test_acc": 86.68}]}
    (folder / "deploy_speed.json").write_text(json.dumps(deploy))
    data, why = load_inputs(folder)
    assert data["deploy"] == deploy and "deploy" not in why
    with style():
        fig = plot_pareto(data["baselines"], data["search"], False, data["deploy"])
    assert len(fig.axes) == 2 and "throughput" in fig.axes[1].get_xlabel()
    assert {t.get_text() for t in fig.axes[1].texts} >= {"uniform W8A8 (2.37x)", "ONNX Runtime quantize_static (2.33x)"}
    text = summary_markdown(data["baselines"], data["search"], deploy=data["deploy"])
    assert "| uniform_w8a8 | 6,400 | 2.37 | 0.300 | 1.37 | 86.55 | 86.01 |" in text
    (folder / "deploy_speed.json").write_text("{broken")
    data, why = load_inputs(folder)
    assert data["deploy"] is None and "deploy_speed" in why["deploy"]
    assert any("left out the measured speeds" in n for n in generate_plots(folder, progress=False)["notes"])
    with style():
        assert len(plot_pareto(data["baselines"], data["search"], False, data["deploy"]).axes) == 1
