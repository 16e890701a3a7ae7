"""Set-up shared by the post-training stages (2-4): flags, checkpoint, data split, quantizers."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from models import describe
from models.structure import DEFAULT_TARGET, TARGETS, input_shape
from quant.calibrate import METHOD as CALIBRATION_METHOD, calibrate
from quant.cost import COST_MODELS, CostModel, FusedCost, KernelTable, kernel_table
from quant.evaluation import DEFAULT_CACHE_BYTES, CachedEvaluator
from quant.fold import fold_bn
from quant.loss_aware import describe as describe_loss_aware, loss_aware_ranges, rescaled
from quant.adaround import AdaRoundSettings
from quant.quantizer import WEIGHT_RANGES
from quant.recipe import ACT_CALIBS, CORRECTIONS, DEFAULT_CORRECTION, DEFAULT_PTQ, PTQ_METHODS, Recipe
from quant.widths import ACT_BITS, DEFAULT_W_LADDER, FLOAT_BITS, QUICK_W_LADDER, A, Space, check_widths
from utils.checkpoint import default_checkpoint_path, load_model, parse_normalization
from utils.cli import add_arch_args, outside_model, resolve_arch, resolve_device, seed_everything
from utils.data import load_dataset
from utils.errors import UserError
from utils.options import ModelOptions, Options, SensitivityOptions
from utils.io import PRODUCERS, RESULTS_FILES, SCHEMA_VERSIONS, atomic_write_json, load_results_json, provenance
from utils.split import Part, SearchSplit, quick_images, quick_subset, search_split
from utils.train import Normalizer, to_device_uint8

QUICK_EVAL_IMAGES = 250      # --quick: search and report images for ResNet-20; fewer for heavier models
CALIB_IMAGES = 1000          # training images the activation ranges are calibrated on
QUICK_CALIB_IMAGES = 200
QUICK_PTQ_IMAGES, QUICK_PTQ_ITERATIONS = 64, 40    # --quick: a learned rounding that is only a smoke test
QUICK_CORRECTION_IMAGES = 64                         # --quick: a statistics correction that is only a smoke test


def add_model_args(p: argparse.ArgumentParser):
    add_arch_args(p, training=False)
    g = p.add_argument_group("checkpoint and data (post-training stages)")
    g.add_argument("--checkpoint", default=None,
                   help="float checkpoint to quantize (default: the one recorded in <results-dir>/01_baseline.json, "
                        "else <checkpoint-dir>/<arch>_baseline.pt)")
    g.add_argument("--normalization", default=None,
                   help="input normalization of a checkpoint that records none: cifar10 (stage 1's statistics), "
                        "imagenet, or m1,m2,m3,s1,s2,s3 (default: the checkpoint's; else cifar10)")
    g.add_argument("--holdout", default=None, metavar="FILE",
                   help='your own held-out split, JSON {"search": {"set": "train"|"test", "indices": [...]}, '
                        '"report": {...}} (default: the checkpoint\'s validation split; without one, halves of '
                        'the test set)')
    g.add_argument("--confirm-size", default=None, type=int,
                   help="search images held back as the confirm split: no search step queries them, they test the "
                        "searched answers in an order the search fixed (0: no confirm step) (default: 40%% of the "
                        "search images, 2,000 of 5,000 validation images)")
    g.add_argument("--select-size", default=None, type=int,
                   help="search images held back as the select split: no search or confirm step sees them; they only "
                        "decide between post-training and fine-tuned weights and among seeds (stage 4) (0: none) "
                        "(default: 20%% of the held-out images, 1,000 of 5,000 validation images)")
    g.add_argument("--eval-batch-size", default=250, type=int,
                   help="images per evaluation batch: the unit a search's early stop looks at; small batches keep "
                        "their activations in the CPU's caches, and accuracy, loss and KL are summed per image, so "
                        "they do not depend on it (default: 250)")
    g.add_argument("--cache-gb", default=DEFAULT_CACHE_BYTES / 2 ** 30, type=float,
                   help="bound on the cached activations; segments beyond it are recomputed, with identical "
                        "results; stage 3 keeps its candidates' activations within another such bound, so the one "
                        f"it accepts is not computed again (default: {DEFAULT_CACHE_BYTES / 2 ** 30:g})")
    g.add_argument("--force", action="store_true",
                   help="use inputs made from another checkpoint or schema, or an unfinished checkpoint (default: off)")
    return p


def benchmark_parser(doc: str, out_help: str = "the JSON file to write"):
    """(parser, its "benchmark" group with --out) of a benchmark that loads a checkpoint as stages 2-4 do."""
    from utils.cli import add_common_args
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    add_model_args(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--out", required=True, type=Path, help=out_help)
    return p, g


SIGNALS = ("measured", "fisher", "both")   # stage 2 --signal


def add_quant_args(p: argparse.ArgumentParser, stage: str):
    g = p.add_argument_group("quantization")
    default_w = ("8 6 4 3 2; with --quick: 8 4 2; --target ort-cpu: 8" if stage == "2"
                 else "the widths stage 2 measured")
    default_a = ("none: tensors stay float; --target ort-cpu: 8" if stage == "2"
                 else "the widths stage 2 measured")
    g.add_argument("--bits", default=None, type=int, nargs="+",
                   help=f"candidate weight widths, 2-8 (default: {default_w})")
    g.add_argument("--a-bits", default=None, type=int, nargs="+",
                   help=f"candidate tensor (activation) widths, 2-8, e.g. 8 6 4; 32 = float (default: {default_a})")
    g.add_argument("--cost-model", default=None, choices=COST_MODELS,
                   help="fused: bytes of every tensor each kernel reads and writes, at its width; reference: the "
                        "reference work's per-layer weight-only convention "
                        + ("(default: fused)" if stage == "2" else "(default: the one stage 2 recorded)"))
    g.add_argument("--quantize-logits", action="store_true",
                   help="quantize the logits (the tensor the last kernel writes) in uniform configurations and let "
                        "the search narrow them; quantized logits tie, and a tie counts 1/k correct "
                        + ("(default: float)" if stage == "2" else "(default: as stage 2 recorded)"))
    if stage == "2":
        g.add_argument("--target", default=DEFAULT_TARGET, choices=TARGETS,
                       help="the runtime's kernels, simulated and charged: generic (TensorRT-style fusion, the add "
                            "fused into the conv before it) or ort-cpu (ONNX Runtime's CPU kernels, the add on its "
                            "own) (default: generic)")
        g.add_argument("--granularity", default="channel", choices=("channel", "tensor"),
                       help="weights: one scale per output channel or per tensor, of the BN-folded weights "
                            "(default: channel)")
        g.add_argument("--clip", default="mse", choices=("mse", "maxabs"),
                       help="weights: MSE-optimal clipping range or max |w| (default: mse)")
        g.add_argument("--weight-range", default=None, type=int, choices=WEIGHT_RANGES,
                       help="levels an 8-bit weight uses: 8 (-127..127) or 7 (-63..63, still stored and charged as "
                            "8 bits), which ONNX Runtime's x86 kernels compute exactly on CPUs without VNNI, where "
                            "8 saturates (default: 7 under --target ort-cpu, else 8)")
        g.add_argument("--ptq", default=None, choices=PTQ_METHODS,
                       help="how weights are rounded: nearest (the nearest level of the MSE grid), adaround (each "
                            "layer's rounding learned at each width to reconstruct its float output on training "
                            "images) or block (a block's layers learned together at each width to reconstruct the "
                            "block's float output), fitted once and cached under <checkpoint-dir>/ptq-cache; stages "
                            f"3-4 and the export follow (default: {DEFAULT_PTQ['fused']}; with --cost-model reference: "
                            f"{DEFAULT_PTQ['reference']}, the reference work's method)")
        g.add_argument("--ptq-images", default=None, type=int,
                       help="training images (the first calibration images) the learned rounding is fitted on "
                            f"(default: {Recipe().ptq_images}; with --quick: {QUICK_PTQ_IMAGES})")
        g.add_argument("--ptq-iterations", default=None, type=int,
                       help=f"optimizer steps per layer and width (default: {AdaRoundSettings().iterations}; with "
                            f"--quick: {QUICK_PTQ_ITERATIONS})")
        g.add_argument("--stats-correction", default=None, choices=CORRECTIONS,
                       help="per configuration, after quantizing: bias (each BN'd conv's output mean per channel set "
                            "back to the float network's, measured on training images with the corrected layers in "
                            "front), bn (mean and spread: BN re-estimation, folded; integer levels kept, scales "
                            "rescaled) or none; stages 3-4 and the export follow "
                            f"(default: {DEFAULT_CORRECTION['fused']}; with --cost-model reference: "
                            f"{DEFAULT_CORRECTION['reference']})")
        g.add_argument("--correction-images", default=Recipe().correction_images, type=int,
                       help=f"training images (the first calibration images) the correction is measured on "
                            f"(default: {Recipe().correction_images}; with --quick: {QUICK_CORRECTION_IMAGES})")
        g.add_argument("--act-calib", default="mse", choices=ACT_CALIBS,
                       help="tensor ranges: mse (each tensor's own squared quantization error on the calibration "
                            "histogram) or kl (that range times the multiplier, 0.5-2.0, that minimizes the KL of the "
                            "network's output from float with that tensor alone quantized, per tensor and width; about "
                            "40 s per width for ResNet-20 on one CPU thread); stages 3-4 and the export follow "
                            "(default: mse)")
        g.add_argument("--act-calib-images", default=None, type=int,
                       help=f"training images (the first calibration images) --act-calib kl is measured on "
                            f"(default: {Recipe().act_calib_images}; with --quick: {QUICK_CALIB_IMAGES})")
        g.add_argument("--signal", default="measured", choices=SIGNALS,
                       help="how each candidate is judged: measured (its accuracy drop, loss increase and KL to the "
                            "float outputs, one forward pass each), fisher (the second-order estimate of that KL from "
                            "the Fisher information: one forward and --fisher-samples backward passes for all "
                            "candidates; stage 3 then ranks with --rank-by fisher and measures what it decides on), "
                            "or both (default: measured)")
        g.add_argument("--fisher-samples", default=1, type=int,
                       help="labels drawn per image from the float model's prediction for the Fisher estimate "
                            "(default: 1)")
        g.add_argument("--calib-images", default=None, type=int,
                       help=f"training images (never validation or test) that calibrate tensor ranges "
                            f"(default: {CALIB_IMAGES}; with --quick: {QUICK_CALIB_IMAGES})")
    return p


# Widths a target's runtime executes in integer (besides float). The generic target models hardware that
# runs any width; ONNX Runtime's CPU build runs 8-bit convolutions and adds (QLinearConv, QLinearAdd).
EXECUTABLE = {"generic": None, "ort-cpu": (8,)}


def stage2_recipe(opts: SensitivityOptions, cost_model: str) -> Recipe:
    """The quantization recipe stage 2's options ask for (the target's weight range, smaller fits with --quick)."""
    return Recipe.for_target(opts.target, opts.granularity, opts.clip, opts.weight_range,
                             "quantized" if opts.quantize_logits else "float", **ptq_options(opts, cost_model))


def ptq_options(opts: SensitivityOptions, cost_model: str) -> dict:
    """Stage 2's --ptq, --ptq-images, --ptq-iterations, --stats-correction and --correction-images as Recipe fields
    (smaller fits and corrections with --quick; no BN re-estimation by default under --granularity tensor)."""
    images = opts.ptq_images if opts.ptq_images is not None else (QUICK_PTQ_IMAGES if opts.quick else Recipe().ptq_images)
    steps = opts.ptq_iterations if opts.ptq_iterations is not None else (
        QUICK_PTQ_ITERATIONS if opts.quick else AdaRoundSettings().iterations)
    if steps < 1:
        raise UserError(f"--ptq-iterations must be >= 1, got {steps}.")
    correction = opts.stats_correction or (DEFAULT_CORRECTION[cost_model] if opts.granularity == "channel" else "none")
    return {"ptq": opts.ptq or DEFAULT_PTQ[cost_model], "ptq_images": images,
            "ptq_settings": AdaRoundSettings(iterations=steps), "correction": correction,
            "correction_images": min(opts.correction_images, QUICK_CORRECTION_IMAGES) if opts.quick
            else opts.correction_images, "act_calib": opts.act_calib,
            "act_calib_images": opts.act_calib_images if opts.act_calib_images is not None else
            (QUICK_CALIB_IMAGES if opts.quick else Recipe().act_calib_images)}


def check_executable(bits, flag: str, target: str):
    allowed = EXECUTABLE[target]
    bad = [b for b in bits if allowed is not None and b not in (*allowed, FLOAT_BITS)]
    if bad:
        raise UserError(f"{flag} {' '.join(map(str, bad))}: --target {target} runs only "
                        f"{', '.join(f'{b}-bit' for b in allowed)} weights and tensors in integer (or float), so the "
                        f"searched configuration could not run as found. Drop {flag} (the default is "
                        f"{' '.join(map(str, allowed))}) or use --target generic to study hardware that runs any width.")


def weight_ladder(opts: SensitivityOptions) -> list[int]:
    """Stage 2's --bits: as given, else the default ladder (a shorter one with --quick; the runtime's widths
    under an executing target); validated."""
    target = opts.target
    default = EXECUTABLE[target] or (QUICK_W_LADDER if opts.quick else DEFAULT_W_LADDER)
    bits = opts.bits if opts.bits is not None else list(default)
    check_widths(bits, "--bits")
    check_executable(bits, "--bits", target)
    return list(dict.fromkeys(bits))


def act_ladder(opts: SensitivityOptions) -> list[int]:
    """Stage 2's --a-bits without 32 (float is always a choice); [] means weights only. An executing target
    searches its runtime's tensor widths by default."""
    target = opts.target
    bits = opts.a_bits if opts.a_bits is not None else list(EXECUTABLE[target] or [])
    if not bits:
        return []
    check_widths(bits, "--a-bits", ACT_BITS)
    check_executable(bits, "--a-bits", target)
    return [b for b in dict.fromkeys(bits) if b != FLOAT_BITS]


