"""Typed options of every stage: what the library takes instead of an argparse Namespace.

Each stage's command line parses its flags and turns them into one of these dataclasses with
``from_args`` (the only place a Namespace is read, besides the scripts' ``main``); the stage bodies in
utils/stages, the export and the Python API (utils/study.py) take the dataclass. Field names are the
flags' names (``--max-drop`` is ``max_drop``), the defaults are the flags' defaults (a test holds them
equal), and ``to_json`` is what a results file records as ``provenance.args``.

The classes compose by inheritance, so a stage's options are one flat record:

    CommonOptions            data, results and checkpoint folders, device, seed, --quick
    ├── TrainOptions         stage 1 (+ the architecture)
    ├── PlotOptions          stage 5
    └── ModelOptions         a checkpoint and its held-out images (stages 2-4, export, benchmarks)
        ├── SensitivityOptions   stage 2
        ├── SearchOptions        stage 3
        ├── BaselineOptions      stage 4 (and its fine-tuning)
        └── ExportOptions        python -m utils.export
    CalculatorOptions        python -m utils.ai_calculator (no data)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from models.structure import DEFAULT_TARGET
from quant.cost import DEFAULT_COST_MODEL
from quant.evaluation import DEFAULT_CACHE_BYTES
from quant.widths import FLOAT_BITS
from utils.errors import UserError

# Fine-tuning defaults, shared with utils/qat.py's FineTuneRecipe.
DEFAULT_QAT_LR = 0.003   # benchmarks/qat_ablation.py: +1.30 [+0.20, +2.40] points over 0.001 on the confirm images
DEFAULT_FREEZE_BN = 0.5  # BN kept: running statistics from half-way on
DEFAULT_QAT_START = "nearest"   # benchmarks/qat_ablation.py: the learned start measured no gain (README)


@dataclass(frozen=True)
class Options:
    """Base: building from a parsed command line, copying with changes, and the JSON form."""

    def __post_init__(self):
        for f in fields(self):   # a str given from Python for a path is a path
            if "Path" in str(f.type) and isinstance(getattr(self, f.name), str):
                object.__setattr__(self, f.name, Path(getattr(self, f.name)))

    @classmethod
    def from_args(cls, ns, strict: bool = True):
        """The options of a parsed command line. `strict`: every flag it holds must be a field (a parser and
        its options cannot drift apart); benchmarks, whose parsers add their own flags, pass False."""
        names = {f.name for f in fields(cls)}
        given = vars(ns)
        extra = sorted(set(given) - names)
        if strict and extra:
            raise TypeError(f"{cls.__name__} has no field for the flags {extra}; add them to utils/options.py")
        return cls(**{k: v for k, v in given.items() if k in names})

    @classmethod
    def of(cls, other: "Options", **changes):
        """`cls` made from the fields of another options object that `cls` has, with `changes`."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in dataclasses.asdict(other).items() if k in names}, **changes})

    def replace(self, **changes):
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise UserError(f"{type(self).__name__} has no option(s) {unknown}; known: "
                            f"{', '.join(f.name for f in fields(self))}.")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass(frozen=True)
class CommonOptions(Options):
    data_dir: Path | None = None
    dataset: str | None = None
    results_dir: Path = Path("results")
    checkpoint_dir: Path = Path("checkpoints")
    device: str = "auto"
    seed: int | None = None
    val_size: int | None = None
    quick: bool = False


@dataclass(frozen=True)
class ArchOptions(Options):
    arch: str | None = None
    depth: int | None = None
    shortcut: str | None = None


@dataclass(frozen=True)
class ModelOptions(CommonOptions, ArchOptions):
    """A float checkpoint and the held-out images it is quantized, searched and reported on. ``model`` and its
    fields: a model from outside the registry (models/outside.py), for a checkpoint without model_args."""
    model: str | None = None
    model_kwargs: str | None = None
    input_size: int | None = None
    num_classes: int | None = None
    checkpoint: Path | None = None
    normalization: str | None = None
    holdout: Path | None = None
    confirm_size: int | None = None
    select_size: int | None = None
    eval_batch_size: int = 250
    cache_gb: float = DEFAULT_CACHE_BYTES / 2 ** 30
    force: bool = False


