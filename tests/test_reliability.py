"""Every stage survives interruption, stale inputs and bad input.

* Interruption: a real SIGKILL of a training process, then --resume, ends with the weights of an
  uninterrupted run; a kill in the middle of a checkpoint write leaves the previous checkpoint
  loadable; Ctrl-C exits 130 and says how to resume.
* Stale inputs: results made from another checkpoint or an older schema, or missing, are
  refused with a message naming the stage to re-run; --force overrides.
* Bad input: each answered by a one-paragraph message, exit code 2 and no traceback.
* Determinism: two runs with the same seed write the same results, apart from timings.

CLI behaviour is checked in subprocesses where the process itself matters (signals, the real
script entry points) and otherwise in-process through utils.cli.run, which is what the scripts
call, so that a dozen error cases do not each pay for a Python + PyTorch start.
"""
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

import utils.io
from conftest import COMMON, QUICK_BITS, REPO, SUBPROCESS_ENV, run_script
from models.resnet import CifarResNet
from utils.checkpoint import read_checkpoint
from utils.cli import run, script_module
from utils.errors import UserError
from utils.io import SCHEMA_VERSION, atomic_torch_save, atomic_write_json, atomic_write_text, sha256_file

BITS = [str(b) for b in QUICK_BITS]



# ---------------------------------------------------------------- helpers