def resolve_checkpoint(opts: ModelOptions) -> Path:
    """--checkpoint; else what stage 1 recorded in <results-dir>/01_baseline.json; else the default name."""
    if opts.checkpoint:
        return Path(opts.checkpoint)
    rec = Path(opts.results_dir) / RESULTS_FILES["1"]
    if rec.is_file():
        recorded = load_results_json(rec, "1", PRODUCERS["1"], force=True).get("checkpoint")
        if recorded:
            return Path(recorded)
    if opts.model is not None:
        raise UserError(f"--model {opts.model} needs --checkpoint FILE: the weights to quantize (stage 1 trains the "
                        f"registry's models only; a plain state_dict of the --model network loads).")
    arch, _ = resolve_arch(opts.arch, opts.depth, opts.shortcut)
    return default_checkpoint_path(opts.checkpoint_dir, arch or "resnet20")


def load_float(opts: ModelOptions) -> tuple[torch.nn.Module, dict, Path]:
    """The float model of --checkpoint (or the recorded one) as the model flags say: (model, meta, checkpoint)."""
    arch, shortcut = resolve_arch(opts.arch, opts.depth, opts.shortcut)
    outside = outside_model(opts)
    ckpt = resolve_checkpoint(opts)
    model, meta = load_model(ckpt, arch, shortcut, parse_normalization(opts.normalization),
                             require_finished=not opts.force, outside=outside)
    if meta["foreign"]:
        print(f"note: {ckpt} is a foreign checkpoint (no model_args): loaded as {describe(meta['model_args'])}, "
              f"input normalization {meta['normalization']} ({meta['normalization_source']})")
    return model, meta, ckpt


