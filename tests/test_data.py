"""Data sources, cache, synthetic set and split (utils/data.py), on tiny fixtures made here:
a fake cifar-10-batches-py, an image-folder tree of PNGs, and tarballs of that tree."""
import os
import pickle
import sys
import tarfile
import types
import urllib.error
import zlib

import numpy as np
import pytest

import utils.data as D
from utils.data import (CIFAR10_CLASSES, channel_stats, default_val_size, load_dataset, make_synthetic,
                        stratified_split, subset_indices)
from utils.errors import UserError

PIL_Image = pytest.importorskip("PIL.Image")

# Created in this order; labels must follow the sorted order instead.
CLASS_NAMES = ("zebra", "apple", "mango", "kiwi", "banana", "cherry", "lemon", "fig", "grape", "date")
LOADERS = ("_load_python_batches", "_load_image_folder", "_load_tarball")


def images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def cifar_row(img):
    """The official layout: 1024 red, then 1024 green, then 1024 blue values, each row-major."""
    return np.concatenate([img[:, :, 0].ravel(), img[:, :, 1].ravel(), img[:, :, 2].ravel()])


def write_batches(data_dir, n=4, seed=0):
    """A fake cifar-10-batches-py (5 data batches + test batch, n images each, official pickle
    format); returns the expected (train_x, train_y, test_x, test_y)."""
    root = data_dir / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        d = {"batch_label": f"{name} of 6", "labels": y, "data": np.stack([cifar_row(i) for i in x]),
             "filenames": [f"img_{name}_{i}.png" for i in range(n)]}
        with open(root / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(x)
        out[split][1].extend(y)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": n}, f, protocol=2)
    return (np.concatenate(out["train"][0]), np.array(out["train"][1]),
            np.concatenate(out["test"][0]), np.array(out["test"][1]))


def write_tree(root, classes=CLASS_NAMES, n_train=2, n_test=1, test_classes=None):
    """train/<class>/*.png + test/<class>/*.png; returns expected arrays with labels in sorted
    class-name order and images in file-name order within a class."""
    expected = {}
    for split, n, cls_list in (("train", n_train, classes), ("test", n_test, test_classes or classes)):
        for cls in cls_list:
            d = root / split / cls
            d.mkdir(parents=True)
            imgs = images(n, zlib.crc32(f"{split}/{cls}".encode()))
            for i, img in enumerate(imgs):
                # one upper-case suffix: suffixes are matched case-insensitively
                PIL_Image.fromarray(img).save(d / f"{i:04d}.{'PNG' if i == 1 else 'png'}", format="PNG")
            expected[(split, cls)] = imgs
    names = sorted(classes)
    if test_classes is not None and sorted(test_classes) != names:
        return None  # an invalid tree: nothing to expect
    arrays = []
    for split in ("train", "test"):
        arrays.append(np.concatenate([expected[(split, c)] for c in names]))
        arrays.append(np.concatenate([np.full(len(expected[(split, c)]), i) for i, c in enumerate(names)]))
    return (*arrays, tuple(names))


def write_tarball(tree, path, prefix=""):
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        tar.add(tree / "train", arcname=prefix + "train")
        tar.add(tree / "test", arcname=prefix + "test")
    return path


def assert_dataset(ds, train_x, train_y, test_x, test_y):
    assert ds.train_x.dtype == np.uint8 and ds.test_x.dtype == np.uint8
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x, train_x)
    np.testing.assert_array_equal(ds.train_y, train_y)
    np.testing.assert_array_equal(ds.test_x, test_x)
    np.testing.assert_array_equal(ds.test_y, test_y)


@pytest.fixture
def no_decoding(monkeypatch):
    """After this fixture is requested, any decode of a source fails the test."""
    def boom(*a, **k):
        raise AssertionError("the source was decoded again instead of read from the cache")

    def arm():
        for name in LOADERS + ("_decode",):
            monkeypatch.setattr(D, name, boom)
    return arm


# ---------------------------------------------------------------- sources, pixel-exact

