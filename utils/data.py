"""CIFAR-10 from whatever the user has (python batches, image folder, tarball, download),
decoded once into uint8 arrays and cached; a synthetic stand-in; the validation split."""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CACHE_VERSION = 1  # bump when the decoded layout changes


@dataclass
class Dataset:
    """Images as uint8 NHWC (N, 32, 32, 3) arrays, labels as int64."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple
    name: str          # "cifar10" or "synthetic"
    source: str        # where it came from, for the results' provenance

    @property
    def synthetic(self) -> bool:
        return self.name == "synthetic"

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "synthetic": self.synthetic,
                "train_images": len(self.train_y), "test_images": len(self.test_y),
                "num_classes": len(self.classes)}


# ---------------------------------------------------------------- synthetic
def make_synthetic(n_train: int = 10_000, n_test: int = 2_000, num_classes: int = 10) -> Dataset:
    """A deterministic, learnable 10-class set: each class is a smooth colour template;
    images are randomly shifted, brightness-jittered, noisy copies. Always seed 0, so every
    run sees the same data; --seed still drives the split and training."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 1, (num_classes, 3, 4, 4)).astype(np.float32)
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)  # (C, 3, 32, 32), blocky but distinct

    def sample(n):
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = templates[y]
        shifts = rng.integers(-4, 5, (n, 2))
        x = np.stack([np.roll(img, tuple(s), axis=(1, 2)) for img, s in zip(x, shifts)])
        x = x * rng.uniform(0.7, 1.3, (n, 1, 1, 1)) + rng.normal(0, 0.25, x.shape)
        x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), y.astype(np.int64)

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return Dataset(train_x, train_y, test_x, test_y, tuple(f"class{i}" for i in range(num_classes)),
                   "synthetic", f"synthetic (generated, {n_train} train / {n_test} test, seed 0)")


# ---------------------------------------------------------------- CIFAR-10 sources
def _load_python_batches(root: Path):
    def read(name):
        try:
            with open(root / name, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return x, np.asarray(d["labels"], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise UserError(f"could not read CIFAR-10 batch {root / name} ({e}). The folder looks "
                            f"damaged: delete {root} to download it again, or point --data-dir at "
                            f"another copy.") from None
    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = read("test_batch")
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            test_x, test_y, CIFAR10_CLASSES)


def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"image {where} could not be read ({e}). Remove or replace the file, "
                        f"then run again.") from None
    if arr.shape != (32, 32, 3):
        raise UserError(f"image {where} is {arr.shape[1]}x{arr.shape[0]} pixels; CIFAR-10 images must "
                        f"be 32x32. Resize the data set to 32x32 first, or point --data-dir at "
                        f"the original CIFAR-10.")
    return arr


def _split_member(path: str):
    """'any/prefix/train/cat/0001.jpg' -> ('train', 'cat'); None for anything else."""
    parts = Path(path).parts
    if len(parts) < 3 or Path(path).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    split, cls = parts[-3], parts[-2]
    return (split, cls) if split in ("train", "test") else None


def _assemble(files: dict, origin: str):
    """files: {(split, class): [(sort key, loader)]} -> arrays, checking the class layout."""
    classes = {s: sorted({c for (sp, c) in files if sp == s}) for s in ("train", "test")}
    if not classes["train"] or not classes["test"]:
        missing = [s for s in ("train", "test") if not classes[s]]
        raise UserError(f"{origin} has no images under {' or '.join(f'{s}/<class>/' for s in missing)}. "
                        f"An image-folder data set needs train/<class>/*.jpg and test/<class>/*.jpg.")
    if classes["train"] != classes["test"]:
        raise UserError(f"{origin}: train/ and test/ have different classes "
                        f"(only in train: {sorted(set(classes['train']) - set(classes['test']))}, "
                        f"only in test: {sorted(set(classes['test']) - set(classes['train']))}). "
                        f"Both need the same class folders.")
    names = classes["train"]
    if len(names) != 10:
        raise UserError(f"{origin} has {len(names)} classes ({names}); CIFAR-10 needs 10 class folders "
                        f"in train/ and test/. Restore the missing classes.")
    from tqdm import tqdm
    out = {}
    total = sum(len(v) for v in files.values())
    with tqdm(total=total, desc=f"decoding {Path(origin).name}", unit="img", leave=False) as bar:
        for split in ("train", "test"):
            xs, ys = [], []
            for label, cls in enumerate(names):
                for key, load in sorted(files.get((split, cls), []), key=lambda t: t[0]):
                    xs.append(_decode(load(), f"{origin}:{key}"))
                    ys.append(label)
                    bar.update()
            out[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return out["train"][0], out["train"][1], out["test"][0], out["test"][1], tuple(names)


def _load_image_folder(root: Path):
    files = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        key = _split_member(rel)
        if key and path.is_file():
            files.setdefault(key, []).append((rel, path.read_bytes))
    return _assemble(files, str(root))


def _load_tarball(path: Path):
    files = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                key = _split_member(m.name) if m.isfile() else None
                if key:
                    data = tar.extractfile(m).read()
                    files.setdefault(key, []).append((m.name, lambda d=data: d))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"could not read the archive {path} ({e}). It may be truncated: download or "
                        f"copy it again.") from None
    return _assemble(files, str(path))


def _find_source(data_dir: Path):
    """The first usable CIFAR-10 source under --data-dir, in the documented order."""
    if data_dir.is_file() and data_dir.name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tarball", data_dir
    if (data_dir / "cifar-10-batches-py" / "data_batch_1").exists():
        return "python batches", data_dir / "cifar-10-batches-py"
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return "image folder", data_dir
    if data_dir.is_dir():
        tars = sorted(p for p in data_dir.iterdir() if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz"))
                      and not p.name.startswith("cifar-10-python"))
        if tars:
            return "tarball", tars[0]
    return None, None


