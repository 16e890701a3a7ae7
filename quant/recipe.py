"""The weight-quantization settings every stage, fine-tuning and the export share, and their JSON form.

``Recipe`` is what results files record as their ``quantization`` object: how the BN-folded weights are
quantized (one scale per output channel or per tensor, the clip, the weight range, the rounding, the statistics
correction) and how tensor ranges are chosen (``act_calib``). Stage 2 chooses it;
stages 3-4, fine-tuning and the export read it back with ``Recipe.from_json`` instead of rebuilding the
defaults, so what the search measured is what is fine-tuned and deployed.
"""
from __future__ import annotations

from dataclasses import dataclass

from quant.adaround import AdaRoundSettings
from quant.correct import MODES as CORRECTIONS
from quant.errors import UserError
from quant.quantizer import CLIP_MODES, DEFAULT_WEIGHT_RANGE, check_weight_range
from quant.widths import FLOAT_BITS, A, Space

GRANULARITIES = ("channel", "tensor")
# How tensor ranges are chosen: "mse" (each tensor's own squared error, quant/calibrate.py) or "kl" (that MSE
# range rescaled to minimize the network output's KL from float, each tensor alone, quant/loss_aware.py)
ACT_CALIBS = ("mse", "kl")
LOGITS = ("float", "quantized")
PTQ_METHODS = ("nearest", "adaround", "block")
# Post-training rounding by cost model: learned rounding is what benchmarks/ptq_methods.py measured best;
# the reference convention keeps the reference work's round-to-nearest.
DEFAULT_PTQ = {"fused": "adaround", "reference": "nearest"}
# Statistics correction by cost model: BN re-estimation is what benchmarks/ptq_methods.py measured best on the search
# images; the reference convention keeps the reference work's plain post-training quantization.
DEFAULT_CORRECTION = {"fused": "bn", "reference": "none"}
# Files written before these settings existed: the full int8 grid, and logits quantized like every tensor.
LEGACY_WEIGHT_RANGE = 8
LEGACY_LOGITS = "quantized"


