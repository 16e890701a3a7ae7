"""Which images a search sees and which it reports on, and proof that they are the ones meant.

Stage 1 holds out a seeded, stratified validation split of the training images and records its
*identity* in the checkpoint: the indices and a SHA-256 of the images' content (pixels and
labels, not paths). Stages 2-4 rebuild the split and compare, so a moved or re-packed copy of the
same data is accepted and a source whose image order differs is refused.

A model with no validation split of its own (a foreign checkpoint, or ours trained with
``--val-size 0``) must never be searched on images it was trained on. The default then splits
the *test* set, seeded and stratified, into a search half and a report half. ``--holdout FILE``
names another split (format in ``load_holdout``).

Either way, part of the search images (``--confirm-size``, default 40%: 2,000 of 5,000 validation
images, or of a 5,000-image test half) is held back as the *confirm* split: no search step
queries it; it only tests the searched answers, in an order the search fixed (quant/confirm.py).
Another part (``--select-size``, default 20%: 1,000) is the *select* split: no search or confirm step
sees it; it only decides between post-training and fine-tuned weights, and among fine-tuning seeds
(stage 4), so that decision is not judged on images an earlier step selected on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.data import default_val_size, draw_by_class, stratified_split, subset_indices
from utils.errors import UserError

QUICK_TRAIN_IMAGES = 2000   # stage 1 --quick, for ResNet-20; fewer for heavier models (quick_images)
QUICK_EVAL_IMAGES = 1000    # stage 1 --quick: validation and test
QUICK_MIN_IMAGES = 50
SEED_OFFSETS = {"confirm": 1_000_003, "select": 2_000_003}   # each part's draw is independent of the others'
RESNET20_MACS, RESNET20_LAYERS = 40_813_184, 22
HOLDOUT_ROLES = ("search", "report", "confirm", "select")
HOLDOUT_FORMAT = ('{"search": {"set": "train" | "test", "indices": [...]}, '
                  '"report": {"set": "train" | "test", "indices": [...]}, '
                  '"confirm": {"set": ..., "indices": [...]} (optional), "select": {...} (optional)}')
CONFIRM_FRACTION = 0.4   # default --confirm-size: 2,000 of the 5,000 validation images
SELECT_FRACTION = 0.2    # default --select-size: 1,000 of them; the search keeps 2,000 (README, "The splits")


def content_sha256(x_u8: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of images (uint8 NHWC) and labels, in order: the same pixels give the same hash
    wherever and however the files are stored."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x_u8, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def indices_sha256(idx) -> str:
    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()


def train_val_split(data, seed: int, val_size):
    """(train indices, val indices, val_size) of the training images, the split stage 1 holds out."""
    if val_size is None:
        val_size = default_val_size(len(data.train_y))
    train_idx, val_idx = stratified_split(data.train_y, val_size, seed)
    return train_idx, val_idx, val_size


def quick_images(base: int, table, per_layer: bool = False) -> int:
    """--quick's image count for a model: `base` (set for ResNet-20) scaled down by the model's MACs
    (training) or MACs x layers (the per-layer analysis evaluates every layer), at least 50 (or `base`). Keeps a
    quick MobileNetV2 or ResNet-110 run within minutes on a CPU."""
    work = sum(t.macs for t in table) * (len(table) if per_layer else 1)
    ref = RESNET20_MACS * (RESNET20_LAYERS if per_layer else 1)
    return min(base, max(QUICK_MIN_IMAGES, int(base * ref / work)))


def quick_subset(idx: np.ndarray, k: int, seed: int) -> np.ndarray:
    return idx[subset_indices(len(idx), k, seed)]


def split_identity(data, seed: int, val_size: int, val_idx: np.ndarray) -> dict:
    """What a checkpoint records about its validation split."""
    return {"seed": int(seed), "val_size": int(val_size), "val_indices": [int(i) for i in val_idx],
            "val_sha256": content_sha256(data.train_x[val_idx], data.train_y[val_idx])}


def check_split_identity(recorded: dict, data, val_idx: np.ndarray, checkpoint) -> None:
    """Refuse a data source whose validation split is not the one the checkpoint recorded."""
    if [int(i) for i in recorded["val_indices"]] != [int(i) for i in val_idx]:
        raise UserError(
            f"the validation split rebuilt from seed {recorded['seed']} and size {recorded['val_size']} "
            f"holds other image indices than {checkpoint} recorded. The data source has another "
            f"number of images per class, or another version of AI-QS drew the split. Use the data "
            f"the model was trained on (stage 1's --data-dir), or re-train.")
    got = content_sha256(data.train_x[val_idx], data.train_y[val_idx])
    if got != recorded["val_sha256"]:
        raise UserError(
            f"the validation images of this data source differ from those {checkpoint} was validated on "
            f"(content SHA-256 {got[:12]}... instead of {recorded['val_sha256'][:12]}...), although "
            f"indices and labels line up. The source orders its images differently (e.g. the same class "
            f"folders with files named in another order) or holds other pixels, so the search would run "
            f"on images the model may have been trained on. Point --data-dir at the copy stage 1 used.")


@dataclass
class Part:
    """A named set of images: which set (train or test) and which indices of it."""
    name: str                 # "val", "test", "test-search", "test-report", "holdout-search", ...
    set: str                  # "train" or "test"
    indices: np.ndarray
    note: str = ""

    def arrays(self, data):
        x, y = (data.train_x, data.train_y) if self.set == "train" else (data.test_x, data.test_y)
        return x[self.indices], y[self.indices]

    def describe(self, data, with_indices: bool = False) -> dict:
        x, y = self.arrays(data)
        d = {"name": self.name, "set": self.set, "images": len(self.indices),
             "indices_sha256": indices_sha256(self.indices), "content_sha256": content_sha256(x, y)}
        if self.note:
            d["policy"] = self.note
        if with_indices:
            d["indices"] = [int(i) for i in self.indices]
        return d


@dataclass
class SearchSplit:
    """The images a post-training search runs on, the confirm images no search step queries (the
    fixed-sequence test of the searched answers, quant/confirm.py), those results are reported on,
    and the training images tensor ranges are calibrated on."""
    search: Part
    report: Part
    calibration_pool: np.ndarray = field(repr=False)   # training-set indices, never val or test
    policy: str = "val"                                # "val", "test halves" or "holdout file"
    confirm: Part | None = None                        # None: --confirm-size 0
    select: Part | None = None                         # None: --select-size 0

    def parts(self) -> dict[str, Part | None]:
        return {"search": self.search, "confirm": self.confirm, "select": self.select, "report": self.report}


def proportional_split(y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept positions, held positions), both sorted: `size` positions held, each class in proportion to
    its count (largest remainders get the rounding), drawn by a seeded permutation. Any part size works,
    classes of one image included."""
    classes, counts = np.unique(y, return_counts=True)
    quota = size * counts / len(y)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[:size - take.sum()]] += 1
    held = draw_by_class(y, classes, take, seed)
    return np.setdiff1d(np.arange(len(y)), held, assume_unique=True), held


