"""Split identity and the search / report / calibration images (utils/split.py, and its use by
stage 1 and by load_setup in stages 2-4).

Everything runs on tiny data made here: a 10-class image-folder tree of PNGs (6 training and 4
test images per class), copies of it (moved, re-packed as .tar.gz, re-ordered), and synthetic
arrays. Stage 1 is run in-process once per module with --epochs 0 on that tree, which writes a
real checkpoint in about a second (plus PyTorch's one-time optimizer import).
"""
import json
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import utils.split as S
import utils.stages.common as common
from utils.options import BaselineOptions, SearchOptions, SensitivityOptions, TrainOptions
from utils.data import Dataset, load_dataset
from utils.errors import UserError
from utils.cli import script_module
from utils.stages.common import load_setup

PIL_Image = pytest.importorskip("PIL.Image")

CLASSES = tuple(f"c{i}" for i in range(10))
N_TRAIN, N_TEST = 6, 4          # per class
SEED, VAL_SIZE = 3, 20          # stage 1's flags for the main checkpoint (seed 3: not the default 0)
STAGES = ("2_per_layer_analysis.py", "3_greedy_search.py", "4_create_baselines.py")
OPTIONS = dict(zip(STAGES, (SensitivityOptions, SearchOptions, BaselineOptions)))



# ---------------------------------------------------------------- tiny data sources
def write_tree(root, name=lambda i, n: f"{i:02d}.png"):
    """train/<class>/*.png and test/<class>/*.png with deterministic random pixels. `name(i, n)`
    names the i-th image of a class of n, so a caller can make the files sort in another order."""
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for cls in CLASSES:
            d = Path(root) / split / cls
            d.mkdir(parents=True)
            imgs = np.random.default_rng(zlib.crc32(f"{split}/{cls}".encode())).integers(
                0, 256, (n, 32, 32, 3), dtype=np.uint8)
            for i, img in enumerate(imgs):
                PIL_Image.fromarray(img).save(d / name(i, n), format="PNG")
    return Path(root)


def copy_tree(src, dst, rename=lambda i, n: i):
    """The same image files (byte for byte) under dst; file i of a class of n becomes file rename(i, n)."""
    for split in ("train", "test"):
        for cls_dir in sorted((Path(src) / split).iterdir()):
            files = sorted(cls_dir.iterdir())
            out = Path(dst) / split / cls_dir.name
            out.mkdir(parents=True)
            for i, f in enumerate(files):
                shutil.copyfile(f, out / f"{rename(i, len(files)):02d}{f.suffix}")
    return Path(dst)