@dataclass(frozen=True)
class Recipe:
    granularity: str = "channel"
    clip: str = "mse"
    weight_range: int = 8
    # The logits (the tensor the last kernel writes): "float" keeps them float in uniform configurations and
    # out of the search space. Quantized, they tie (4-bit logits take a dozen values) and lose accuracy for
    # almost no AI (one tensor of 10 values per image).
    logits: str = "float"
    # How weights are rounded after training: "nearest" (to the nearest level of the MSE grid), "adaround"
    # (learned per layer and width on `ptq_images` training images, quant/adaround.py, with its settings) or
    # "block" (learned per block and width, the block's layers together, quant/blockwise.py, the same settings)
    ptq: str = "nearest"
    ptq_images: int = 256
    ptq_settings: AdaRoundSettings = AdaRoundSettings()
    # Statistics correction after quantization, per configuration (quant/correct.py): "none", "bias" (each BN'd
    # conv's output mean set back to the float network's) or "bn" (mean and spread: BN re-estimation), on the
    # first `correction_images` training images
    correction: str = "none"
    correction_images: int = 512
    # Tensor ranges (ACT_CALIBS): "kl" rescales the MSE ranges on the first `act_calib_images` calibration images
    act_calib: str = "mse"
    act_calib_images: int = 512

    def __post_init__(self):
        if self.correction not in CORRECTIONS:
            raise UserError(f"statistics correction {self.correction!r} is not supported; use one of {CORRECTIONS}.")
        if self.correction == "bn" and self.granularity != "channel":
            raise UserError("--stats-correction bn rescales each output channel's weights, so it needs one weight "
                            "scale per channel: drop --granularity tensor, or use --stats-correction bias.")
        if self.act_calib not in ACT_CALIBS:
            raise UserError(f"tensor-range calibration {self.act_calib!r} is not supported; use one of {ACT_CALIBS}.")
        if self.act_calib_images < 1:
            raise UserError(f"--act-calib-images must be >= 1, got {self.act_calib_images}.")
        if self.correction_images < 2:
            raise UserError(f"--correction-images must be >= 2, got {self.correction_images}.")
        if self.ptq not in PTQ_METHODS:
            raise UserError(f"post-training method {self.ptq!r} is not supported; use one of {PTQ_METHODS}.")
        if self.ptq_images < 1:
            raise UserError(f"--ptq-images must be >= 1, got {self.ptq_images}.")
        if self.logits not in LOGITS:
            raise UserError(f"logits {self.logits!r}: use 'float' or 'quantized'.")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"weight granularity {self.granularity!r} is not supported; use one of {GRANULARITIES}.")
        if self.clip not in CLIP_MODES:
            raise UserError(f"clip mode {self.clip!r} is not supported; use one of {CLIP_MODES}.")
        check_weight_range(self.weight_range)

    @classmethod
    def for_target(cls, target: str, granularity: str = "channel", clip: str = "mse",
                   weight_range: int | None = None, logits: str = "float", **ptq) -> "Recipe":
        """The recipe with the target's default weight range where none is given."""
        return cls(granularity, clip, DEFAULT_WEIGHT_RANGE[target] if weight_range is None else weight_range, logits,
                   **ptq)

    def narrows(self, space: Space, group) -> bool:
        """May `group` take widths other than float? Every group but float logits."""
        return not (self.logits == "float" and group == (A, space.logits))

    def uniform(self, space: Space, w: int, a: int) -> dict:
        """Every weight at `w`, every tensor at `a`, the logits float unless they are quantized."""
        return space.uniform(w, a, FLOAT_BITS if self.logits == "float" else None)

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    def weight_kwargs(self) -> dict:
        """The keyword arguments of quant.place.quantize_ and quant.evaluation.CachedEvaluator."""
        return {"per_channel": self.per_channel, "clip": self.clip, "weight_range": self.weight_range}

    def to_json(self) -> dict:
        out = {"granularity": self.granularity, "clip": self.clip, "weight_range": self.weight_range,
               "weights": "BN-folded", "logits": self.logits, "ptq": self.ptq}
        if self.ptq != "nearest":
            out["ptq_settings"] = {"images": self.ptq_images, "set": "train", **self.ptq_settings.to_json()}
        out["correction"] = self.correction
        if self.correction != "none":
            out["correction_settings"] = {"images": self.correction_images, "set": "train"}
        if self.act_calib != "mse":   # absent: MSE ranges, as every file before the option (fine-tune keys unchanged)
            out["act_calib"] = self.act_calib
            out["act_calib_settings"] = {"images": self.act_calib_images, "set": "train"}
        return out

    @classmethod
    def from_json(cls, obj: dict | None) -> "Recipe":
        """A recorded ``quantization`` object (absent keys: the defaults of the version that wrote it)."""
        obj = obj or {}
        settings = dict(obj.get("ptq_settings") or {})
        images = settings.pop("images", 256)
        settings.pop("set", None)
        return cls(obj.get("granularity", "channel"), obj.get("clip", "mse"),
                   obj.get("weight_range", LEGACY_WEIGHT_RANGE), obj.get("logits", LEGACY_LOGITS),
                   obj.get("ptq", "nearest"), images,
                   AdaRoundSettings(**{k: v for k, v in settings.items() if k in AdaRoundSettings.__dataclass_fields__}),
                   obj.get("correction", "none"), (obj.get("correction_settings") or {}).get("images", 512),
                   obj.get("act_calib", "mse"), (obj.get("act_calib_settings") or {}).get("images", 512))

    def describe(self) -> str:
        rng = "" if self.weight_range == 8 else f", 8-bit weights in range {self.weight_range}"
        fix = "" if self.correction == "none" else f", {self.correction} correction on {self.correction_images} images"
        ranges = "" if self.act_calib == "mse" else f", {self.act_calib} tensor ranges"
        return f"{self.granularity}, {self.clip}{rng}, logits {self.logits}, {self.ptq} rounding{fix}{ranges}"