def carve(part: Part, data, size: int, seed: int, role: str, flag: str) -> tuple[Part, Part | None]:
    """(rest, held): a seeded, stratified `size` images of `part` held back as the `role` split ("confirm" or
    "select", each with its own draw); (part, None) for size 0."""
    if size == 0:
        return part, None
    _, y = part.arrays(data)
    if size >= len(part.indices):
        raise UserError(f"{flag} {size} leaves no search images: the {part.name} split has {len(part.indices)} "
                        f"left. Choose a smaller {flag} (0 turns the {role} part off).")
    keep, held = proportional_split(y, size, seed + SEED_OFFSETS[role])
    note = f"stratified {size} of the {part.name} split, seed {seed}"
    return (Part(part.name, part.set, part.indices[keep], part.note),
            Part(f"{part.name}-{role}", part.set, part.indices[held], note))


def carve_parts(part: Part, data, confirm_size: int | None, select_size: int | None, seed: int,
                confirm: Part | None = None, select: Part | None = None) -> tuple[Part, Part | None, Part | None]:
    """(search, confirm, select) of a held-out `part`: the confirm and select parts a holdout file does not name
    are carved from it, confirm first, by default CONFIRM_FRACTION and SELECT_FRACTION of its size."""
    n = len(part.indices)
    if confirm is None:
        size = int(round(CONFIRM_FRACTION * n)) if confirm_size is None else confirm_size
        part, confirm = carve(part, data, size, seed, "confirm", "--confirm-size")
    if select is None:
        size = int(round(SELECT_FRACTION * n)) if select_size is None else select_size
        part, select = carve(part, data, size, seed, "select", "--select-size")
    return part, confirm, select


def test_halves(test_y: np.ndarray, seed: int):
    """Seeded, stratified halves of the test set: (search indices, report indices), each class split
    in two (an odd class gives the extra image to the search half and the next odd one to the report
    half), so classes of any size work."""
    rng = np.random.default_rng(seed)
    search, report, extra = [], [], 0
    for c in np.unique(test_y):
        idx = rng.permutation(np.flatnonzero(test_y == c))
        k = len(idx) // 2 + (len(idx) % 2 and extra == 0)
        extra ^= len(idx) % 2
        search.append(idx[:k])
        report.append(idx[k:])
    return np.sort(np.concatenate(search)), np.sort(np.concatenate(report))