def check_image_size(model: torch.nn.Module, size, ckpt):
    """Refuse data whose images are not the size the model was traced and priced at."""
    want = tuple(input_shape(model)[2:])
    if tuple(int(s) for s in size) != want:
        raise UserError(f"the model of {ckpt} takes {want[0]}x{want[1]} images (its input size), but the data set's "
                        f"are {size[0]}x{size[1]}: its cost and its trace would describe another network than the one "
                        f"evaluated. Rebuild it with --input-size {size[0]} (a checkpoint without model_args), or "
                        f"evaluate on data of its size.")


@dataclass
class Setup:
    """Everything a post-training stage evaluates with."""
    model: torch.nn.Module
    meta: dict
    checkpoint: Path
    device: torch.device
    normalize: Normalizer
    data_info: dict
    split: SearchSplit
    eval_x: torch.Tensor      # the search images
    eval_y: torch.Tensor
    report_x: torch.Tensor    # the images results are reported on (test, or the test report half)
    report_y: torch.Tensor
    table: KernelTable        # kernels and tensors under the simulated target
    calib_x: torch.Tensor     # uint8 training images for tensor-range calibration
    data: object = None       # the utils.data.Dataset
    cost_model: CostModel = FusedCost()
    recipe: Recipe = Recipe()
    ranges: dict | None = None
    calibration: dict | None = None
    confirm_x: torch.Tensor | None = None   # the confirm images (None: --confirm-size 0)
    confirm_y: torch.Tensor | None = None
    select_x: torch.Tensor | None = None    # the select images (None: --select-size 0)
    select_y: torch.Tensor | None = None
    ptq_cache: Path | None = None           # where learned levels are cached
    levels: dict = field(default_factory=dict)   # {(layer, bits): learned levels} unless recipe.ptq is "nearest"
    ptq_fit: dict | None = None             # how they were made (utils.ptq.LearnedLevels.describe)

    @property
    def per_channel(self) -> bool:
        return self.recipe.per_channel

    @property
    def clip(self) -> str:
        return self.recipe.clip

    @property
    def seed(self) -> int:
        return self.data_info["seed"]

    @property
    def eval_split(self) -> str:
        return self.split.search.name

    @property
    def space(self) -> Space:
        return self.table.space

    @property
    def target(self) -> str:
        return self.table.target

    def calibrate(self, widths, batch_size: int = 250, multipliers: dict | None = None) -> dict:
        """Ranges of every tensor at `widths`, on the calibration images, in the folded float model. Under
        ``act_calib`` kl, `multipliers` (a record of an earlier stage's, {tensor: {bits: multiplier}}) are applied
        to the MSE ranges instead of searching them again, when they cover every tensor and width."""
        widths = sorted({b for b in widths if b != FLOAT_BITS}, reverse=True)
        self.ranges, self.calibration = {}, None
        if not widths:
            return self.ranges
        batches = [self.normalize(self.calib_x[i:i + batch_size]) for i in range(0, len(self.calib_x), batch_size)]
        t = time.time()
        self.ranges = calibrate(fold_bn(self.model), self.target, batches, widths)
        self.calibration = {"method": CALIBRATION_METHOD, "images": len(self.calib_x), "set": "train",
                            "widths": widths}
        if self.recipe.act_calib == "kl":
            narrowed = [name for name in self.ranges if self.recipe.narrows(self.space, (A, name))]
            recorded = rescaled(self.ranges, multipliers, narrowed) if multipliers else None
            self.ranges, chosen = recorded or self._loss_aware(narrowed)
            refined = describe_loss_aware(self.recipe.act_calib_images)
            self.calibration.update(method=f"{CALIBRATION_METHOD}; then {refined}", multipliers=chosen,
                                    multipliers_from="the record" if recorded else "searched here")
        self.calibration.update(seconds=time.time() - t, tensors=self.ranges)
        return self.ranges

    def _loss_aware(self, narrowed) -> tuple[dict, dict]:
        """The MSE ranges of the tensors `narrowed` rescaled by the output's KL (quant/loss_aware.py)."""
        n = self.recipe.act_calib_images
        if len(self.calib_x) < n:
            raise UserError(f"--act-calib kl needs {n} calibration images, and only {len(self.calib_x)} are loaded: "
                            f"lower --act-calib-images or raise --calib-images.")
        with tqdm(total=len(narrowed), desc="loss-aware tensor ranges", unit="tensor") as bar:
            return loss_aware_ranges(self.model, self.table, self.ranges, self.calib_x[:n], self.normalize, narrowed,
                                     progress=lambda _: bar.update())

    def learn_levels(self, pairs) -> dict:
        """Learned levels of every (layer, bits) in `pairs` under a learned recipe.ptq (fitted once and cached,
        utils/ptq.py); nothing under "nearest". The evaluators and placements made afterwards use them."""
        if self.recipe.ptq == "nearest":
            return self.levels
        from utils.ptq import learned_levels
        fit = learned_levels(self.model, self.checkpoint, pairs, self.calib_x, self.normalize, self.recipe,
                             self.ptq_cache)
        self.levels.update(fit.levels)
        self.ptq_fit = {**fit.describe(), "pairs": len(self.levels),
                        "seconds": (self.ptq_fit or {}).get("seconds", 0.0) + fit.seconds}
        return self.levels

    def evaluator(self, x, y, batch_size: int, **kw) -> CachedEvaluator:
        kw.setdefault("levels", self.levels)
        if self.recipe.correction != "none":
            if len(self.calib_x) < self.recipe.correction_images:
                raise UserError(f"the statistics correction needs {self.recipe.correction_images} calibration "
                                f"images, and only {len(self.calib_x)} are loaded: lower --correction-images or raise "
                                f"--calib-images.")
            kw.setdefault("correction", (self.recipe.correction, self.calib_x[:self.recipe.correction_images]))
        return CachedEvaluator(self.model, self.table, x, y, self.normalize, self.ranges, batch_size=batch_size,
                               **self.recipe.weight_kwargs(), **kw)