def tar_tree(src, dst):
    """A .tar.gz of the tree under another top folder name."""
    with tarfile.open(dst, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(Path(src) / split, arcname=f"repacked-cifar/{split}")
    return Path(dst)


def load(source, cache_dir):
    return load_dataset("cifar10", source, cache_dir=cache_dir)


def tiny_dataset(train_y, test_y=None):
    """A Dataset from labels alone: each image's pixels encode its index (distinct images)."""
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.arange(20) % 10 if test_y is None else np.asarray(test_y, dtype=np.int64)

    def imgs(n, salt):
        rng = np.random.default_rng(salt)
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return Dataset(imgs(len(train_y), 1), train_y, imgs(len(test_y), 2), test_y, CLASSES, "cifar10", "arrays")


def stage_args(script, tmp_path, *argv):
    """argv parsed by a stage script's own parser, on CPU, results under tmp_path."""
    ns = script_module(script).get_args_parser().parse_args(
        ["--device", "cpu", "--results-dir", str(tmp_path / "results"), *map(str, argv)])
    return OPTIONS[script].from_args(ns)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny tree, its decoded Dataset, and two real stage-1 checkpoints trained on it
    (--epochs 0): one with --seed 3 --val-size 20, one with --val-size 0."""
    from utils.stages.train_baseline import train_baseline
    root = tmp_path_factory.mktemp("split")
    tree = write_tree(root / "tree")
    out = {"root": root, "tree": tree, "data": load(tree, root / "cache")}
    parser = script_module("1_train_baseline.py").get_args_parser()
    for key, val_size in (("ckpt", VAL_SIZE), ("ckpt_val0", 0)):
        d = root / key
        args = parser.parse_args(["--dataset", "cifar10", "--data-dir", str(tree), "--seed", str(SEED),
                                  "--val-size", str(val_size), "--epochs", "0", "--device", "cpu",
                                  "--checkpoint-dir", str(d / "checkpoints"), "--results-dir", str(d / "results")])
        out[key + "_results"] = train_baseline(TrainOptions.from_args(args))
        out[key] = d / "checkpoints" / "resnet20_baseline.pt"
    return out


def read_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- 1. identity: indices + content hash
def test_content_sha256_is_pixels_and_labels_in_order():
    """content_sha256 depends only on pixel values, labels and their order: equal for an equal copy
    (other memory layout, other label dtype), different after one changed pixel, one changed label,
    or two swapped images."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4])
    h = S.content_sha256(x, y)
    fortran = np.asfortranarray(x)
    assert S.content_sha256(fortran, y.astype(np.int32)) == h
    x2 = x.copy()
    x2[2, 5, 5, 1] ^= 1
    assert S.content_sha256(x2, y) != h
    assert S.content_sha256(x, np.array([0, 1, 2, 3, 5])) != h
    assert S.content_sha256(x[[1, 0, 2, 3, 4]], y) == S.content_sha256(x[[1, 0, 2, 3, 4]], y)
    assert S.content_sha256(x[[1, 0, 2, 3, 4]], y) != h
    assert S.indices_sha256([1, 2, 3]) == S.indices_sha256(np.array([1, 2, 3], dtype=np.int32))
    assert S.indices_sha256([1, 2, 3]) != S.indices_sha256([1, 2, 4])


def test_split_identity_records_indices_and_content_not_paths(tiny):
    """split_identity holds seed, size, the validation indices and the SHA-256 of those images'
    pixels and labels; nothing in it names where the data came from."""
    data = tiny["data"]
    _, val_idx, size = S.train_val_split(data, SEED, VAL_SIZE)
    ident = S.split_identity(data, SEED, size, val_idx)
    assert ident == {"seed": SEED, "val_size": VAL_SIZE, "val_indices": [int(i) for i in val_idx],
                     "val_sha256": S.content_sha256(data.train_x[val_idx], data.train_y[val_idx])}
    assert str(tiny["tree"]) not in json.dumps(ident) and "tree" not in json.dumps(ident)
    # stratified: 2 of each class's 6 training images
    assert np.bincount(data.train_y[val_idx]).tolist() == [2] * 10


def test_stage1_checkpoint_records_split_identity(tiny):
    """Stage 1 writes split_identity(...) under ckpt["data"]["split"], with the validation indices
    and the content hash, and a summary (indices hash, no index list) in 01_baseline.json."""
    data = tiny["data"]
    _, val_idx, _ = S.train_val_split(data, SEED, VAL_SIZE)
    split = read_ckpt(tiny["ckpt"])["data"]["split"]
    assert split == S.split_identity(data, SEED, VAL_SIZE, val_idx)
    summary = tiny["ckpt_results"]["dataset"]["split"]
    assert "val_indices" not in summary
    assert summary["val_indices_sha256"] == S.indices_sha256(val_idx)
    assert summary["val_sha256"] == split["val_sha256"]
    # --val-size 0: an empty split is recorded, and the results say the search uses test halves
    split0 = read_ckpt(tiny["ckpt_val0"])["data"]["split"]
    assert split0["val_size"] == 0 and split0["val_indices"] == []
    assert tiny["ckpt_val0_results"]["dataset"]["search_split"] == "test halves"


def test_moved_and_repacked_copies_have_the_same_identity(tiny, tmp_path):
    """The same image tree in another folder, and as a .tar.gz under another top folder, decode to
    the same validation identity; check_split_identity and search_split accept both, silently."""
    recorded = read_ckpt(tiny["ckpt"])["data"]["split"]
    moved = copy_tree(tiny["tree"], tmp_path / "elsewhere" / "cifar-copy")
    packed = tar_tree(tiny["tree"], tmp_path / "cifar-copy.tar.gz")
    for source in (moved, packed):
        data = load(source, tmp_path / "cache")
        assert data.source != tiny["data"].source
        _, val_idx, _ = S.train_val_split(data, SEED, VAL_SIZE)
        assert S.split_identity(data, SEED, VAL_SIZE, val_idx) == recorded
        S.check_split_identity(recorded, data, val_idx, "ckpt.pt")      # no error
        notes = []
        split = S.search_split(data, {"data": {"split": recorded}}, SEED, VAL_SIZE, warn=notes.append)
        assert notes == [] and split.policy == "val"
        assert searched_and_confirmed(split) == recorded["val_indices"]


def test_load_setup_accepts_moved_and_repacked_copies(tiny, tmp_path, monkeypatch):
    """Stage 2's set-up on a moved copy and on a .tar.gz of the training data runs on the
    recorded validation split (same indices, same content hash)."""
    monkeypatch.chdir(tmp_path)   # a tarball's decode cache goes to ./data/cache: keep it out of the repo
    recorded = read_ckpt(tiny["ckpt"])["data"]["split"]
    moved = copy_tree(tiny["tree"], tmp_path / "moved")
    packed = tar_tree(tiny["tree"], tmp_path / "packed.tar.gz")
    for source in (moved, packed):
        s = load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", tiny["ckpt"], "--data-dir", source))
        assert s.split.policy == "val" and s.data_info["policy"] == "val"
        assert searched_and_confirmed(s.split) == recorded["val_indices"]
        s0 = load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", tiny["ckpt"], "--data-dir", source,
                                   "--confirm-size", 0, "--select-size", 0))
        assert s0.split.confirm is None and s0.data_info["confirm"] is None
        assert s0.split.select is None and s0.data_info["select"] is None and s0.select_x is None
        assert s0.data_info["search"]["content_sha256"] == recorded["val_sha256"]


