"""AI-QS from Python: the functions the numbered scripts call, and a `Study` that chains them.

    from utils.api import Study
    study = Study("pretrained/resnet20_cifar10jpeg_30ep.pt", data_dir="../shared/data/cifar10-jpeg.tar.gz",
                  results_dir="results/api")
    table = study.sensitivity(bits=[8, 4], a_bits=[8, 4])      # stage 2 -> Sensitivity
    found = study.search(max_drop=1.0)                         # stage 3 -> SearchResult
    scores = study.compare()                                   # stage 4 -> Comparison
    study.export("searched.onnx", config=found.path)           # ONNX with QDQ, checked on ONNX Runtime

Each step is one stage, run with typed options (utils/options.py: the command line's flags, by the same
names and with the same defaults) and returning a typed result (utils/results.py) that wraps the JSON
the stage writes into ``results_dir``. The steps hand off through those files exactly as the scripts do,
so a study can be continued from the command line and the other way round.
"""
from __future__ import annotations

from pathlib import Path

from utils.export import export as export_onnx
from utils.options import (BaselineOptions, ExportOptions, ModelOptions, PlotOptions, SearchOptions,
                           SensitivityOptions, TrainOptions)
from utils.results import Baseline, Comparison, SearchResult, Sensitivity
from utils.stages.create_baselines import create_baselines
from utils.stages.generate_plots import generate_plots
from utils.stages.greedy_search import search_widths
from utils.stages.per_layer_analysis import per_layer_analysis
from utils.stages.train_baseline import train_baseline


def train(opts: TrainOptions) -> Baseline:
    """Stage 1: train (or resume) the float baseline."""
    return Baseline.of(train_baseline(opts), opts.results_dir)


def sensitivity(opts: SensitivityOptions) -> Sensitivity:
    """Stage 2: every weight layer and tensor at every candidate width, one at a time."""
    return Sensitivity.of(per_layer_analysis(opts), opts.results_dir)


def search(opts: SearchOptions) -> SearchResult:
    """Stage 3: the greedy and Pareto searches over stage 2's table, with the confirm test."""
    return SearchResult.of(search_widths(opts), opts.results_dir)


def compare(opts: BaselineOptions) -> Comparison:
    """Stage 4: the searched and uniform configurations on the report images (and fine-tuning)."""
    return Comparison.of(create_baselines(opts), opts.results_dir)


def plots(opts: PlotOptions) -> dict:
    """Stage 5: figures and summary.md from the results JSON."""
    return generate_plots(opts.results_dir, progress=not opts.no_progress)


def export(opts: ExportOptions) -> dict:
    """The ONNX export and its ONNX Runtime check; returns the export report."""
    return export_onnx(opts)


class Study:
    """One float checkpoint, its data and held-out images, and the folder its results go to.

    `options` are any fields of ModelOptions (e.g. ``quick=True``, ``confirm_size=1000``, ``device="cpu"``);
    each step takes its stage's own options as keyword arguments (e.g. ``search(max_drop=0.5)``).
    """

    def __init__(self, checkpoint=None, *, results_dir="results", checkpoint_dir="checkpoints", **options):
        self.options = ModelOptions().replace(checkpoint=Path(checkpoint) if checkpoint is not None else None,
                                              results_dir=Path(results_dir), checkpoint_dir=Path(checkpoint_dir),
                                              **options)

    def _options(self, cls, changes: dict):
        return cls.of(self.options).replace(**changes)

    def sensitivity(self, **options) -> Sensitivity:
        return sensitivity(self._options(SensitivityOptions, options))

    def search(self, **options) -> SearchResult:
        return search(self._options(SearchOptions, options))

    def compare(self, **options) -> Comparison:
        return compare(self._options(BaselineOptions, options))

    def fine_tune(self, configs, epochs: int, **options) -> Comparison:
        """Stage 4 with quantization-aware fine-tuning of `configs` (names such as "uniform_w4a4", "pareto")."""
        return self.compare(qat_epochs=epochs, qat_configs=list(configs), **options)

    def export(self, onnx, **options) -> dict:
        return export(self._options(ExportOptions, {"onnx": Path(onnx), **options}))

    def results(self) -> dict:
        """The results already in the study's folder, by stage name (absent stages left out)."""
        out = {}
        for name, cls in (("baseline", Baseline), ("sensitivity", Sensitivity), ("search", SearchResult),
                          ("comparison", Comparison)):
            if (self.options.results_dir / cls.file_name()).is_file():
                out[name] = cls.load(self.options.results_dir, force=self.options.force)
        return out