def _check_recorded(flag, given, recorded, ckpt):
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"--{flag.replace('_', '-')} {given} differs from the {recorded} that {ckpt} was trained "
                        f"with. The search must run on the split the model was held out on: drop --"
                        f"{flag.replace('_', '-')} (or pass {recorded}).")


def load_setup(opts: ModelOptions, recipe: Recipe | None = None, calib_images: int | None = None,
               cost_model: CostModel = FusedCost(), target: str = DEFAULT_TARGET) -> Setup:
    """Checkpoint -> model, preprocessing, and the search / report / calibration images. `recipe`: how weights
    are quantized (default: the target's, quant/recipe.py)."""
    if not isinstance(opts, ModelOptions):
        raise TypeError(f"load_setup takes ModelOptions (utils/options.py), not {type(opts).__name__}")
    if opts.eval_batch_size <= 0:
        raise UserError(f"--eval-batch-size must be > 0, got {opts.eval_batch_size}.")
    device = resolve_device(opts.device)
    model, meta, ckpt = load_float(opts)
    recorded = meta["data"]
    _check_recorded("seed", opts.seed, recorded.get("seed"), ckpt)
    _check_recorded("val_size", opts.val_size, recorded.get("val_size"), ckpt)
    if meta["foreign"] and opts.val_size:
        raise UserError(f"--val-size means nothing for the foreign checkpoint {ckpt}: it was probably trained on "
                        f"all training images. Without flags the search runs on half of the test set; --holdout "
                        f"FILE names another split.")
    seed = recorded.get("seed", opts.seed if opts.seed is not None else 0)
    dataset = opts.dataset or recorded.get("name", "cifar10")
    if recorded.get("name") and dataset != recorded["name"] and not opts.force:
        raise UserError(f"checkpoint {ckpt} was trained on {recorded['name']} data, but --dataset {dataset} "
                        f"was given. Quantization results would mix data sets: drop --dataset, or pass --force.")
    data_dir = opts.data_dir or Path(recorded.get("data_dir") or "data")
    data = load_dataset(dataset, data_dir)
    check_image_size(model, data.test_x.shape[1:3], ckpt)
    seed_everything(seed)
    split = search_split(data, meta, seed, recorded.get("val_size"), opts.holdout, ckpt,
                         confirm_size=opts.confirm_size, select_size=opts.select_size)
    table = kernel_table(model, target)
    if opts.quick:
        k = quick_images(QUICK_EVAL_IMAGES, table.layers, per_layer=True)
        for role in ("search", "report", "confirm", "select"):
            part = getattr(split, role)
            if part is not None:
                setattr(split, role, Part(part.name, part.set, quick_subset(part.indices, k, seed), part.note))
    n_calib = calib_images if calib_images is not None else (QUICK_CALIB_IMAGES if opts.quick else CALIB_IMAGES)
    if n_calib <= 0:
        raise UserError(f"--calib-images must be > 0, got {n_calib}.")
    calib_idx = quick_subset(split.calibration_pool, n_calib, seed)

    def on_device(part):
        x, y = part.arrays(data)
        return to_device_uint8(x, device), torch.from_numpy(y).to(device)
    eval_x, eval_y = on_device(split.search)
    report_x, report_y = on_device(split.report)
    confirm_x, confirm_y = on_device(split.confirm) if split.confirm is not None else (None, None)
    select_x, select_y = on_device(split.select) if split.select is not None else (None, None)
    model = model.to(device)
    norm = meta["normalization"]
    info = {**data.describe(), "data_dir": str(data_dir), "seed": seed, "val_size": recorded.get("val_size"),
            "quick": bool(opts.quick), "policy": split.policy, "eval_split": split.search.name,
            "search": split.search.describe(data), "report": split.report.describe(data),
            "confirm": split.confirm.describe(data) if split.confirm is not None else None,
            "select": split.select.describe(data) if split.select is not None else None,
            "calibration": {"set": "train", "images": len(calib_idx)},
            "normalization": {**norm, "source": meta["normalization_source"]}}
    return Setup(model, meta, ckpt, device, Normalizer(norm["mean"], norm["std"], device), info, split,
                 eval_x, eval_y, report_x, report_y, table, to_device_uint8(data.train_x[calib_idx], device), data,
                 cost_model, recipe or Recipe.for_target(target), confirm_x=confirm_x, confirm_y=confirm_y,
                 select_x=select_x, select_y=select_y,
                 ptq_cache=Path(opts.checkpoint_dir) / "ptq-cache")


