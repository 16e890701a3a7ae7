"""The Python API (utils/api.py): typed options that are the command lines' flags, no library code that
reads an argparse Namespace, typed results, and the README's Python example."""
import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COMMON, QUICK_BITS, REPO, SUBPROCESS_ENV
from utils import ai_calculator, api, export
from utils.cli import run, script_module
from utils.errors import UserError
from utils.options import (BaselineOptions, CalculatorOptions, ExportOptions, ModelOptions, PlotOptions, SearchOptions,
                           SensitivityOptions, TrainOptions)
from utils.results import Comparison, SearchResult, Sensitivity

PARSERS = {
    TrainOptions: lambda: script_module("1_train_baseline.py").get_args_parser(),
    SensitivityOptions: lambda: script_module("2_per_layer_analysis.py").get_args_parser(),
    SearchOptions: lambda: script_module("3_greedy_search.py").get_args_parser(),
    BaselineOptions: lambda: script_module("4_create_baselines.py").get_args_parser(),
    PlotOptions: lambda: script_module("5_generate_plots.py").get_args_parser(),
    ExportOptions: export.get_args_parser,
    CalculatorOptions: ai_calculator.get_args_parser,
}
NOT_FLAGS = {TrainOptions: {"world_size"}}   # fields a run fills in, not flags
REQUIRED = {ExportOptions: {"onnx": "m.onnx"}}


@pytest.mark.parametrize("cls", list(PARSERS), ids=lambda c: c.__name__)
def test_options_are_the_flags_with_their_defaults(cls):
    parser = PARSERS[cls]()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert {f.name for f in dataclasses.fields(cls)} - dests == NOT_FLAGS.get(cls, set())
    required = REQUIRED.get(cls, {})
    argv = [x for k, v in required.items() for x in (f"--{k}", v)]
    assert cls.from_args(parser.parse_args(argv)) == cls(**required)


def test_from_args_refuses_a_flag_without_a_field_and_replace_an_unknown_option():
    ns = argparse.Namespace(**SearchOptions().to_json(), surplus=1)
    with pytest.raises(TypeError, match="surplus"):
        SearchOptions.from_args(ns)
    assert SearchOptions.from_args(ns, strict=False) == SearchOptions.from_args(argparse.Namespace(**vars(ns)),
                                                                                strict=False)
    with pytest.raises(UserError, match="max_dorp"):
        SearchOptions().replace(max_dorp=0.5)


def test_options_json_is_what_provenance_records_and_paths_are_paths():
    o = SearchOptions(results_dir="r", checkpoint="c.pt", bits=[4, 2])
    assert isinstance(o.results_dir, Path) and o.to_json()["results_dir"] == "r" and o.to_json()["bits"] == [4, 2]
    assert ModelOptions.of(o).results_dir == Path("r") and BaselineOptions.of(o, qat_epochs=2).qat_epochs == 2


class Spy(argparse.Namespace):
    """A Namespace that records which function reads each of its attributes."""
    reads = []

    def __getattribute__(self, name):
        if not name.startswith("_"):
            code = sys._getframe(1).f_code
            Spy.reads.append((Path(code.co_filename).name, code.co_name, name))
        return object.__getattribute__(self, name)