# ---------------------------------------------------------------- 2. another image order is refused
def test_reordered_source_is_refused_naming_the_order(tiny, tmp_path):
    """The same class folders with the files renamed to sort in reverse: labels and validation
    indices are identical, only the image at each index differs, and check_split_identity /
    search_split raise a UserError that names the cause (another order / different images)."""
    recorded = read_ckpt(tiny["ckpt"])["data"]["split"]
    reordered = copy_tree(tiny["tree"], tmp_path / "reordered", rename=lambda i, n: n - 1 - i)
    data = load(reordered, tmp_path / "cache")
    assert np.array_equal(data.train_y, tiny["data"].train_y)
    assert sorted(map(bytes, data.train_x)) == sorted(map(bytes, tiny["data"].train_x))  # same images
    _, val_idx, _ = S.train_val_split(data, SEED, VAL_SIZE)
    assert val_idx.tolist() == recorded["val_indices"]
    with pytest.raises(UserError) as e:
        S.check_split_identity(recorded, data, val_idx, "ckpt.pt")
    msg = str(e.value)
    assert "order" in msg and "differ" in msg and "ckpt.pt" in msg
    with pytest.raises(UserError, match="order"):
        S.search_split(data, {"data": {"split": recorded}}, SEED, VAL_SIZE, warn=lambda m: None)


def test_load_setup_refuses_reordered_source(tiny, tmp_path):
    """Stage 2's set-up on a re-ordered copy of the data stops with the image-order UserError."""
    reordered = copy_tree(tiny["tree"], tmp_path / "reordered", rename=lambda i, n: n - 1 - i)
    with pytest.raises(UserError, match="order"):
        load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", tiny["ckpt"], "--data-dir", reordered))


def test_other_pixels_or_other_class_sizes_are_refused():
    """A source with other pixels at the validation indices is refused by the content hash; one
    with another number of images per class (so the rebuilt indices differ) by the index check."""
    data = tiny_dataset(np.arange(60) % 10)
    _, val_idx, _ = S.train_val_split(data, 0, 20)
    recorded = S.split_identity(data, 0, 20, val_idx)
    S.check_split_identity(recorded, data, val_idx, "ck")
    changed = tiny_dataset(data.train_y)
    changed.train_x = data.train_x.copy()
    changed.train_x[val_idx[0], 0, 0, 0] ^= 0xFF
    with pytest.raises(UserError, match="differ"):
        S.check_split_identity(recorded, changed, val_idx, "ck")
    bigger = tiny_dataset(np.concatenate([data.train_y, [0, 0, 0]]))
    _, other_idx, _ = S.train_val_split(bigger, 0, 20)
    assert other_idx.tolist() != recorded["val_indices"]
    with pytest.raises(UserError, match="indices"):
        S.check_split_identity(recorded, bigger, other_idx, "ck")


# ---------------------------------------------------------------- 3. --seed / --val-size at stages 2-4
@pytest.mark.parametrize("script", STAGES)
@pytest.mark.parametrize("flag,wrong", [("--seed", 0), ("--seed", 4), ("--val-size", 10), ("--val-size", 0)])
def test_stage_flag_differing_from_checkpoint_is_an_error(tiny, tmp_path, script, flag, wrong):
    """At stages 2-4 a --seed / --val-size other than the checkpoint's is a UserError that names
    the flag and the recorded value."""
    with pytest.raises(UserError) as e:
        load_setup(stage_args(script, tmp_path, "--checkpoint", tiny["ckpt"], flag, wrong))
    recorded = SEED if flag == "--seed" else VAL_SIZE
    assert f"{flag} {wrong}" in str(e.value) and str(recorded) in str(e.value)


@pytest.mark.parametrize("script", STAGES)
def test_stage_flags_equal_to_checkpoint_are_fine(tiny, tmp_path, script):
    """At stages 2-4 passing the recorded --seed and --val-size is accepted and changes nothing."""
    s = load_setup(stage_args(script, tmp_path, "--checkpoint", tiny["ckpt"], "--seed", SEED, "--val-size", VAL_SIZE))
    plain = load_setup(stage_args(script, tmp_path, "--checkpoint", tiny["ckpt"]))
    assert s.data_info["seed"] == plain.data_info["seed"] == SEED
    assert s.data_info["search"] == plain.data_info["search"]