def _download(data_dir: Path):
    import torchvision
    try:
        torchvision.datasets.CIFAR10(str(data_dir), train=True, download=True)
    except Exception as e:  # urllib, ssl, socket, checksum: all mean "no data from the net"
        raise UserError(
            f"no CIFAR-10 found under --data-dir {data_dir} and the download failed ({type(e).__name__}: {e}). "
            f"Give --data-dir one of: a folder holding cifar-10-batches-py/ (the official python "
            f"version); an image-folder tree train/<class>/*.jpg + test/<class>/*.jpg; a .tar or "
            f".tar.gz of such a tree (e.g. --data-dir ../shared/data/cifar10-jpeg.tar.gz); or run "
            f"where the internet is reachable. For an offline demo use --dataset synthetic.") from None
    return "python batches", data_dir / "cifar-10-batches-py"


def _cache_path(cache_dir: Path, kind: str, src: Path) -> Path:
    ident = f"{CACHE_VERSION}|{kind}|{src.resolve()}"
    if src.is_dir():
        # A folder's own mtime misses edits deep inside: its files identify it. Not the cache's
        # own files, nor the folder's mtime, which writing the cache changes: the default
        # <data-dir>/cache lies inside an image-folder source.
        try:
            skip = cache_dir.resolve().relative_to(src.resolve()).parts
        except ValueError:
            skip = None
        ident += "|" + "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                for p in sorted(src.rglob("*")) if p.is_file()
                                and not (skip and p.relative_to(src).parts[:len(skip)] == skip))
    else:
        st = src.stat()
        ident += f"|{st.st_size}|{st.st_mtime_ns}"
    return cache_dir / f"cifar10-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npz"


def load_dataset(name: str = "cifar10", data_dir="data", cache_dir=None, download: bool = True) -> Dataset:
    """Load CIFAR-10 (or the synthetic set), decoding at most once per source thanks to a cache."""
    if name == "synthetic":
        return make_synthetic()
    if name != "cifar10":
        raise UserError(f"unknown --dataset {name!r}: use cifar10 or synthetic.")
    data_dir = Path(data_dir)
    kind, src = _find_source(data_dir)
    if kind is None:
        if not download:
            raise UserError(f"no CIFAR-10 found under --data-dir {data_dir}.")
        kind, src = _download(data_dir)
    cache_dir = Path(cache_dir) if cache_dir else (data_dir if data_dir.is_dir() else Path("data")) / "cache"
    cache = _cache_path(cache_dir, kind, src)
    if cache.exists():
        try:
            with np.load(cache) as z:
                arrays = [z[k] for k in ("train_x", "train_y", "test_x", "test_y")]
                classes = tuple(str(c) for c in z["classes"])
            return Dataset(*arrays, classes, "cifar10", f"{kind}: {src}")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache is rebuilt below
    loader = {"python batches": _load_python_batches, "image folder": _load_image_folder,
              "tarball": _load_tarball}[kind]
    train_x, train_y, test_x, test_y, classes = loader(src)
    try:
        from utils.io import atomic_write_bytes
        buf = io.BytesIO()
        np.savez(buf, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=np.array(classes))
        atomic_write_bytes(cache, buf.getvalue())
    except (OSError, UserError) as e:
        print(f"note: could not write the decoded-data cache {cache} ({e}); continuing without it")
    return Dataset(train_x, train_y, test_x, test_y, classes, "cifar10", f"{kind}: {src}")


# ---------------------------------------------------------------- split
def default_val_size(n_train: int) -> int:
    """10% of the training images: 5,000 of CIFAR-10's 50,000."""
    return n_train // 10


def stratified_split(labels: np.ndarray, val_size: int, seed: int):
    """Seeded, stratified hold-out: (train_idx, val_idx), disjoint, sorted.

    Each class gives val_size // C images, the first val_size % C classes one more.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if val_size < 0 or val_size >= n:
        raise UserError(f"--val-size {val_size} must be between 0 and {n - 1} (the training set has "
                        f"{n} images; 0 trains on all of them and searches on the test set).")
    if val_size == 0:
        return np.arange(n), np.arange(0)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = [val_size // len(classes) + (i < val_size % len(classes)) for i in range(len(classes))]
    for c, k, m in zip(classes, per_class, counts):
        if k > m - 1:
            raise UserError(f"--val-size {val_size} would take {k} images of class {c}, which has only "
                            f"{m}; choose a smaller --val-size.")
    val = draw_by_class(labels, classes, per_class, seed)
    train = np.setdiff1d(np.arange(n), val, assume_unique=True)
    return train, val


def draw_by_class(labels: np.ndarray, classes, take, seed: int) -> np.ndarray:
    """Sorted positions: the first `k` of a seeded permutation of each class's positions, for each (class, k) of
    (`classes`, `take`) in that order (one generator for all, so the draw depends on the order)."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]))


def channel_stats(x_uint8: np.ndarray):
    """Per-channel mean and std in [0, 1] units, for input normalization.

    Exact, from a 256-bin histogram per channel: no float copy of the whole set."""
    means, stds = [], []
    levels = np.arange(256, dtype=np.float64) / 255.0
    for c in range(x_uint8.shape[-1]):
        hist = np.bincount(x_uint8[..., c].ravel(), minlength=256).astype(np.float64)
        p = hist / hist.sum()
        mean = float((p * levels).sum())
        means.append(mean)
        stds.append(float(np.sqrt((p * (levels - mean) ** 2).sum())))
    return means, stds


def subset_indices(n: int, k: int, seed: int) -> np.ndarray:
    """A seeded subset of k of n indices (sorted), for --quick."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])
