"""The weight-quantization settings every stage, fine-tuning and the export share, and their JSON form.

``Recipe`` is what results files record as their ``quantization`` object: how the BN-folded weights are
quantized (one scale per output channel or per tensor, the clip, the weight range). Stage 2 chooses it;
stages 3-4, fine-tuning and the export read it back with ``Recipe.from_json`` instead of rebuilding the
defaults, so what the search measured is what is fine-tuned and deployed.
"""
from __future__ import annotations

from dataclasses import dataclass

from quant.errors import UserError
from quant.quantizer import CLIP_MODES, DEFAULT_WEIGHT_RANGE, check_weight_range

GRANULARITIES = ("channel", "tensor")
# Files written before the weight range existed used the full int8 grid.
LEGACY_WEIGHT_RANGE = 8


@dataclass(frozen=True)
class Recipe:
    granularity: str = "channel"
    clip: str = "mse"
    weight_range: int = 8

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise UserError(f"weight granularity {self.granularity!r} is not supported; use one of {GRANULARITIES}.")
        if self.clip not in CLIP_MODES:
            raise UserError(f"clip mode {self.clip!r} is not supported; use one of {CLIP_MODES}.")
        check_weight_range(self.weight_range)

    @classmethod
    def for_target(cls, target: str, granularity: str = "channel", clip: str = "mse",
                   weight_range: int | None = None) -> "Recipe":
        """The recipe with the target's default weight range where none is given."""
        return cls(granularity, clip, DEFAULT_WEIGHT_RANGE[target] if weight_range is None else weight_range)

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    def weight_kwargs(self) -> dict:
        """The keyword arguments of quant.place.quantize_ and quant.evaluation.CachedEvaluator."""
        return {"per_channel": self.per_channel, "clip": self.clip, "weight_range": self.weight_range}

    def to_json(self) -> dict:
        return {"granularity": self.granularity, "clip": self.clip, "weight_range": self.weight_range,
                "weights": "BN-folded"}

    @classmethod
    def from_json(cls, obj: dict | None) -> "Recipe":
        """A recorded ``quantization`` object (absent keys: the defaults of the version that wrote it)."""
        obj = obj or {}
        return cls(obj.get("granularity", "channel"), obj.get("clip", "mse"),
                   obj.get("weight_range", LEGACY_WEIGHT_RANGE))

    def describe(self) -> str:
        rng = "" if self.weight_range == 8 else f", 8-bit weights in range {self.weight_range}"
        return f"{self.granularity}, {self.clip}{rng}"