def test_stage2_cli_conflicting_seed_exits_2(tiny, tmp_path, capsys):
    """Through the script's own entry (utils.cli.run), a conflicting --seed ends with exit code 2
    and an error naming --seed, before anything is written."""
    from utils.cli import run
    mod = script_module(STAGES[0])
    with pytest.raises(SystemExit) as e:
        run(mod.main, mod.get_args_parser(), ["--checkpoint", str(tiny["ckpt"]), "--device", "cpu",
                                             "--results-dir", str(tmp_path / "results"), "--seed", "7"])
    assert e.value.code == 2
    assert "--seed 7 differs" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- 4. checkpoints from before split identities
def test_legacy_checkpoint_warns_once_and_rebuilds_split(tiny, tmp_path, capsys):
    """A checkpoint whose data record has no 'split' is accepted with a one-line warning, and the
    split is rebuilt from the recorded seed and size (the one stage 1 drew)."""
    ck = read_ckpt(tiny["ckpt"])
    recorded = ck["data"].pop("split")
    legacy = tmp_path / "legacy.pt"
    torch.save(ck, legacy)
    capsys.readouterr()
    s = load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", legacy))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "predates" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning") and f"seed {SEED}" in lines[0] \
        and f"size {VAL_SIZE}" in lines[0]
    assert s.split.policy == "val"
    assert searched_and_confirmed(s.split) == recorded["val_indices"]


def test_legacy_meta_warns_through_callback():
    """search_split on a record without 'split' calls warn exactly once with one line, and
    rebuilds the split from (seed, size) without any identity check."""
    data = tiny_dataset(np.arange(60) % 10)
    notes = []
    split = S.search_split(data, {"data": {"seed": 5, "val_size": 20}}, 5, 20, checkpoint="old.pt",
                           warn=notes.append)
    assert len(notes) == 1 and "\n" not in notes[0] and "old.pt" in notes[0]
    train_idx, val_idx, _ = S.train_val_split(data, 5, 20)
    assert searched_and_confirmed(split) == val_idx.tolist() and len(split.confirm.indices) == 8
    assert np.array_equal(split.calibration_pool, train_idx)
    assert split.report.set == "test" and split.report.indices.tolist() == list(range(len(data.test_y)))


# ---------------------------------------------------------------- 5. no validation split: test halves
def searched_and_confirmed(split) -> list[int]:
    """The search, confirm and select parts together (disjoint, sorted): the images the split was carved from."""
    both = np.concatenate([p.indices for p in (split.search, split.confirm, split.select) if p is not None])
    assert len(np.unique(both)) == len(both)
    return sorted(both.tolist())


def check_halves(split, data, seed):
    """The test-halves policy: disjoint, covering, class-balanced, seeded; calibration = all train; the
    confirm images come out of the search half."""
    search, report = np.array(searched_and_confirmed(split)), split.report.indices
    assert split.policy == "test halves" and split.search.set == split.report.set == split.confirm.set == "test"
    assert np.intersect1d(search, report).size == 0
    assert np.array_equal(np.sort(np.concatenate([search, report])), np.arange(len(data.test_y)))
    assert np.array_equal(np.bincount(data.test_y[search], minlength=10),
                          np.bincount(data.test_y[report], minlength=10))
    exp_search, exp_report = S.test_halves(data.test_y, seed)
    assert np.array_equal(search, exp_search) and np.array_equal(report, exp_report)
    assert np.array_equal(split.calibration_pool, np.arange(len(data.train_y)))


def test_test_halves_are_disjoint_covering_balanced_and_seeded():
    """test_halves: two disjoint sorted halves covering the test set, the same number of each class
    in both, the same for the same seed and different for another."""
    y = np.repeat(np.arange(10), 20)
    np.random.default_rng(1).shuffle(y)
    search, report = S.test_halves(y, 0)
    assert len(search) == len(report) == 100
    assert np.intersect1d(search, report).size == 0 and len(np.union1d(search, report)) == 200
    assert np.all(np.diff(search) > 0) and np.all(np.diff(report) > 0)
    assert np.bincount(y[search]).tolist() == np.bincount(y[report]).tolist() == [10] * 10
    again = S.test_halves(y, 0)
    assert np.array_equal(again[0], search) and np.array_equal(again[1], report)
    assert not np.array_equal(S.test_halves(y, 1)[0], search)