def test_python_batches_pixel_exact(tmp_path):
    """The official python batches decode to NHWC uint8 pixel-for-pixel, train = batches 1-5 in
    order, labels as stored, classes = CIFAR-10's."""
    expected = write_batches(tmp_path / "data")
    ds = load_dataset("cifar10", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert ds.train_x.shape == (20, 32, 32, 3) and ds.test_x.shape == (4, 32, 32, 3)
    assert_dataset(ds, *expected)
    assert ds.classes == CIFAR10_CLASSES and ds.name == "cifar10" and not ds.synthetic
    assert ds.source.startswith("python batches")


def test_image_folder_pixel_exact(tmp_path):
    """An image-folder tree decodes pixel-exact (PNG is lossless); label i = i-th sorted class name."""
    *expected, names = write_tree(tmp_path / "tree")
    ds = load_dataset("cifar10", tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert_dataset(ds, *expected)
    assert ds.classes == names == tuple(sorted(CLASS_NAMES)) and ds.classes != CLASS_NAMES
    assert ds.source.startswith("image folder")
    assert ds.describe()["train_images"] == 20 and ds.describe()["num_classes"] == 10


@pytest.mark.parametrize("name", ["cifar.tar.gz", "cifar.tgz", "cifar.tar"])
@pytest.mark.parametrize("prefix", ["", "cifar10-png/", "a/b/"])
@pytest.mark.parametrize("given", ["file", "folder"])
def test_tarball_pixel_exact(tmp_path, name, prefix, given):
    """A tarball of the tree, with or without extra top-level folders, given as the file itself or
    as the folder holding it, decodes to the same arrays as the tree."""
    *expected, names = write_tree(tmp_path / "tree")
    (tmp_path / "dl").mkdir()
    tar = write_tarball(tmp_path / "tree", tmp_path / "dl" / name, prefix)
    ds = load_dataset("cifar10", tar if given == "file" else tmp_path / "dl", cache_dir=tmp_path / "cache")
    assert_dataset(ds, *expected)
    assert ds.classes == names and ds.source == f"tarball: {tar}"


# ---------------------------------------------------------------- cache

@pytest.mark.parametrize("kind", ["batches", "tree", "tarball"])
def test_cache_written_and_used(tmp_path, kind, no_decoding):
    """The first load writes one .npz cache; the second returns equal arrays from it without
    decoding anything."""
    if kind == "batches":
        expected, classes = write_batches(tmp_path / "d"), CIFAR10_CLASSES
        src = tmp_path / "d"
    else:
        *expected, classes = write_tree(tmp_path / "tree")
        src = tmp_path / "tree" if kind == "tree" else write_tarball(tmp_path / "tree", tmp_path / "c.tar.gz")
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", src, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    no_decoding()
    second = load_dataset("cifar10", src, cache_dir=cache)
    assert_dataset(second, *expected)
    assert second.classes == first.classes == classes and second.source == first.source
    assert list(cache.iterdir()) == files


def test_cache_default_location_is_inside_data_dir(tmp_path, no_decoding):
    """Without cache_dir the cache goes to <data-dir>/cache, and for an image-folder source (where
    that folder lies inside the source) the second load still hits it."""
    write_tree(tmp_path / "tree")
    load_dataset("cifar10", tmp_path / "tree")
    assert len(list((tmp_path / "tree" / "cache").glob("cifar10-*.npz"))) == 1
    no_decoding()
    load_dataset("cifar10", tmp_path / "tree")  # the cache folder inside the tree is not an input


def test_cache_not_stale_after_edit(tmp_path):
    """Replacing one image deep inside the tree invalidates the cache: the new pixels are returned."""
    write_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    load_dataset("cifar10", tmp_path / "tree", cache_dir=cache)
    target = tmp_path / "tree" / "train" / "apple" / "0000.png"
    new = images(1, 99)[0]
    st = target.stat()
    PIL_Image.fromarray(new).save(target, format="PNG")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even with a coarse clock
    ds = load_dataset("cifar10", tmp_path / "tree", cache_dir=cache)
    np.testing.assert_array_equal(ds.train_x[0], new)  # apple is the first class, 0000 its first file
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    """A damaged cache file (cut short, overwritten, emptied) is decoded again, not a crash."""
    *expected, _ = write_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    load_dataset("cifar10", tmp_path / "tree", cache_dir=cache)
    (f,) = cache.iterdir()
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 100, "empty": b""}[damage])
    ds = load_dataset("cifar10", tmp_path / "tree", cache_dir=cache)
    assert_dataset(ds, *expected)
    assert f.read_bytes() == data  # and the cache was written again


# ---------------------------------------------------------------- source order