@dataclass(frozen=True)
class WidthOptions(Options):
    """The candidate widths and the cost model (stage 2 measures them; stages 3-4 default to stage 2's)."""
    bits: list[int] | None = None
    a_bits: list[int] | None = None
    cost_model: str | None = None
    quantize_logits: bool = False


@dataclass(frozen=True)
class SensitivityOptions(ModelOptions, WidthOptions):
    """Stage 2."""
    target: str = DEFAULT_TARGET
    granularity: str = "channel"
    clip: str = "mse"
    weight_range: int | None = None
    ptq: str | None = None
    ptq_images: int | None = None
    ptq_iterations: int | None = None
    calib_images: int | None = None
    signal: str = "measured"
    fisher_samples: int = 1
    stats_correction: str | None = None
    correction_images: int = 512
    act_calib: str = "mse"
    act_calib_images: int | None = None


@dataclass(frozen=True)
class SearchOptions(ModelOptions, WidthOptions):
    """Stage 3."""
    method: str = "both"
    objective: str = "ai"
    max_drop: float = 1.0
    z: float | None = None
    rank_by: str = "kl"
    verify_top_k: int = 3
    no_prune_infeasible: bool = False
    no_fast_forward: bool = False
    early_stop: bool = False
    confirm_step: float = 0.0
    audit_pruning: int = 0
    max_evaluations: int | None = None
    pareto_verify: int = 24
    min_ai: float | None = None


@dataclass(frozen=True)
class BaselineOptions(ModelOptions, WidthOptions):
    """Stage 4: the uniform baselines, the comparison, and quantization-aware fine-tuning."""
    qat_epochs: int = 0
    qat_configs: list[str] | None = None
    qat_lr: float = DEFAULT_QAT_LR
    qat_bn: str = "kept"
    qat_freeze_bn: float = DEFAULT_FREEZE_BN
    qat_warmup: float = 0.0
    qat_distill: bool = False
    qat_seeds: int = 1
    qat_batch_size: int = 128
    qat_scales: str = "learned"
    qat_start: str = DEFAULT_QAT_START
    keep_ends: int | None = None
    resume: bool = False


@dataclass(frozen=True)
class ExportOptions(ModelOptions):
    """python -m utils.export."""
    onnx: Path | None = None
    config: Path | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    quantize_logits: bool = False
    target: str | None = None
    signed_dtype: str = "uint8"
    weight_range: int | None = None
    ptq: str | None = None
    stats_correction: str | None = None
    round_up_widths: bool = False
    check_images: int = 2000
    threads: int = 2
    calib_images: int | None = None


@dataclass(frozen=True)
class TrainOptions(CommonOptions, ArchOptions):
    """Stage 1."""
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool | None = None
    warmup_epochs: int = 0
    sync_bn: bool | None = None
    compile: bool = False
    graph: str = "off"
    no_amp: bool = False
    eval_batch_size: int = 1000
    eval_every: int = 1
    checkpoint: Path | None = None
    resume: bool = False
    world_size: int | None = None    # not a flag: the processes of the run, filled in when it starts


@dataclass(frozen=True)
class PlotOptions(CommonOptions):
    """Stage 5."""
    no_progress: bool = False


@dataclass(frozen=True)
class CalculatorOptions(Options):
    """python -m utils.ai_calculator: the cost of one configuration, without data."""
    arch: str | None = None
    shortcut: str | None = None
    model: str | None = None
    model_kwargs: str | None = None
    input_size: int | None = None
    num_classes: int | None = None
    checkpoint: Path | None = None
    w_bits: int | None = None
    a_bits: int = FLOAT_BITS
    config: Path | None = None
    cost_model: str = DEFAULT_COST_MODEL
    target: str = DEFAULT_TARGET
    batch_size: int = 1
    trace: bool = False
    ranges: str | None = None
    json: bool = False