@pytest.mark.parametrize("foreign", [True, False])
def test_search_split_without_val_uses_test_halves_with_one_note(foreign):
    """search_split for a foreign checkpoint, and for ours with val_size 0: search on one seeded,
    stratified half of the test set, report on the other, calibrate on all training images, and
    say so in one line naming the reason."""
    data = tiny_dataset(np.arange(60) % 10, np.repeat(np.arange(10), 4))
    meta = {"foreign": True, "data": {}} if foreign else {"foreign": False, "data": {"seed": 2, "val_size": 0}}
    notes = []
    split = S.search_split(data, meta, 2, None if foreign else 0, checkpoint="m.pt", warn=notes.append)
    check_halves(split, data, 2)
    assert len(notes) == 1 and "\n" not in notes[0] and "m.pt" in notes[0] and "half of the test set" in notes[0]
    assert ("foreign" in notes[0]) == foreign and ("--val-size 0" in notes[0]) != foreign
    assert split.search.describe(data)["policy"] == split.report.describe(data)["policy"]
    assert f"{len(split.confirm.indices)} more held back to confirm" in notes[0]


def test_load_setup_foreign_checkpoint_uses_test_halves(tiny, tmp_path, capsys):
    """A foreign checkpoint (a bare state_dict) at stages 2-4: test halves seeded by --seed (0
    without), one note line, all training images for calibration; --val-size is refused."""
    foreign = tmp_path / "foreign.pt"
    torch.save(read_ckpt(tiny["ckpt"])["model"], foreign)
    data = tiny["data"]
    for seed_args, seed in (((), 0), (("--seed", 5), 5)):
        capsys.readouterr()
        s = load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", foreign, "--data-dir", tiny["tree"],
                                  *seed_args))
        assert s.meta["foreign"]
        check_halves(s.split, data, seed)
        notes = [ln for ln in capsys.readouterr().out.splitlines() if "no validation split" in ln]
        assert len(notes) == 1 and "foreign" in notes[0]
        assert s.data_info["policy"] == "test halves" and s.data_info["eval_split"] == "test-search"
        assert s.data_info["report"]["name"] == "test-report"
    with pytest.raises(UserError, match="--val-size"):
        load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", foreign, "--data-dir", tiny["tree"],
                              "--val-size", 20))


def test_load_setup_val_size_0_checkpoint_uses_test_halves(tiny, tmp_path, capsys):
    """Our checkpoint trained with --val-size 0 searches on a test half seeded by its recorded
    seed, reports on the other half, calibrates on training images, with one note line."""
    capsys.readouterr()
    s = load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", tiny["ckpt_val0"]))
    check_halves(s.split, tiny["data"], SEED)
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "no validation split" in ln]
    assert len(notes) == 1 and "--val-size 0" in notes[0]
    assert s.data_info["calibration"]["set"] == "train"