def run_stage(script, *argv):
    """Run a stage through utils.cli.run in this process: (exit code, stdout, stderr).

    An exception other than the SystemExit that run() turns errors into propagates and fails
    the test, exactly as it would print a traceback from the real script."""
    mod = script_module(script)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            run(mod.main, mod.get_args_parser(), [str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def squash(text):
    return re.sub(r"\s+", "", text)


def assert_user_error(code, err, *needles, exit_code=2):
    """Exit code 2, no traceback, and one paragraph starting with 'error:' that holds `needles`
    (compared without whitespace: the message is wrapped at 100 columns)."""
    assert code == exit_code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    i = err.rfind("error: ")
    assert i >= 0, err[-3000:]
    para = err[i:].strip()
    assert para and "\n\n" not in para, para
    for needle in needles:
        assert squash(needle) in squash(para), (needle, para)
    return para


def tmp_files(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if p.name.endswith(".tmp"))


def state_dicts_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- interruption (stage 1)

DRIVER = """\
# Stage 1 on a tiny synthetic set (400 train / 100 test): utils.stages.train_baseline.load_dataset is replaced,
# everything else is the real 1_train_baseline.py behind the real utils.cli.run.
import importlib.util
import os
import signal
import sys

sys.path.insert(0, {repo!r})
import utils.stages.train_baseline as B
from utils.cli import run
from utils.data import make_synthetic

# A background job of a non-interactive shell starts with SIGINT ignored, and Python then installs
# no Ctrl-C handler; the interrupt test must not depend on how pytest was launched.
signal.signal(signal.SIGINT, signal.default_int_handler)

DATA = make_synthetic(n_train=400, n_test=100)
B.load_dataset = lambda name, data_dir=None, **kw: DATA

kill_at = int(os.environ.get("KILL_SELF_AT_FSYNC", "0"))
if kill_at:  # die (SIGKILL) inside the kill_at-th atomic write, after its data, before its rename
    real_fsync, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        real_fsync(fd)
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = fsync

spec = importlib.util.spec_from_file_location("stage1", {script!r})
stage1 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage1)
run(stage1.main, stage1.get_args_parser())
"""
EPOCHS = 4
CKPT_NAME = "resnet8_baseline.pt"


def driver_args(root, *extra):
    return ["--dataset", "synthetic", "--depth", "8", "--epochs", str(EPOCHS), "--val-size", "100",
            "--batch-size", "50", "--device", "cpu", "--seed", "0",
            "--checkpoint-dir", str(root / "ckpt"), "--results-dir", str(root / "results"), *extra]


def start_driver(driver, root, *extra, env=None):
    """Start the driver with stdout/stderr going to files in `root` (a pipe nobody reads while
    we poll could fill up and stall the process)."""
    root.mkdir(parents=True, exist_ok=True)
    tag = "resume" if "--resume" in extra else "run"
    with open(root / f"{tag}.out", "w") as out, open(root / f"{tag}.err", "w") as err:
        p = subprocess.Popen([sys.executable, str(driver), *driver_args(root, *extra)], cwd=REPO,
                             env={**SUBPROCESS_ENV, **(env or {})}, stdout=out, stderr=err)
    p.logs = (root / f"{tag}.out", root / f"{tag}.err")
    return p


def finish(p, timeout=300):
    p.wait(timeout=timeout)
    return {"rc": p.returncode, "stdout": p.logs[0].read_text(), "stderr": p.logs[1].read_text()}


def checkpoint_epoch(path):
    """Epoch of the checkpoint at `path`, or None while there is none. Must never fail to load:
    the writer replaces the file atomically."""
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def wait_for_epoch(procs_paths, timeout=300):
    """Poll checkpoints until each shows epoch >= 1; `act(proc)` is called on that process at
    once. procs_paths: list of (proc, checkpoint path, act)."""
    pending = list(procs_paths)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for item in list(pending):
            proc, path, act = item
            if proc.poll() is not None:
                pytest.fail(f"the training process ended (rc {proc.returncode}) before it could be "
                            f"interrupted:\n{proc.logs[1].read_text()[-3000:]}")
            epoch = checkpoint_epoch(path)
            if epoch is not None and epoch >= 1:
                act(proc)
                pending.remove(item)
        time.sleep(0.01)
    assert not pending, "no checkpoint of epoch >= 1 appeared in time"


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory):
    """Four runs of the same training, started together:
    straight: uninterrupted; killed: SIGKILL from outside once a checkpoint of epoch >= 1 exists,
    then --resume; midwrite: SIGKILLs itself inside the 2nd checkpoint write (after the data,
    before the rename), then --resume; ctrlc: SIGINT once a checkpoint of epoch >= 1 exists."""
    base = tmp_path_factory.mktemp("interrupt")
    driver = base / "stage1_driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO), script=str(REPO / "1_train_baseline.py")))
    roots = {k: base / k for k in ("straight", "killed", "midwrite", "ctrlc")}
    procs = {"straight": start_driver(driver, roots["straight"]),
             "killed": start_driver(driver, roots["killed"]),
             "midwrite": start_driver(driver, roots["midwrite"], env={"KILL_SELF_AT_FSYNC": "2"}),
             "ctrlc": start_driver(driver, roots["ctrlc"])}
    out = {"roots": roots, "driver": driver}
    resumed = {}
    try:
        wait_for_epoch([(procs["killed"], roots["killed"] / "ckpt" / CKPT_NAME, lambda p: p.kill()),
                        (procs["ctrlc"], roots["ctrlc"] / "ckpt" / CKPT_NAME,
                         lambda p: p.send_signal(signal.SIGINT))])
        for name, p in procs.items():
            out[name] = finish(p)
        for name in ("killed", "midwrite", "ctrlc"):
            ck = roots[name] / "ckpt"
            out[name]["tmp_after"] = tmp_files(ck)
            out[name]["ckpt_after"] = read_checkpoint(ck / CKPT_NAME)  # loads, or the test fails
            out[name]["results_after"] = (roots[name] / "results" / "01_baseline.json").exists()
        resumed = {k: start_driver(driver, roots[k], "--resume") for k in ("killed", "midwrite")}
        for name, p in resumed.items():
            out[name]["resume"] = finish(p)
    finally:
        for p in [*procs.values(), *resumed.values()]:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def final_checkpoint(root):
    return read_checkpoint(root / "ckpt" / CKPT_NAME)


def test_sigkill_then_resume_equals_uninterrupted(interrupted_runs):
    r = interrupted_runs
    assert r["straight"]["rc"] == 0, r["straight"]["stderr"][-3000:]
    assert r["killed"]["rc"] == -signal.SIGKILL
    ck = r["killed"]["ckpt_after"]
    assert 1 <= ck["epoch"] < EPOCHS and ck["finished"] is False
    assert not r["killed"]["results_after"]
    res = r["killed"]["resume"]
    assert res["rc"] == 0, res["stderr"][-3000:]
    assert "resuming" in res["stdout"] and f"after epoch {ck['epoch']}" in res["stdout"]
    a, b = final_checkpoint(r["roots"]["straight"]), final_checkpoint(r["roots"]["killed"])
    assert a["finished"] and b["finished"] and a["epoch"] == b["epoch"] == EPOCHS
    state_dicts_equal(a["model"], b["model"])
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    ja = json.loads((r["roots"]["straight"] / "results" / "01_baseline.json").read_text())
    jb = json.loads((r["roots"]["killed"] / "results" / "01_baseline.json").read_text())
    assert ja["test_acc"] == jb["test_acc"] and ja["val_acc"] == jb["val_acc"]
    # training moved the weights after the kill: the test compares something that changed
    assert not torch.equal(ck["model"]["linear.weight"], a["model"]["linear.weight"])


def test_sigkill_leaves_at_most_the_inflight_temp_file(interrupted_runs):
    """After a SIGKILL the checkpoint loads (checked when it was read) and at most one temp file
    of the atomic write is left, named as utils.io makes them (.<name>.*.tmp)."""
    left = interrupted_runs["killed"]["tmp_after"]
    assert len(left) <= 1
    assert all(re.fullmatch(rf"\.{re.escape(CKPT_NAME)}\..+\.tmp", n) for n in left)


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(interrupted_runs):
    """Killed inside the write of the epoch-2 checkpoint: epoch 1's checkpoint is intact, the
    in-flight temp file is the only leftover, and --resume still reaches the final weights."""
    r = interrupted_runs["midwrite"]
    assert r["rc"] == -signal.SIGKILL
    assert r["ckpt_after"]["epoch"] == 1 and r["ckpt_after"]["finished"] is False
    assert len(r["tmp_after"]) == 1 and r["tmp_after"][0].startswith(f".{CKPT_NAME}.")
    assert r["resume"]["rc"] == 0, r["resume"]["stderr"][-3000:]
    state_dicts_equal(final_checkpoint(interrupted_runs["roots"]["straight"])["model"],
                      final_checkpoint(interrupted_runs["roots"]["midwrite"])["model"])


def test_ctrl_c_exits_130_and_says_how_to_resume(interrupted_runs):
    r = interrupted_runs["ctrlc"]
    root = interrupted_runs["roots"]["ctrlc"]
    assert r["rc"] == 130, r["stderr"][-3000:]
    assert "--resume" in r["stderr"]
    # the hint names the folders of this run (results too: --results-dir is not restored on resume)
    hint = r["stderr"][r["stderr"].index("Resume with:"):]
    assert f"--checkpoint-dir {root / 'ckpt'}" in hint and f"--results-dir {root / 'results'}" in hint
    assert "Traceback" not in r["stderr"]
    assert r["tmp_after"] == []  # Ctrl-C during a write removes the temp file
    assert r["ckpt_after"]["finished"] is False and 1 <= r["ckpt_after"]["epoch"] < EPOCHS
    assert not r["results_after"]


def test_ctrl_c_during_final_evaluation_says_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C after the last epoch (in the final evaluation) also exits 130 with the --resume
    hint, and resuming then finishes the run without training again."""
    import utils.stages.train_baseline as B
    from utils.data import make_synthetic
    data = make_synthetic(n_train=200, n_test=50)
    monkeypatch.setattr(B, "load_dataset", lambda name, data_dir=None, **kw: data)
    real_evaluate = B.evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(B, "evaluate", interrupted)
    args = ["--dataset", "synthetic", "--depth", "8", "--epochs", "1", "--val-size", "50", "--batch-size", "50",
            "--eval-every", "0", "--device", "cpu", "--checkpoint-dir", tmp_path / "c", "--results-dir", tmp_path / "r"]
    code, _, err = run_stage("1_train_baseline.py", *args)
    assert code == 130 and "Traceback" not in err
    assert "final evaluation" in err and "--resume" in err and f"--results-dir {tmp_path / 'r'}" in err
    ck = read_checkpoint(tmp_path / "c" / "resnet8_baseline.pt")
    assert ck["epoch"] == 1 and ck["finished"] is False
    assert not (tmp_path / "r").exists()

    monkeypatch.setattr(B, "evaluate", real_evaluate)
    monkeypatch.setattr(B, "train_one_epoch", lambda *a, **k: pytest.fail("resume trained again"))
    code, out, err = run_stage("1_train_baseline.py", *args, "--resume")
    assert code == 0, err[-3000:]
    assert read_checkpoint(tmp_path / "c" / "resnet8_baseline.pt")["finished"] is True
    assert (tmp_path / "r" / "01_baseline.json").is_file()


def test_ctrl_c_in_stage2_writes_nothing(quick_stage1, tmp_path, monkeypatch):
    """Post-training stages: Ctrl-C -> exit 130, a message, and no results file."""
    import quant.evaluation

    def interrupt(self, config):
        raise KeyboardInterrupt
    monkeypatch.setattr(quant.evaluation.CachedEvaluator, "evaluate", interrupt)
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--bits", "2", "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"])
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- stale inputs

@pytest.fixture
def stage2_copy(quick_stage2, tmp_path):
    """A results folder holding a copy of the session's 02_per_layer.json, and stage-3 flags
    that point at the session's checkpoint. The search is the cheapest there is (pareto, one
    evaluation), for the runs that get through."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(quick_stage2["results"] / "02_per_layer.json", results / "02_per_layer.json")
    args = [*COMMON, "--bits", *BITS, "--results-dir", results, "--checkpoint", quick_stage2["checkpoint"],
            "--method", "pareto", "--pareto-verify", "1"]
    return results, args


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def test_stage3_refuses_02_of_another_checkpoint_unless_forced(stage2_copy):
    results, args = stage2_copy
    path = results / "02_per_layer.json"
    edit_json(path, lambda o: o["provenance"]["inputs"]["checkpoint"].update(sha256="0" * 64))
    code, _, err = run_stage("3_greedy_search.py", *args)
    assert_user_error(code, err, "different checkpoint", "2_per_layer_analysis.py", "--force")
    assert not (results / "03_search.json").exists()

    code, _, err = run_stage("3_greedy_search.py", *args, "--force")
    assert code == 0, err[-3000:]
    r = json.loads((results / "03_search.json").read_text())
    assert r["provenance"]["args"]["force"] is True and r["pareto"] is not None
    assert r["provenance"]["inputs"]["per_layer"]["sha256"] == sha256_file(path)