def touch_batches(d):
    (d / "cifar-10-batches-py").mkdir(parents=True)
    (d / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")


def touch_tree(d):
    (d / "train").mkdir(parents=True)
    (d / "test").mkdir()


def test_find_source_order(tmp_path):
    """The documented order: a tarball given as --data-dir; else cifar-10-batches-py/; else an
    image-folder tree; else the first .tar/.tar.gz/.tgz in the folder by name (the official
    cifar-10-python.tar.gz left to the downloader); else nothing."""
    d = tmp_path / "d"
    d.mkdir()
    assert D._find_source(d) == (None, None)
    assert D._find_source(tmp_path / "missing") == (None, None)
    (d / "cifar-10-python.tar.gz").write_bytes(b"")
    (d / "notes.txt").write_bytes(b"")
    assert D._find_source(d) == (None, None)
    for n in ("b.tgz", "a.tar.gz", "c.tar"):
        (d / n).write_bytes(b"")
    assert D._find_source(d) == ("tarball", d / "a.tar.gz")
    touch_tree(d)
    assert D._find_source(d) == ("image folder", d)
    touch_batches(d)
    assert D._find_source(d) == ("python batches", d / "cifar-10-batches-py")
    assert D._find_source(d / "c.tar") == ("tarball", d / "c.tar")
    # a batches folder without data_batch_1 does not count
    e = tmp_path / "e"
    (e / "cifar-10-batches-py").mkdir(parents=True)
    touch_tree(e)
    assert D._find_source(e) == ("image folder", e)


def test_batches_win_over_tree_when_loading(tmp_path):
    """With both cifar-10-batches-py/ and train/ + test/ present, the python batches are loaded."""
    expected = write_batches(tmp_path / "d")
    write_tree(tmp_path / "d")
    ds = load_dataset("cifar10", tmp_path / "d", cache_dir=tmp_path / "cache")
    assert_dataset(ds, *expected)
    assert ds.source.startswith("python batches") and ds.classes == CIFAR10_CLASSES


# ---------------------------------------------------------------- error paths

def load_err(src, tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", src, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing cached
    return str(e.value)


def test_nine_classes_is_user_error(tmp_path):
    write_tree(tmp_path / "tree", classes=CLASS_NAMES[:9])
    msg = load_err(tmp_path / "tree", tmp_path)
    assert "9 classes" in msg and "10" in msg


def test_different_train_test_classes_is_user_error(tmp_path):
    write_tree(tmp_path / "tree", test_classes=CLASS_NAMES[:9] + ("zucchini",))
    msg = load_err(tmp_path / "tree", tmp_path)
    assert "different classes" in msg and "zucchini" in msg and "date" in msg


def test_no_test_images_is_user_error(tmp_path):
    write_tree(tmp_path / "tree")
    for f in (tmp_path / "tree" / "test").rglob("*.png"):
        f.unlink()
    assert "test/<class>/" in load_err(tmp_path / "tree", tmp_path)


def test_unreadable_image_is_user_error(tmp_path):
    """Garbage bytes with an image suffix give a UserError naming the file."""
    write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "kiwi" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    msg = load_err(tmp_path / "tree", tmp_path)
    assert "broken.jpg" in msg and "could not be read" in msg


def test_wrong_size_image_is_user_error(tmp_path):
    write_tree(tmp_path / "tree")
    PIL_Image.fromarray(images(1, 5)[0][:28, :28]).save(tmp_path / "tree" / "test" / "fig" / "small.png")
    msg = load_err(tmp_path / "tree", tmp_path)
    assert "small.png" in msg and "28x28" in msg and "32x32" in msg


def test_wrong_size_image_in_tarball_is_user_error(tmp_path):
    write_tree(tmp_path / "tree")
    PIL_Image.fromarray(images(1, 5)[0][:, :30]).save(tmp_path / "tree" / "train" / "fig" / "narrow.png")
    tar = write_tarball(tmp_path / "tree", tmp_path / "x.tar.gz", "pfx/")
    assert "30x32" in load_err(tar, tmp_path)


def test_truncated_tarball_is_user_error(tmp_path):
    write_tree(tmp_path / "tree")
    tar = write_tarball(tmp_path / "tree", tmp_path / "cut.tar.gz")
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    msg = load_err(tar, tmp_path)
    assert "truncated" in msg and str(tar) in msg


def test_damaged_batch_is_user_error(tmp_path):
    write_batches(tmp_path / "d")
    f = tmp_path / "d" / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    assert "data_batch_3" in load_err(tmp_path / "d", tmp_path)


@pytest.mark.parametrize("exc", [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
                                 OSError(101, "Network is unreachable"),
                                 RuntimeError("File not found or corrupted.")])
def test_offline_without_data_lists_options(tmp_path, monkeypatch, exc):
    """No data under --data-dir and the download failing (a fake torchvision: the network is never
    touched) gives a UserError listing every way to provide the data."""
    calls = []

    def cifar10(root, train=True, download=False, **kw):
        calls.append((root, download))
        raise exc

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=cifar10)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", empty, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert calls == [(str(empty), True)]
    for option in ("cifar-10-batches-py", "image-folder", ".tar.gz", "--dataset synthetic", type(exc).__name__):
        assert option in msg, option
    with pytest.raises(UserError, match="no CIFAR-10 found"):
        load_dataset("cifar10", empty, cache_dir=tmp_path / "cache", download=False)
    assert len(calls) == 1


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(UserError, match="synthetic"):
        load_dataset("imagenet", tmp_path)


# ---------------------------------------------------------------- synthetic

def test_synthetic_deterministic_balanced():
    """Two calls give identical data; shapes and dtypes as CIFAR's; 10 classes, exactly balanced."""
    a, b = make_synthetic(300, 100), make_synthetic(300, 100)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.train_x.shape == (300, 32, 32, 3) and a.test_x.shape == (100, 32, 32, 3)
    assert a.train_x.dtype == np.uint8 and a.train_y.dtype == np.int64
    assert len(a.classes) == 10 and a.name == "synthetic" and a.synthetic
    assert np.bincount(a.train_y, minlength=10).tolist() == [30] * 10
    assert np.bincount(a.test_y, minlength=10).tolist() == [10] * 10
    assert not np.array_equal(a.train_x[:100], a.test_x)  # test images are fresh draws
    assert a.train_x.std() > 10  # not a constant image


def test_synthetic_is_learnable_by_class_means():
    """Classes are separable: a nearest-class-mean classifier on raw pixels beats chance by far."""
    d = make_synthetic(500, 200)
    x, t = d.train_x.reshape(500, -1).astype(np.float32), d.test_x.reshape(200, -1).astype(np.float32)
    means = np.stack([x[d.train_y == c].mean(0) for c in range(10)])
    pred = ((t[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == d.test_y).mean() > 0.5


# ---------------------------------------------------------------- split

def labels_fixture(seed=0, per_class=50):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), per_class))