# ---------------------------------------------------------------- 6. --holdout FILE
def holdout_file(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_holdout_files_load_from_train_or_test(tmp_path):
    """Valid holdout files load: search and report from train or test, indices sorted, parts named
    holdout-search / holdout-report; the same index may appear in both when the sets differ."""
    data = tiny_dataset(np.arange(60) % 10)
    for s_set, r_set in (("train", "test"), ("test", "test"), ("train", "train"), ("test", "train")):
        f = holdout_file(tmp_path / f"{s_set}-{r_set}.json",
                         {"search": {"set": s_set, "indices": [7, 1, 3]}, "report": {"set": r_set, "indices": [4, 0]}})
        search, report, confirm, select = S.load_holdout(f, data)
        assert confirm is None and select is None
        assert (search.name, search.set, search.indices.tolist()) == ("holdout-search", s_set, [1, 3, 7])
        assert (report.name, report.set, report.indices.tolist()) == ("holdout-report", r_set, [0, 4])
        assert f.name in search.note
    f = holdout_file(tmp_path / "cross.json", {"search": {"set": "train", "indices": [0, 1]},
                                               "report": {"set": "test", "indices": [0, 1]}})
    S.load_holdout(f, data)   # same numbers, different sets: no overlap


def test_holdout_calibration_pool_excludes_holdout_training_images(tmp_path):
    """With --holdout the calibration pool is every training image not named by the file; a
    holdout entirely on the test set leaves all training images."""
    data = tiny_dataset(np.arange(60) % 10)
    f = holdout_file(tmp_path / "h.json", {"search": {"set": "train", "indices": [5, 2, 40]},
                                           "report": {"set": "train", "indices": [59, 0]}})
    split = S.search_split(data, {"foreign": True, "data": {}}, 0, None, holdout=f, warn=pytest.fail)
    assert split.policy == "holdout file"
    assert split.calibration_pool.tolist() == sorted(set(range(60)) - {0, 2, 5, 40, 59})
    f2 = holdout_file(tmp_path / "h2.json", {"search": {"set": "test", "indices": [1]},
                                             "report": {"set": "train", "indices": [3]}})
    assert 3 not in S.search_split(data, {"data": {}}, 0, 0, holdout=f2).calibration_pool
    f3 = holdout_file(tmp_path / "h3.json", {"search": {"set": "test", "indices": [1]},
                                             "report": {"set": "test", "indices": [2]}})
    assert S.search_split(data, {"data": {}}, 0, 0, holdout=f3).calibration_pool.tolist() == list(range(60))


def test_load_setup_with_holdout(tiny, tmp_path):
    """load_setup --holdout FILE searches and reports on the file's images, calibrates on other
    training images, and records the parts (counts and hashes) in data_info."""
    f = holdout_file(tmp_path / "h.json", {"search": {"set": "train", "indices": list(range(0, 60, 3))},
                                           "report": {"set": "test", "indices": list(range(0, 40, 2))}})
    s = load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", tiny["ckpt"], "--holdout", f))
    assert s.split.policy == "holdout file" and s.data_info["policy"] == "holdout file"
    assert searched_and_confirmed(s.split) == list(range(0, 60, 3)) and len(s.split.confirm.indices) == 8
    assert s.data_info["report"]["images"] == 20 and s.data_info["report"]["set"] == "test"
    assert np.intersect1d(s.split.calibration_pool, np.arange(0, 60, 3)).size == 0
    assert len(s.calib_x) == 40


N_TRAIN_TINY = 60
MALFORMED = {
    "not json": ("{search: nope", "not valid JSON"),
    "not utf-8": (b"\xff\xfe\x00garbage", "not valid JSON"),
    "top level list": ([1, 2], "'search'"),
    "missing report": ({"search": {"set": "train", "indices": [1]}}, "'report'"),
    "bad set": ({"search": {"set": "val", "indices": [1]}, "report": {"set": "test", "indices": [2]}}, "'search'"),
    "empty indices": ({"search": {"set": "train", "indices": []}, "report": {"set": "test", "indices": [2]}}, "'search'"),
    "out of range": ({"search": {"set": "train", "indices": [0, N_TRAIN_TINY]},
                      "report": {"set": "test", "indices": [2]}}, f"0..{N_TRAIN_TINY - 1}"),
    "negative": ({"search": {"set": "train", "indices": [1]}, "report": {"set": "test", "indices": [-1]}}, "0..19"),
    "not integers": ({"search": {"set": "train", "indices": [1.5, True]},
                      "report": {"set": "test", "indices": [2]}}, "integers"),
    "duplicates": ({"search": {"set": "train", "indices": [4, 4]}, "report": {"set": "test", "indices": [2]}},
                   "distinct"),
    "overlap": ({"search": {"set": "test", "indices": [1, 2]}, "report": {"set": "test", "indices": [2, 3]}},
                "share"),
    "confirm overlaps search": ({"search": {"set": "test", "indices": [1, 2]}, "report": {"set": "test", "indices": [3]},
                                 "confirm": {"set": "test", "indices": [2, 5]}}, "search and confirm share"),
    "bad confirm": ({"search": {"set": "test", "indices": [1, 2]}, "report": {"set": "test", "indices": [3]},
                     "confirm": {"set": "test", "indices": []}}, "'confirm'"),
}
def write_malformed(tmp_path, case):
    content, _ = MALFORMED[case]
    f = tmp_path / "holdout.json"
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        holdout_file(f, content)
    return f


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_holdout_is_a_user_error_naming_the_problem(tmp_path, case):
    """Each malformed --holdout file is a UserError naming the file and what is wrong with it."""
    f = write_malformed(tmp_path, case)
    with pytest.raises(UserError) as e:
        S.load_holdout(f, tiny_dataset(np.arange(N_TRAIN_TINY) % 10))
    assert str(f) in str(e.value) and MALFORMED[case][1] in str(e.value)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_holdout_message_gives_the_format(tmp_path, case):
    """Each malformed --holdout file's UserError spells out the file format (HOLDOUT_FORMAT)."""
    f = write_malformed(tmp_path, case)
    with pytest.raises(UserError) as e:
        S.load_holdout(f, tiny_dataset(np.arange(N_TRAIN_TINY) % 10))
    assert S.HOLDOUT_FORMAT in str(e.value)


def test_missing_holdout_file_is_a_user_error(tmp_path):
    """A --holdout path that does not exist is a UserError saying so."""
    with pytest.raises(UserError, match="does not exist"):
        S.load_holdout(tmp_path / "nope.json", tiny_dataset(np.arange(20) % 10))


def test_load_setup_refuses_malformed_holdout(tiny, tmp_path):
    """load_setup passes --holdout to the validation: an overlapping file stops the stage."""
    f = holdout_file(tmp_path / "h.json", {"search": {"set": "test", "indices": [1, 2]},
                                           "report": {"set": "test", "indices": [2]}})
    with pytest.raises(UserError, match="share"):
        load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", tiny["ckpt"], "--holdout", f))


# ---------------------------------------------------------------- 7. recorded counts, hashes, indices
def test_part_describe_records_counts_hashes_and_indices():
    """Part.describe gives name, set, image count, indices_sha256 and content_sha256 of exactly its
    images, the policy note when there is one, and the index list only with with_indices=True."""
    data = tiny_dataset(np.arange(60) % 10)
    idx = np.array([3, 9, 17])
    d = S.Part("val", "train", idx).describe(data)
    assert d == {"name": "val", "set": "train", "images": 3, "indices_sha256": S.indices_sha256(idx),
                 "content_sha256": S.content_sha256(data.train_x[idx], data.train_y[idx])}
    t = S.Part("test-search", "test", idx, "why").describe(data, with_indices=True)
    assert t["indices"] == [3, 9, 17] and t["policy"] == "why"
    assert t["content_sha256"] == S.content_sha256(data.test_x[idx], data.test_y[idx]) != d["content_sha256"]
    json.dumps(t)   # plain JSON types


def test_quick_subset_is_a_seeded_sorted_subset():
    """quick_subset picks min(k, n) of the given indices, sorted, the same for the same seed."""
    idx = np.arange(100, 300, 2)
    sub = S.quick_subset(idx, 30, 4)
    assert len(sub) == 30 and set(sub) <= set(idx) and np.all(np.diff(sub) > 0)
    assert np.array_equal(sub, S.quick_subset(idx, 30, 4))
    assert not np.array_equal(sub, S.quick_subset(idx, 30, 5))
    assert np.array_equal(S.quick_subset(idx, 500, 4), idx)


def test_load_setup_quick_records_the_subset(tiny, tmp_path, monkeypatch):
    """With --quick the search and report parts are seeded subsets, and data_info records their
    image counts and hashes (what later stages compare against)."""
    monkeypatch.setattr(common, "QUICK_EVAL_IMAGES", 7)
    data = tiny["data"]
    s = load_setup(stage_args(STAGES[0], tmp_path, "--checkpoint", tiny["ckpt"], "--quick"))
    full = S.search_split(data, read_ckpt(tiny["ckpt"]), SEED, VAL_SIZE, warn=lambda m: None)
    sub = S.quick_subset(full.search.indices, 7, SEED)
    assert np.array_equal(s.split.search.indices, sub)
    assert np.array_equal(s.split.confirm.indices, S.quick_subset(full.confirm.indices, 7, SEED))
    assert s.data_info["search"] == S.Part("val", "train", sub).describe(data)
    assert s.data_info["search"]["images"] == 7 and s.data_info["report"]["images"] == 7
    assert s.data_info["confirm"]["images"] == 7 and len(s.confirm_y) == 7
    assert s.data_info["report"]["indices_sha256"] == S.indices_sha256(S.quick_subset(np.arange(40), 7, SEED))
    assert len(s.eval_y) == len(s.report_y) == 7


def test_holdout_path_that_is_a_folder_is_a_user_error(tmp_path):
    """A --holdout path that cannot be read as a file (a folder) is a UserError, not a traceback."""
    with pytest.raises(UserError, match="could not be read"):
        S.load_holdout(tmp_path, tiny_dataset(np.arange(N_TRAIN_TINY) % 10))


def test_test_halves_with_unequal_classes():
    """Classes of different (and odd) sizes split into halves within one image per class, disjoint and
    covering, without naming a flag the user never passed."""
    y = np.array([0] * 31 + [1] * 10 + [2] * 7)
    search, report = S.test_halves(y, 0)
    assert np.intersect1d(search, report).size == 0 and len(search) + len(report) == len(y)
    for c, n in ((0, 31), (1, 10), (2, 7)):
        assert abs((y[search] == c).sum() - (y[report] == c).sum()) <= 1
    assert abs(len(search) - len(report)) <= 1


# ---------------------------------------------------------------- 7. the confirm split
def test_confirm_and_select_splits_are_seeded_stratified_and_disjoint():
    """By default 40% of the held-out part is the confirm split and 20% the select split (2,000 and 1,000 of
    5,000), each stratified by class, seeded by its own draw, and disjoint from each other and from the search
    images; --confirm-size / --select-size N take N; 0 turns a part off (and leaves the other as it was); a
    size that leaves no search image is refused."""
    data = tiny_dataset(np.arange(500) % 10)
    meta = {"data": {"seed": 3, "val_size": 100}}
    split = S.search_split(data, meta, 3, 100, warn=lambda m: None)
    assert (len(split.search.indices), len(split.confirm.indices), len(split.select.indices)) == (40, 40, 20)
    assert np.bincount(data.train_y[split.confirm.indices]).tolist() == [4] * 10
    assert np.bincount(data.train_y[split.select.indices]).tolist() == [2] * 10
    assert split.confirm.name == "val-confirm" and split.confirm.set == "train"
    assert split.select.name == "val-select" and split.select.set == "train"
    parts = [split.search.indices, split.confirm.indices, split.select.indices]
    assert len(np.unique(np.concatenate(parts))) == 100
    _, val_idx, _ = S.train_val_split(data, 3, 100)
    assert sorted(np.concatenate(parts).tolist()) == sorted(val_idx.tolist())
    assert not set(np.concatenate(parts).tolist()) & set(split.calibration_pool.tolist())
    again = S.search_split(data, meta, 3, 100, warn=lambda m: None)
    assert all(np.array_equal(a.indices, b.indices) for a, b in
               ((again.confirm, split.confirm), (again.select, split.select), (again.search, split.search)))
    other = S.search_split(data, {"data": {"seed": 4, "val_size": 100}}, 4, 100, warn=lambda m: None)
    assert not np.array_equal(other.confirm.indices, split.confirm.indices)
    assert not np.array_equal(other.select.indices, split.select.indices)
    sized = S.search_split(data, meta, 3, 100, warn=lambda m: None, confirm_size=10, select_size=30)
    assert (len(sized.confirm.indices), len(sized.select.indices), len(sized.search.indices)) == (10, 30, 60)
    no_select = S.search_split(data, meta, 3, 100, warn=lambda m: None, select_size=0)
    assert no_select.select is None and np.array_equal(no_select.confirm.indices, split.confirm.indices)
    assert S.search_split(data, meta, 3, 100, warn=lambda m: None, confirm_size=0).confirm is None
    for kw, bad, match in (("confirm_size", 100, "leaves no search images"), ("confirm_size", -1, ">= 0"),
                           ("select_size", 60, "leaves no search images"), ("select_size", -2, ">= 0")):
        with pytest.raises(UserError, match=match):
            S.search_split(data, meta, 3, 100, warn=lambda m: None, **{kw: bad})


def test_select_part_of_test_halves_comes_from_the_search_half():
    """A checkpoint with no validation split: confirm and select are carved from the test set's search half,
    never from the report half."""
    data = tiny_dataset(np.arange(60) % 10)
    split = S.search_split(data, {"foreign": True, "data": {}}, 0, None, warn=lambda m: None)
    half = np.concatenate([split.search.indices, split.confirm.indices, split.select.indices])
    assert split.select.set == "test" and len(np.unique(half)) == len(half)
    assert sorted(half.tolist()) == S.test_halves(data.test_y, 0)[0].tolist()
    assert not set(half.tolist()) & set(split.report.indices.tolist())


def test_holdout_may_name_its_own_confirm_and_select_parts(tmp_path):
    """A holdout file's optional 'confirm' and 'select' parts are used as they are (nothing carved from
    'search' for a part it names), must not overlap the others, and the calibration pool excludes their training
    images too."""
    data = tiny_dataset(np.arange(60) % 10)
    f = holdout_file(tmp_path / "h.json", {"search": {"set": "train", "indices": [1, 2, 3]},
                                           "report": {"set": "test", "indices": [4]},
                                           "confirm": {"set": "train", "indices": [9, 8]},
                                           "select": {"set": "train", "indices": [11, 10]}})
    split = S.search_split(data, {"foreign": True, "data": {}}, 0, None, holdout=f, warn=pytest.fail)
    assert split.search.indices.tolist() == [1, 2, 3] and split.confirm.indices.tolist() == [8, 9]
    assert split.select.indices.tolist() == [10, 11] and split.select.name == "holdout-select"
    assert split.confirm.name == "holdout-confirm"
    assert not {1, 2, 3, 8, 9, 10, 11} & set(split.calibration_pool.tolist())
    f2 = holdout_file(tmp_path / "h2.json", {"search": {"set": "train", "indices": [1, 2, 3, 4, 5]},
                                             "report": {"set": "test", "indices": [4]},
                                             "confirm": {"set": "train", "indices": [9, 8]}})
    carved = S.search_split(data, {"foreign": True, "data": {}}, 0, None, holdout=f2, warn=pytest.fail)
    assert carved.confirm.indices.tolist() == [8, 9] and len(carved.select.indices) == 1
    assert sorted(carved.search.indices.tolist() + carved.select.indices.tolist()) == [1, 2, 3, 4, 5]
    f3 = holdout_file(tmp_path / "h3.json", {"search": {"set": "train", "indices": [1, 2, 3]},
                                             "report": {"set": "test", "indices": [4]},
                                             "select": {"set": "train", "indices": [3, 7]}})
    with pytest.raises(UserError, match="search and select share images"):
        S.search_split(data, {"foreign": True, "data": {}}, 0, None, holdout=f3, warn=pytest.fail)