def test_stage3_refuses_old_schema(stage2_copy):
    results, args = stage2_copy
    edit_json(results / "02_per_layer.json", lambda o: o.update(schema_version=0))
    code, _, err = run_stage("3_greedy_search.py", *args)
    assert_user_error(code, err, "schema version 0", "2_per_layer_analysis.py")


@pytest.mark.parametrize("field,value", [("images", 300), ("indices_sha256", "0" * 64), ("content_sha256", "1" * 64),
                                         ("name", "test-search")])
def test_stage3_refuses_02_measured_on_other_data(stage2_copy, field, value):
    """02 measured on other search images (another count, other indices, other pixels, another split)."""
    results, args = stage2_copy
    edit_json(results / "02_per_layer.json", lambda o: o["dataset"]["search"].update({field: value}))
    code, _, err = run_stage("3_greedy_search.py", *args)
    assert_user_error(code, err, "other data", field, "2_per_layer_analysis.py", "--force")
    assert not (results / "03_search.json").exists()


def test_stage3_notes_other_baseline_and_uses_its_own(stage2_copy):
    """Same data, another recorded float accuracy: a note, and the search runs on the measured one."""
    results, args = stage2_copy
    path = results / "02_per_layer.json"
    measured = json.loads(path.read_text())["baseline_val_acc"]
    edit_json(path, lambda o: o.update(baseline_val_acc=measured - 3.0))
    code, out, err = run_stage("3_greedy_search.py", *args)
    assert code == 0, err[-3000:]
    assert "note: the float model scores" in out
    assert json.loads((results / "03_search.json").read_text())["baseline_val_acc"] == measured