def test_no_library_code_reads_an_argparse_namespace(quick_stage2, tmp_path, monkeypatch, capsys):
    """Every stage, the export and the calculator run with a spying Namespace: only the command-line shells
    (a script's main, utils.cli.run) touch it; the library gets typed options."""
    results, ckpts = tmp_path / "results", tmp_path / "checkpoints"
    shutil.copytree(quick_stage2["results"], results)
    shutil.copytree(quick_stage2["checkpoints"], ckpts)
    parse = argparse.ArgumentParser.parse_known_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args",
                        lambda self, args=None, namespace=None: parse(self, args, namespace or Spy()))
    Spy.reads.clear()
    common = [*COMMON, "--results-dir", str(results), "--checkpoint-dir", str(ckpts)]
    stage1 = script_module("1_train_baseline.py")
    run(stage1.main, stage1.get_args_parser(), [*COMMON, "--dataset", "synthetic", "--val-size", "50", "--epochs", "1",
                                                "--results-dir", str(tmp_path / "s1"), "--checkpoint-dir",
                                                str(tmp_path / "s1")])
    for script, extra in (("2_per_layer_analysis.py", ["--bits", *map(str, QUICK_BITS), "--a-bits", "4"]),
                          ("3_greedy_search.py", []),
                          ("4_create_baselines.py", ["--qat-epochs", "1", "--qat-configs", "uniform_w4a4"])):
        mod = script_module(script)
        run(mod.main, mod.get_args_parser(), [*common, *extra])
    run(script_module("5_generate_plots.py").main, script_module("5_generate_plots.py").get_args_parser(),
        ["--results-dir", str(results), "--no-progress"])
    assert export.main(["--results-dir", str(results), "--checkpoint", str(quick_stage2["checkpoint"]),
                        "--onnx", str(tmp_path / "m.onnx"), "--w-bits", "8", "--check-images", "0"]) == 0
    assert ai_calculator.cli(["--w-bits", "4", "--a-bits", "8"]) == 0
    capsys.readouterr()
    assert any(f == "argparse.py" for f, _, _ in Spy.reads)   # the spy was the Namespace argparse filled in
    readers = {(f, fn) for f, fn, _ in Spy.reads if f != "argparse.py"}
    shells = {("cli.py", "run")}   # under torchrun it reads the device; a script's main only converts (vars)
    assert readers <= shells, readers - shells


def test_library_entry_points_refuse_a_namespace(quick_stage2):
    from utils.stages.common import load_setup
    with pytest.raises(TypeError, match="ModelOptions"):
        load_setup(argparse.Namespace(**ModelOptions(checkpoint=quick_stage2["checkpoint"]).to_json()))


def test_study_runs_the_stages_and_returns_typed_results(quick_stage2, tmp_path):
    """A Study over the session's checkpoint, with results in its own folder: stages 2-4 through the API,
    the same files as the scripts, read back by the typed results."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_stage2["results"] / "01_baseline.json", results)
    study = api.Study(quick_stage2["checkpoint"], results_dir=results, checkpoint_dir=tmp_path / "ck", quick=True,
                      device="cpu")
    table = study.sensitivity(bits=[4, 2], a_bits=[4])
    assert isinstance(table, Sensitivity) and table.path == results / "02_per_layer.json"
    assert len(table.rows()) == len(table.json["layers"]) * 2 + sum(1 for t in table.json["tensors"] if t["results"])
    assert table.most_sensitive(1)[0].drop == max(r.drop for r in table.rows())
    found = study.search(max_drop=1.0)
    assert isinstance(found, SearchResult) and found.best is not None
    assert found.best.ai == pytest.approx(found.json[found.json["best"]]["ai"])
    assert found.best.ai_ratio == pytest.approx(found.best.ai / found.fp32_ai) and found.best.ai_ratio >= 1
    scores = study.compare()
    assert isinstance(scores, Comparison) and {"fp32", "uniform_w4a4", "greedy", "pareto"} <= set(scores.configs)
    assert scores["fp32"].test_drop == 0 and scores.report_images == len(scores.json["images"]["report"]["indices"])
    with pytest.raises(UserError, match="no configuration 'w9'"):
        scores["w9"]
    with pytest.raises(UserError, match="max_dorp"):
        api.Study(quick_stage2["checkpoint"], max_dorp=0.5)
    again = study.results()
    assert again["comparison"].json == json.loads((results / "04_baselines.json").read_text())
    assert again["search"].best == found.best
    prov = scores.json["provenance"]["args"]
    assert prov["results_dir"] == str(results) and prov["qat_epochs"] == 0


JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README holds one Python example"
    return blocks[0]


@pytest.mark.skipif(not JPEG.exists(), reason="no ../shared/data/cifar10-jpeg.tar.gz beside the checkout")
def test_readme_python_example_runs(tmp_path):
    """The README's example, as written, from the repository root, with its output folders moved to tmp_path."""
    code = readme_python_example()
    assert '"results/python"' in code and '"checkpoints/python"' in code
    code = code.replace('"results/python', f'"{tmp_path}/results').replace('"checkpoints/python',
                                                                            f'"{tmp_path}/checkpoints')
    p = subprocess.run([sys.executable, "-"], input=code, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=SUBPROCESS_ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ONNX Runtime agrees: True" in p.stdout
    assert (tmp_path / "results" / "04_baselines.json").is_file() and (tmp_path / "results" / "searched.onnx").is_file()