def results_header(stage: str, s: Setup) -> dict:
    """The fields every post-training results file starts with."""
    return {"stage": stage, "schema_version": SCHEMA_VERSIONS[stage], "dataset": s.data_info,
            "model_args": s.meta["model_args"], "checkpoint": str(s.checkpoint), "eval_split": s.eval_split,
            "cost_model": s.cost_model.to_json(s.target), "target": s.target,
            "segments": segment_names(s)}


def segment_names(s: Setup) -> dict[str, str]:
    """{layer or tensor name: the name of the segment it is written in}."""
    segs = s.model.segments(s.target)
    return {name: segs[s.table.segment_of[g]].name for g in s.space.groups for name in (g[1],)}


def check_same_data(obj: dict, path, s: Setup, producer: str, force: bool):
    """Refuse results measured on other search images than this run's."""
    differ = {}
    for role in ("search", "confirm", "select"):
        rec, now = obj.get("dataset", {}).get(role) or {}, s.data_info[role] or {}
        differ.update({f"{role} {k}": (rec.get(k), now.get(k)) for k in ("name", "images", "indices_sha256",
                                                                        "content_sha256") if rec.get(k) != now.get(k)})
    if differ and not force:
        raise UserError(f"{path} was measured on other data than this run would search on ({differ}, as "
                        f"(recorded, now)). Re-run {producer} with the same --quick / --holdout / --confirm-size / --select-size / --data-dir "
                        f"flags, or pass --force.")


def write_results(result: dict, opts: Options, s: Setup, inputs: dict, t0: float, name: str) -> Path:
    """Stamp seconds and provenance, then write atomically to --results-dir/name."""
    result["seconds"] = time.time() - t0
    result["provenance"] = provenance(opts, s.device, inputs=inputs, seconds=result["seconds"])
    path = Path(opts.results_dir) / name
    atomic_write_json(path, result)
    return path