def test_stage3_without_02_names_stage2(quick_stage1, tmp_path):
    code, _, err = run_stage("3_greedy_search.py", *COMMON, "--bits", *BITS, "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"])
    assert_user_error(code, err, "02_per_layer.json", "does not exist", "2_per_layer_analysis.py")


def test_stage4_without_03_names_stage3(quick_stage1, tmp_path):
    code, _, err = run_stage("4_create_baselines.py", *COMMON, "--bits", *BITS, "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"])
    assert_user_error(code, err, "03_search.json", "3_greedy_search.py")


def test_stage4_refuses_03_of_another_checkpoint(quick_stage1, tmp_path):
    atomic_write_json(tmp_path / "03_search.json", {
        "stage": "3", "schema_version": SCHEMA_VERSION, "quantization": {"granularity": "channel", "clip": "mse"},
        "greedy": None, "pareto": None, "provenance": {"inputs": {"checkpoint": {"sha256": "0" * 64}}}})
    code, _, err = run_stage("4_create_baselines.py", *COMMON, "--bits", *BITS, "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"])
    assert_user_error(code, err, "different checkpoint", "3_greedy_search.py")


def test_unfinished_checkpoint_refused(quick_stage1, tmp_path):
    ck = read_checkpoint(quick_stage1["checkpoint"])
    ck.update(finished=False, epoch=0)
    torch.save(ck, tmp_path / "unfinished.pt")
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--results-dir", tmp_path,
                             "--checkpoint", tmp_path / "unfinished.pt")
    assert_user_error(code, err, "--resume", "--force")


