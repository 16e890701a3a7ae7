"""Typed results of the stages: each wraps the JSON one stage writes and names the keys a user reads.

    Baseline       01_baseline.json    stage 1: the float checkpoint and its accuracy
    Sensitivity    02_per_layer.json   stage 2: one row per (group, width)
    SearchResult   03_search.json      stage 3: the greedy and Pareto answers (`Answer`)
    Comparison     04_baselines.json   stage 4: every configuration scored on the report images (`Scored`)

The JSON stays the record (``.json``, written atomically by the stage, with its provenance); the classes
check its stage and schema version on the way in (``load``), so a result read here is one this code
understands. Accuracies are percentages of images; drops are points.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from utils.errors import UserError
from utils.io import PRODUCERS, RESULTS_FILES, SCHEMA_VERSIONS, load_results_json


@dataclass(frozen=True)
class StageResult:
    json: dict
    path: Path | None = None
    STAGE: ClassVar[str] = ""

    @classmethod
    def file_name(cls) -> str:
        return RESULTS_FILES[cls.STAGE]

    @classmethod
    def schema_version(cls) -> int:
        return SCHEMA_VERSIONS[cls.STAGE]

    @classmethod
    def load(cls, results_dir, force: bool = False):
        """The result in `results_dir`, refused when missing, malformed or (unless `force`) of another schema."""
        path = Path(results_dir) / cls.file_name()
        return cls(load_results_json(path, cls.STAGE, PRODUCERS[cls.STAGE], force=force), path)

    @classmethod
    def of(cls, obj: dict | None, results_dir):
        """The result a stage function returned (None on the other ranks under torchrun)."""
        if obj is None:
            return None
        if obj.get("stage") != cls.STAGE:
            raise UserError(f"a stage-{obj.get('stage')} result is not a {cls.__name__} (stage {cls.STAGE}).")
        return cls(obj, Path(results_dir) / cls.file_name())

    @property
    def seconds(self) -> float | None:
        return self.json.get("seconds")


@dataclass(frozen=True)
class Baseline(StageResult):
    STAGE: ClassVar[str] = "1"

    @property
    def checkpoint(self) -> Path:
        return Path(self.json["checkpoint"])

    @property
    def test_acc(self) -> float:
        return self.json["test_acc"]

    @property
    def val_acc(self) -> float | None:
        return self.json.get("val_acc")


@dataclass(frozen=True)
class SensitivityRow:
    """One group changed alone: a weight layer ("w") at `bits`, or a tensor ("a") at `bits`. The measured
    columns are None in a table stage 2 only estimated (``--signal fisher``), `fisher` where it did not."""
    kind: str
    name: str
    bits: int
    acc: float | None
    drop: float | None
    drop_se: float | None
    kl: float | None
    model_ai: float
    fisher: float | None = None


@dataclass(frozen=True)
class Sensitivity(StageResult):
    STAGE: ClassVar[str] = "2"

    @property
    def images(self) -> int:
        return self.json["eval_images"]

    @property
    def float_acc(self) -> float:
        return self.json["baseline_val_acc"]

    @property
    def fp32_ai(self) -> float:
        return self.json["fp32_ai"]

    @property
    def bits(self) -> list[int]:
        return list(self.json["bits"])

    @property
    def a_bits(self) -> list[int]:
        return list(self.json.get("a_bits") or [])

    def rows(self) -> list[SensitivityRow]:
        """Every measured (group, width), weight layers first, in kernel order."""
        out = []
        for kind, key, width in (("w", "layers", "bits"), ("a", "tensors", "a_bits")):
            for e in self.json.get(key) or []:
                out += [SensitivityRow(kind, e["name"], r[width], r.get("val_acc"), r.get("drop"), r.get("drop_se"),
                                       r.get("kl"), r["model_ai"], r.get("fisher")) for r in e["results"]]
        return out

    def most_sensitive(self, k: int = 5) -> list[SensitivityRow]:
        """The `k` rows with the largest drop (the groups to keep wide); by the Fisher estimate in a table
        that measured none."""
        rows = self.rows()
        measured = all(r.drop is not None for r in rows)
        return sorted(rows, key=lambda r: -(r.drop if measured else r.fisher))[:k]


@dataclass(frozen=True)
class Answer:
    """A searched configuration: its widths (a tensor-widths/1 mapping), modelled AI, and its drops."""
    method: str
    config: dict
    ai: float
    ai_ratio: float
    search_drop: float
    confirm_drop: float | None
    confirm_passed: bool | None


@dataclass(frozen=True)
class SearchResult(StageResult):
    STAGE: ClassVar[str] = "3"

    @property
    def fp32_ai(self) -> float:
        return self.json["fp32_ai"]

    @property
    def max_drop(self) -> float:
        return self.json["max_drop"]

    def answer(self, method: str) -> Answer | None:
        """The "greedy" or "pareto" answer (None where that method did not run)."""
        r = self.json.get(method)
        if not r:
            return None
        return Answer(method, r["config"], r["ai"], r["ai"] / self.fp32_ai, r["drop"], r.get("confirm_drop"),
                      r.get("confirm_passed"))

    @property
    def greedy(self) -> Answer | None:
        return self.answer("greedy")

    @property
    def pareto(self) -> Answer | None:
        return self.answer("pareto")

    @property
    def best(self) -> Answer | None:
        """The answer stage 3 ranks first (the one `export` and the calculator take from this file)."""
        return self.answer(self.json["best"]) if self.json.get("best") else None


@dataclass(frozen=True)
class Scored:
    """One configuration of stage 4, on the report images (test, or the test report half)."""
    name: str
    ai: float
    test_acc: float
    test_acc_ci95: tuple[float, float]
    test_drop: float
    test_drop_ci95: tuple[float, float]
    qat_test_acc: float | None
    qat_answer: str | None


@dataclass(frozen=True)
class Comparison(StageResult):
    STAGE: ClassVar[str] = "4"

    @property
    def report_images(self) -> int:
        return self.json["images"]["report"]["images"]

    @property
    def configs(self) -> dict[str, Scored]:
        return {c["name"]: Scored(c["name"], c["ai"], c["test_acc"], tuple(c["test_acc_ci95"]), c["test_drop"],
                                  tuple(c["test_drop_ci95"]), c.get("qat_test_acc"), c.get("qat_answer"))
                for c in self.json["configs"]}

    def __getitem__(self, name: str) -> Scored:
        try:
            return self.configs[name]
        except KeyError:
            raise UserError(f"{self.path} holds no configuration {name!r}; it has "
                            f"{', '.join(self.configs)}.") from None