def load_holdout(path, data) -> tuple[Part, Part, Part | None, Part | None]:
    """A user's own held-out split. The file is JSON:

        {"search": {"set": "train" | "test", "indices": [...]},
         "report": {"set": "train" | "test", "indices": [...]},
         "confirm": {"set": "train" | "test", "indices": [...]},      (optional)
         "select": {"set": "train" | "test", "indices": [...]}}       (optional)

    Indices are 0-based positions in the training or test images, in the order the data source
    lists them (class folders in label order, files in name order). No two parts may share an
    image. Use images the model was not trained on. Returns (search, report, confirm or None, select or None).
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--holdout file {path} does not exist. Its format: {HOLDOUT_FORMAT}.") from None
    except OSError as e:
        raise UserError(f"--holdout file {path} could not be read ({e.strerror}). Its format: {HOLDOUT_FORMAT}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--holdout file {path} is not valid JSON ({e}). Its format: {HOLDOUT_FORMAT}.") from None
    parts = []
    for role in HOLDOUT_ROLES:
        entry = obj.get(role) if isinstance(obj, dict) else None
        if role in ("confirm", "select") and entry is None:
            parts.append(None)
            continue
        if not isinstance(entry, dict) or entry.get("set") not in ("train", "test") \
                or not isinstance(entry.get("indices"), list) or not entry["indices"]:
            raise UserError(f"--holdout file {path} needs a non-empty '{role}' entry; the format is {HOLDOUT_FORMAT}.")
        n = len(data.train_y) if entry["set"] == "train" else len(data.test_y)
        idx = entry["indices"]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in idx) \
                or len(set(idx)) != len(idx):
            raise UserError(f"--holdout file {path}: '{role}' indices must be distinct integers in "
                            f"0..{n - 1} (the {entry['set']} set has {n} images). The format is {HOLDOUT_FORMAT}.")
        parts.append(Part(f"holdout-{role}", entry["set"], np.asarray(sorted(idx), dtype=np.int64),
                          f"from {path.name}"))
    present = [(role, p) for role, p in zip(HOLDOUT_ROLES, parts) if p is not None]
    for i, (ra, a) in enumerate(present):
        for rb, b in present[i + 1:]:
            if a.set == b.set and np.intersect1d(a.indices, b.indices).size:
                raise UserError(f"--holdout file {path}: {ra} and {rb} share images; they must be disjoint, or the "
                                f"reported numbers are not out of sample. The format is {HOLDOUT_FORMAT}.")
    return tuple(parts)


def search_split(data, meta: dict, seed: int, val_size, holdout=None, checkpoint="the checkpoint",
                 warn=print, confirm_size: int | None = None, select_size: int | None = None) -> SearchSplit:
    """The search / confirm / report / calibration images for a checkpoint, following the policy above.

    ``meta["data"]`` is what the checkpoint recorded (empty for a foreign one); ``seed`` and
    ``val_size`` are the recorded values (the caller refuses conflicting flags). ``confirm_size`` and
    ``select_size`` images of the search part (seeded, stratified; default CONFIRM_FRACTION and
    SELECT_FRACTION of it) are held back as the confirm and select parts, unless a holdout file names its own.
    """
    for flag, size in (("--confirm-size", confirm_size), ("--select-size", select_size)):
        if size is not None and size < 0:
            raise UserError(f"{flag} must be >= 0, got {size}.")
    all_train = np.arange(len(data.train_y))
    if holdout is not None:
        search, report, confirm, select = load_holdout(holdout, data)
        search, confirm, select = carve_parts(search, data, confirm_size, select_size, seed, confirm, select)
        used = [p.indices for p in (search, report, confirm, select) if p is not None and p.set == "train"]
        pool = np.setdiff1d(all_train, np.concatenate(used)) if used else all_train
        return SearchSplit(search, report, pool, "holdout file", confirm, select)
    if not meta.get("foreign") and val_size:
        train_idx, val_idx, val_size = train_val_split(data, seed, val_size)
        recorded = meta.get("data", {}).get("split")
        if recorded is None:
            warn(f"warning: {checkpoint} predates split identities; rebuilt its validation split from the "
                 f"recorded seed {seed} and size {val_size}, and recording it in the results from now on")
        else:
            check_split_identity(recorded, data, val_idx, checkpoint)
        search, confirm, select = carve_parts(Part("val", "train", val_idx), data, confirm_size, select_size, seed)
        return SearchSplit(search, Part("test", "test", np.arange(len(data.test_y))), train_idx, "val", confirm,
                           select)
    search, report = test_halves(data.test_y, seed)
    why = ("a foreign checkpoint, probably trained on all training images" if meta.get("foreign")
           else "trained with --val-size 0, on all training images")
    note = f"stratified half of the test set, seed {seed}"
    search_part, confirm, select = carve_parts(Part("test-search", "test", search, note), data, confirm_size,
                                               select_size, seed)
    warn(f"note: {checkpoint} has no validation split ({why}): searching on a seeded, stratified half of the "
         f"test set ({len(search_part.indices)} images"
         + (f", {len(confirm.indices)} more held back to confirm the answer" if confirm else "")
         + (f", {len(select.indices)} to select fine-tuned weights" if select else "")
         + f") and reporting on the other half ({len(report)}); --holdout FILE names another split")
    return SearchSplit(search_part, Part("test-report", "test", report, note), all_train, "test halves", confirm,
                       select)