# ---------------------------------------------------------------- bad input

def test_missing_checkpoint(tmp_path):
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--results-dir", tmp_path,
                             "--checkpoint", tmp_path / "nope.pt")
    assert_user_error(code, err, "nope.pt", "does not exist", "1_train_baseline.py")
    code, _, err = run_stage("1_train_baseline.py", "--resume", "--device", "cpu",
                             "--checkpoint-dir", tmp_path, "--results-dir", tmp_path)
    assert_user_error(code, err, "does not exist")


def test_truncated_checkpoint(quick_stage1, tmp_path):
    data = quick_stage1["checkpoint"].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--results-dir", tmp_path, "--checkpoint", bad)
    assert_user_error(code, err, "could not be loaded", "truncated")
    code, _, err = run_stage("1_train_baseline.py", "--resume", "--device", "cpu", "--checkpoint", bad,
                             "--results-dir", tmp_path)
    assert_user_error(code, err, "could not be loaded")


def test_checkpoint_of_another_architecture(quick_stage1, tmp_path):
    # Our shortcut-B checkpoint with flags that say otherwise: the checkpoint says what it is.
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"], "--shortcut", "A")
    assert_user_error(code, err, "resnet20 (shortcut B)", "--shortcut A", "Drop those flags")
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"], "--depth", "56")
    assert_user_error(code, err, "--arch resnet56")
    # A raw ResNet-32 state_dict (no model_args: read as the default ResNet-20 B): the message names resnet32.
    torch.save(CifarResNet(32, "B").state_dict(), tmp_path / "resnet32.pt")
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--results-dir", tmp_path,
                             "--checkpoint", tmp_path / "resnet32.pt")
    assert_user_error(code, err, "does not fit", "unexpected keys", "layer1.3", "--arch resnet32 --shortcut B")
    assert not (tmp_path / "02_per_layer.json").exists()


@pytest.mark.parametrize("flags,needle", [(["--arch", "mobilenetv2", "--shortcut", "A"], "ResNets only"),
                                          (["--arch", "resnet56", "--depth", "20"], "conflicts"),
                                          (["--depth", "21"], "6n+2")])
def test_arch_flag_errors(tmp_path, flags, needle):
    """--shortcut for a non-ResNet, --depth against --arch, a depth that is not registered: one paragraph each."""
    code, _, err = run_stage("1_train_baseline.py", "--dataset", "synthetic", "--device", "cpu",
                             "--results-dir", tmp_path / "r", "--checkpoint-dir", tmp_path / "c", *flags)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "c").exists()


def test_unknown_layer_in_a_configuration_is_refused(stage2_copy, quick_stage2):
    """A configuration naming a layer the model lacks (a typo) is an error, never silently float."""
    results, args = stage2_copy
    code, _, err = run_stage("3_greedy_search.py", *args)
    assert code == 0, err[-3000:]
    path = results / "03_search.json"
    edit_json(path, lambda o: o["pareto"]["config"].update({"layer1.0.cnov1": 2}))
    code, _, err = run_stage("4_create_baselines.py", *COMMON, "--results-dir", results,
                             "--checkpoint", quick_stage2["checkpoint"])
    assert_user_error(code, err, "layer1.0.cnov1", "does not have")
    assert not (results / "04_baselines.json").exists()


