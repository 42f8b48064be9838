"""What is checked, and when (README), on the trainer's side (issue 11): every bad input is one line, exit code 2,
before the run directory exists; a run directory is locked; resume trusts the checkpoint, not an edited
config.yaml; a full disk, a torn metrics line and damaged checkpoint files are named."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import TINY
from test_train import demo as _demo

from conftest import ROOT
from largeloss.eval.rundir import RunDir, RunDirError
from largeloss.shards.format import IngestError
from largeloss.shards.ingest_state import STATE_DIR, OutputLock
from largeloss.train import checkpoint as ckpt
from largeloss.train.main import main as train_main

demo = _demo  # the demo dataset fixture of test_train.py


@pytest.fixture(scope="module")
def finished(demo, tmp_path_factory):
    """A finished 2-epoch LL-Cp run; tests work on copies."""
    out = tmp_path_factory.mktemp("finished")
    methods = ROOT / "configs" / "methods"
    assert train_main(["--config", str(ROOT / "configs/demo.yaml"), "--config", str(methods / "ll_cp.yaml"),
                       f"data={demo}", f"out={out}", "epochs=2", "run_name=run", *TINY]) == 0
    return out / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------- 3. bad values before the run directory

def _weights_files(tmp_path: Path) -> dict[str, Path]:
    import torch

    files = {"list": tmp_path / "list.pth", "other": tmp_path / "other.pth", "text": tmp_path / "text.pth"}
    torch.save([1, 2], files["list"])
    torch.save({"a": torch.zeros(2)}, files["other"])
    files["text"].write_text("not weights")
    return files


@pytest.mark.parametrize("args, message", [
    (["protocol=bogus"], "command line: unknown protocol 'bogus'; expected one of full, single_positive"),
    (["protocol=partial:2"], r"command line: protocol 'partial:2': fraction must be in \(0, 1\]"),
    (["arch=bogus"], r"command line: arch must be resnet18\|.*, got 'bogus'"),
    (["seed=-1"], "command line: seed must be >= 0, got -1"),
    (["num_workers=-1"], "command line: num_workers must be >= 0, got -1"),
    (["val_frac=0"], r"command line: val_frac must be in \(0, 1\), got 0.0"),
    (["val_frac=0.001"], "val_frac=0.001: leaves no validation samples of the 64 in split 'train'"),
    (["train_split=nosuch"], "train_split='nosuch': .*manifest.json has no such split; choose one of train, test"),
    (["arch=resnet18", "weights={list}"], "list.pth: expected a state dict, found list"),
    (["arch=resnet18", "weights={other}"], r"other.pth: does not match resnet18 \(missing \['conv1.weight'"),
    (["arch=resnet18", "weights={text}"], "text.pth: not a PyTorch weights file that loads with weights_only=True"),
    (["epochs=--5"], "command line: epochs must be an integer, got '--5'"),
    (["epochs=²"], "command line: epochs must be an integer, got '²'"),
    (["--config", "{latin1}"], r"latin1.yaml:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"),
])
def test_bad_input_is_one_line_and_leaves_no_run_directory(demo, tmp_path, capsys, args, message):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"epochs: 1\nrun_name: caf\xe9\n")
    paths = {k: str(v) for k, v in _weights_files(tmp_path).items()} | {"latin1": str(latin1)}
    runs = tmp_path / "runs"
    # the dataset's own arch/weights are overridden by TINY, then by the case's
    argv = [f"data={demo}", f"out={runs}", "epochs=1", "max_steps_per_epoch=1", *TINY]
    argv = [a for a in argv if a.split("=")[0] not in {x.split("=")[0] for x in args}]
    assert train_main(argv + [a.format(**paths) for a in args]) == 2
    import re

    err = one_line(capsys.readouterr().err)
    assert re.search(message, err), err
    assert not runs.exists()  # nothing written: the corrected command is not refused as "already holds a run"


# ------------------------------------------------------------------------------------- 5. the run directory lock

def test_a_run_directory_in_use_is_refused_naming_the_holder(run_copy, demo, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from largeloss.eval.rundir import RunDir; "
         f"lock = RunDir({str(run_copy)!r}).lock(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        metrics = run_copy.joinpath("metrics.jsonl").read_bytes()
        expected = (f"error: {run_copy}: in use by another training (pid {holder.pid}, lock {run_copy / '.lock'}); "
                    "wait for it to finish, or pass another run_name/out\n")
        assert train_main([f"resume={run_copy}"]) == 2
        assert capsys.readouterr().err == expected
        # a new run into the same directory: the same refusal
        assert train_main([f"data={demo}", f"out={run_copy.parent}", "run_name=run", "epochs=1", *TINY]) == 2
        assert capsys.readouterr().err == expected
        assert run_copy.joinpath("metrics.jsonl").read_bytes() == metrics  # nothing touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder is gone: its lock went with it (the .lock file stays, and locks at once)
    assert train_main([f"resume={run_copy}"]) == 0


def test_resume_lock_check_is_rank_0s(run_copy, monkeypatch):
    # Every rank of a multi-process resume parses the run's config; rank 0 then locks the directory for the
    # run. A slower rank that tested the lock after that was refused "in use" (seen as a flaky 2-process
    # resume under load): only the launch's rank 0 (RANK) tests it
    from largeloss.train.config import resume_config

    lock = RunDir(run_copy).lock()  # rank 0, already running
    try:
        monkeypatch.setenv("RANK", "1")
        assert resume_config(str(run_copy), []).resume == str(run_copy)
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunDirError, match="in use by another training"):
            resume_config(str(run_copy), [])
    finally:
        lock.close()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    # a loader worker forked while the run holds the lock must not hold it after the run is gone
    lock = RunDir(tmp_path).lock()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: lives on after its parent released (or lost) the lock
        import time

        os.write(ready_w, b"1")  # the fork handlers (which close the child's copy) have run by now
        time.sleep(20)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        lock.close()
        RunDir(tmp_path).lock().close()  # would raise "in use by another training" if the child held a copy
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_two_ingests_into_one_folder_name_the_holder(tmp_path):
    (tmp_path / STATE_DIR).mkdir()
    first = OutputLock(tmp_path)
    try:
        with pytest.raises(IngestError, match=rf"another ingest \(pid {os.getpid()}\) is writing to {tmp_path}"):
            OutputLock(tmp_path)
    finally:
        first.release()
    OutputLock(tmp_path).release()


# ------------------------------------------------------------------------- 7. resume: the checkpoint's config

def _edit_config(run: Path, **changes) -> None:
    cfg = yaml.safe_load(run.joinpath("config.yaml").read_text())
    cfg.update(changes)
    run.joinpath("config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.parametrize("changes, message", [
    ({"method": "ll_ct"}, "in method: 'll_ct' in config.yaml, 'll_cp' in the checkpoint; restore config.yaml"),
    ({"lr": 0.5, "epochs": 4}, r"in lr: 0.5 in config.yaml, 0.003 in the checkpoint; epochs: 4 in config.yaml, 2 in"),
    ({"lr": -5}, r"config.yaml:\d+: lr must be in \(0, inf\), got -5.0"),
])
def test_resume_refuses_an_edited_config(run_copy, capsys, changes, message):
    import re

    _edit_config(run_copy, **changes)
    result = run_copy.joinpath("result.json").read_bytes()
    assert train_main([f"resume={run_copy}"]) == 2
    err = one_line(capsys.readouterr().err)
    assert re.search(message, err), err
    assert run_copy.joinpath("result.json").read_bytes() == result


def test_resume_may_change_the_runtime_keys(run_copy, capsys):
    _edit_config(run_copy, progress=True, log_every=5)  # as a previous resume with these overrides writes it
    assert train_main([f"resume={run_copy}", "num_workers=0", "progress=false"]) == 0
    assert json.loads(run_copy.joinpath("result.json").read_text())["method"] == "ll_cp"


# ---------------------------------------------------------- 9. full disk, torn metrics line, damaged checkpoint

@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous(demo, tmp_path, monkeypatch, capsys,
                                                                             failure):
    from accelerate import Accelerator

    real_save_state = Accelerator.save_state
    calls = []

    def save_state(self, output_dir, **kw):
        calls.append(output_dir)
        if len(calls) < 2:
            return real_save_state(self, output_dir, **kw)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        Path(output_dir, "optimizer.bin").write_bytes(b"partial")
        if failure == "torch":  # what torch.save raises on a full disk: no errno, no file name
            raise RuntimeError("[enforce fail at inline_container.cc:626] . basic_ios::clear: iostream error")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 0)
    argv = ["--config", str(ROOT / "configs/demo.yaml"), f"data={demo}", f"out={tmp_path}", "epochs=2", "run_name=r",
            *TINY]
    assert train_main(argv) == 2
    run = RunDir(tmp_path / "r")
    partial = run.checkpoints / ".tmp-epoch-0002" / "optimizer.bin"
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {partial}: writing the checkpoint failed: No space left on device"), err
    assert err.endswith("the previous checkpoint is kept: free space, then resume the run\n")
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["LATEST", "best", "epoch-0001"]
    assert ckpt.latest_checkpoint(run) == run.epoch_checkpoint(1)  # verified against its checksums
    monkeypatch.undo()
    assert train_main([f"resume={run.path}"]) == 0
    assert [json.loads(line)["epoch"] for line in run.metrics.read_text().splitlines()] == [1, 2]


def test_a_torn_last_metrics_line_is_dropped_on_resume(run_copy, capsys):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a kill or a full disk in the middle of the append
    assert train_main([f"resume={run_copy}"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {run_copy / 'metrics.jsonl'}: metrics.jsonl line 3 truncated (skipped)" in out
    assert [json.loads(line)["epoch"] for line in (run_copy / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("damage, message", [
    ("delete epoch-0002/model.safetensors", "epoch-0002/model.safetensors: missing; the checkpoint is damaged"),
    ("flip epoch-0002/optimizer.bin", "epoch-0002/optimizer.bin: sha256 differs from .*epoch-0002/checksums.json"),
    ("flip epoch-0002/trainer_state.json", "epoch-0002/trainer_state.json: sha256 differs from"),
    ("flip epoch-0002/random_states_0.pkl", "epoch-0002/random_states_0.pkl: sha256 differs from"),
    ("add epoch-0002/extra.bin", "epoch-0002/extra.bin: not listed in"),
    ("flip epoch-0002/checksums.json", "random_states_0.pkl: not listed in .*epoch-0002/checksums.json"),  # a key
    ("write LATEST", "LATEST: expected the name of a checkpoint such as epoch-0003"),
    ("flip best/model.safetensors", "best/model.safetensors: sha256 differs from"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(run_copy, capsys, damage, message):
    import re

    action, name = damage.split()
    path = run_copy / "checkpoints" / name
    if action == "delete":
        path.unlink()
    elif action == "add":
        path.write_bytes(b"x")
    elif action == "write":
        path.write_text("../../../etc")
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    assert train_main([f"resume={run_copy}"]) == 2
    err = one_line(capsys.readouterr().err)
    assert re.search(message, err), err