@pytest.mark.parametrize("val_size", [1, 10, 95, 123, 490])
def test_split_properties(val_size):
    """Disjoint, sorted, together exactly all indices; val_size // 10 per class and the first
    val_size % 10 classes one more; the same for a seed, different for another."""
    y = labels_fixture()
    tr, va = stratified_split(y, val_size, seed=3)
    assert len(va) == val_size and len(tr) == len(y) - val_size
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(y)))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
    counts = np.bincount(y[va], minlength=10)
    assert counts.tolist() == [val_size // 10 + (c < val_size % 10) for c in range(10)]
    tr2, va2 = stratified_split(y, val_size, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    if val_size >= 10:
        assert not np.array_equal(va, stratified_split(y, val_size, seed=4)[1])


def test_split_zero_val():
    y = labels_fixture()
    tr, va = stratified_split(y, 0, seed=0)
    assert len(va) == 0 and np.array_equal(tr, np.arange(len(y)))


@pytest.mark.parametrize("val_size", [-1, 500, 501, 10**6])
def test_split_bad_size_is_user_error(val_size):
    with pytest.raises(UserError, match="--val-size"):
        stratified_split(labels_fixture(), val_size, seed=0)


def test_split_class_too_small_is_user_error():
    y = np.array([0] * 50 + [1] * 3)
    with pytest.raises(UserError, match="class 1"):
        stratified_split(y, 10, seed=0)  # 5 of class 1 would leave none to train on


def test_default_val_size_and_subset():
    assert default_val_size(50_000) == 5000
    s = subset_indices(100, 30, seed=1)
    assert len(s) == 30 and len(set(s.tolist())) == 30 and np.all(np.diff(s) > 0) and s.max() < 100
    assert np.array_equal(s, subset_indices(100, 30, seed=1))
    assert np.array_equal(subset_indices(10, 30, seed=1), np.arange(10))


def test_channel_stats_equals_numpy():
    x = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    x[..., 2] //= 4  # channels with different statistics
    mean, std = channel_stats(x)
    f = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, f.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std, f.std(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    assert len(mean) == 3 and mean[2] < mean[0]