def test_stage3_takes_its_widths_from_stage2(quick_stage1, tmp_path):
    """Stage 2 with --bits 8 4 3 and a plain stage 3 (no --bits): it searches 8 4 3, not the default ladder;
    asking stage 3 for a width stage 2 did not measure names the command to run."""
    args = (*COMMON, "--results-dir", tmp_path, "--checkpoint", quick_stage1["checkpoint"])
    assert run_stage("2_per_layer_analysis.py", *args, "--bits", "8", "4", "3")[0] == 0
    code, _, err = run_stage("3_greedy_search.py", *args, "--method", "pareto", "--pareto-verify", "1")
    assert code == 0, err[-3000:]
    assert json.loads((tmp_path / "03_search.json").read_text())["bits"] == [8, 4, 3]
    code, _, err = run_stage("3_greedy_search.py", *args, "--bits", "2")
    assert_user_error(code, err, "no measurements", "--bits 2")


@pytest.mark.parametrize("stage,name,producer", [
    ("3_greedy_search.py", "02_per_layer.json", "2_per_layer_analysis.py"),
    ("4_create_baselines.py", "03_search.json", "3_greedy_search.py"),
])
@pytest.mark.parametrize("garbage", [b'{"stage": "2", "layers": [', b"\x00\xff garbage", b"[1, 2, 3]"])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_malformed_results_json(quick_stage1, tmp_path, stage, name, producer, garbage, force):
    """Malformed input is refused with a message, --force or not (--force only waives schema/checkpoint checks)."""
    (tmp_path / name).write_bytes(garbage)
    code, _, err = run_stage(stage, *COMMON, "--bits", *BITS, "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"], *force)
    assert_user_error(code, err, name, producer)


@pytest.mark.parametrize("stage", ["2_per_layer_analysis.py", "3_greedy_search.py", "4_create_baselines.py"])
@pytest.mark.parametrize("bits", [["9"], ["1"], ["8", "0"], ["16"]])
def test_out_of_range_bits(quick_stage1, tmp_path, stage, bits):
    code, _, err = run_stage(stage, *COMMON, "--bits", *bits, "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"])
    assert_user_error(code, err, "--bits", "2-8")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags,needle", [
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--val-size", "-5"], "--val-size"),
    (["--momentum", "1.5"], "--momentum"),
    (["--val-size", "10000"], "--val-size 10000"),      # = the whole synthetic training set
    (["--val-size", "50000"], "--val-size 50000"),
])
def test_stage1_out_of_range_flags(tmp_path, flags, needle):
    code, _, err = run_stage("1_train_baseline.py", "--dataset", "synthetic", "--device", "cpu",
                             "--results-dir", tmp_path / "r", "--checkpoint-dir", tmp_path / "c", *flags)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_post_training_val_size_larger_than_training_set(quick_stage1, tmp_path):
    code, _, err = run_stage("2_per_layer_analysis.py", *COMMON, "--val-size", "20000", "--results-dir", tmp_path,
                             "--checkpoint", quick_stage1["checkpoint"])
    assert_user_error(code, err, "--val-size 20000", "differs")


@pytest.mark.parametrize("flags,needle", [
    (["--max-drop", "-1"], "--max-drop"),
    (["--verify-top-k", "0"], "--verify-top-k"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
])
def test_stage3_out_of_range_flags(stage2_copy, flags, needle):
    results, args = stage2_copy
    code, _, err = run_stage("3_greedy_search.py", *args, *flags)
    assert_user_error(code, err, needle)
    assert not (results / "03_search.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("stage", ["1_train_baseline.py", "2_per_layer_analysis.py"])
def test_device_cuda_without_cuda(quick_stage1, tmp_path, stage):
    extra = ["--dataset", "synthetic"] if stage.startswith("1") else ["--checkpoint", quick_stage1["checkpoint"]]
    code, _, err = run_stage(stage, "--device", "cuda", "--results-dir", tmp_path, "--checkpoint-dir", tmp_path,
                             *extra)
    assert_user_error(code, err, "--device cuda", "--device cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script,args,needles", [
    ("1_train_baseline.py", ["--epochs", "-1", "--device", "cuda"], ["--epochs"]),
    ("2_per_layer_analysis.py", ["--device", "cuda"], ["--device cuda"]),
    ("3_greedy_search.py", ["--max-drop", "-1"], ["--max-drop"]),
    ("4_create_baselines.py", ["--bits", "9"], ["--bits"]),
])
def test_real_scripts_answer_bad_input_with_a_message(tmp_path, script, args, needles):
    """The same, through the real entry points in a fresh process (stderr, exit status)."""
    p = run_script(script, *args, "--results-dir", tmp_path, "--checkpoint-dir", tmp_path, check=False)
    assert_user_error(p.returncode, p.stderr, *needles)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- full disk

def no_space(code):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("where", ["fsync", "write"])
def test_full_disk_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, code, where):
    path = tmp_path / "02_per_layer.json"
    atomic_write_json(path, {"old": True})
    old = path.read_bytes()
    if where == "fsync":
        monkeypatch.setattr(utils.io.os, "fsync", no_space(code))
        write = lambda: atomic_write_json(path, {"new": list(range(1000))})  # noqa: E731
    else:
        def partial_then_full(f):
            f.write(b'{"new": ')
            f.flush()
            raise OSError(code, os.strerror(code))
        write = lambda: utils.io._atomic_write(path, partial_then_full)  # noqa: E731
    with pytest.raises(UserError) as e:
        write()
    msg = str(e.value)
    assert os.strerror(code) in msg and "intact" in msg and str(path) in msg
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["02_per_layer.json"]


def test_full_disk_on_checkpoint_and_new_file(tmp_path, monkeypatch):
    """No earlier file: nothing at all is left; torch.save goes through the same path."""
    monkeypatch.setattr(utils.io.os, "fsync", no_space(errno.ENOSPC))
    with pytest.raises(UserError, match="No space left"):
        atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "ckpt" / "model.pt")
    with pytest.raises(UserError):
        atomic_write_text(tmp_path / "summary.md", "x")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_other_write_errors_still_raise(tmp_path, monkeypatch):
    """Errors that are not about space or permissions are bugs or hardware: not swallowed, and
    the temp file is still removed."""
    monkeypatch.setattr(utils.io.os, "fsync", no_space(errno.EIO))
    with pytest.raises(OSError):
        atomic_write_json(tmp_path / "x.json", {})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- determinism

TIMING_KEYS = {"seconds", "seconds_per_epoch", "train_seconds"}


def comparable(obj, root, drop_checkpoint_hash=False):
    """Results JSON with the run's folder replaced, timings and the commit id removed (other
    engineers' edits may dirty the work tree between the two runs)."""
    obj = json.loads(json.dumps(obj).replace(str(root), "<ROOT>"))

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in TIMING_KEYS}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o
    obj = strip(obj)
    obj["provenance"].pop("git_commit")
    if drop_checkpoint_hash:  # the checkpoint file holds the per-epoch timings too
        obj["provenance"]["inputs"]["checkpoint"].pop("sha256")
    return obj


def test_stage1_is_deterministic(quick_stage1, tmp_path_factory):
    s = quick_stage1
    root = tmp_path_factory.mktemp("determinism1")
    run_script("1_train_baseline.py", *s["stage1_args"], "--results-dir", root / "results",
               "--checkpoint-dir", root / "checkpoints")
    a = json.loads((s["results"] / "01_baseline.json").read_text())
    b = json.loads((root / "results" / "01_baseline.json").read_text())
    assert a["train_seconds"] > 0 and b["train_seconds"] > 0
    assert comparable(a, s["root"], True) == comparable(b, root, True)
    ca, cb = read_checkpoint(s["checkpoint"]), read_checkpoint(root / "checkpoints" / "resnet20_baseline.pt")
    state_dicts_equal(ca["model"], cb["model"])
    for pid, st in ca["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], cb["optimizer"]["state"][pid]["momentum_buffer"])


def test_stage2_is_deterministic(quick_stage2, tmp_path_factory):
    """Stage 2 twice from the same checkpoint (a copy of the same bytes): the same 02 JSON."""
    s = quick_stage2
    root = tmp_path_factory.mktemp("determinism2")
    (root / "checkpoints").mkdir()
    shutil.copy(s["checkpoint"], root / "checkpoints" / s["checkpoint"].name)
    run_script("2_per_layer_analysis.py", *s["stage2_args"], "--results-dir", root / "results",
               "--checkpoint-dir", root / "checkpoints")
    a = json.loads((s["results"] / "02_per_layer.json").read_text())
    b = json.loads((root / "results" / "02_per_layer.json").read_text())
    assert comparable(a, s["root"]) == comparable(b, root)
    assert a["layers"] == b["layers"] and a["baseline_val_acc"] == b["baseline_val_acc"]
