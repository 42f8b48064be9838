"""End to end on CPU: ingest demo -> train/main.py -> report, exact resume after kill -9, and 2 processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from largeloss.ingest.cli import main as ingest_main
from largeloss.train.main import main as train_main

# a tiny, fast setting: 64 training images (-> 51 train / 13 val), 24 test images, 64 px (small_cnn ends at
# 2x2, so batch norm also works on the size-1 batch a rank may end an epoch with)
TINY = ["arch=small_cnn", "weights=none", "image_size=64", "batch_size=8", "eval_batch_size=16", "num_workers=0",
        "progress=false", "lr=3e-3", "head_lr_mult=1", "early_stop_drop=100"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "data"
    assert ingest_main(["demo", "--out", str(d), "--n-train", "64", "--n-test", "24", "--no-progress"]) == 0
    return d


def run_cmd(args, env_extra=None, timeout=300):
    # PYTHONPATH as conftest.py sets it (the link that makes this checkout the package largeloss): with the
    # checkout's own path, `-m largeloss...` would import whatever copy of largeloss is installed
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "largeloss.train.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_in_process_ll_cp_run_and_report(demo, tmp_path, capsys):
    rc = train_main(["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
                     f"data={demo}", f"out={tmp_path}", "epochs=3", *TINY])
    assert rc == 0
    run = tmp_path / "demo-ll_cp-s0"
    res = json.loads((run / "result.json").read_text())
    assert res["method"] == "ll_cp" and res["dataset"] == "demo" and res["world_size"] == 1
    assert 1 <= res["best_epoch"] <= 3 and 0.0 < res["test_map"] <= 1.0
    m = read_metrics(run)
    assert [r["epoch"] for r in m] == [1, 2, 3]
    # LL-Cp (delta_rel 0.5 in configs/demo.yaml): nothing in epoch 1; from epoch 2 k = ceil(B*K*0.5 %) per batch
    # = ceil(8*10*5/1000) = ceil(0.4) = 1 per batch of 8 (the last batch of 51 = 6x8 + 3 still gives
    # ceil(3*10*5/1000) = 1): 7 batches -> 7 per epoch
    assert [r["modified"] for r in m] == [0, 7, 7]
    assert [r["images"] for r in m] == [51, 51, 51]
    # corrections of epoch t are in generation t and used from epoch t+1
    assert [r["label_generation"] for r in m] == [1, 2, 3]
    from largeloss.shards.labelstore import LabelStore

    store = LabelStore(demo / "train" / "labels.arrow", 10, "single_positive", corrections_dir=run / "labels")
    store.use_generation(3)
    assert store.num_corrections == 14
    capsys.readouterr()
    from largeloss.eval.report import main as report_main

    assert report_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "LL-Cp" in out and f"{100 * res['test_map']:.1f}" in out


def test_existing_run_dir_is_not_overwritten(demo, tmp_path, capsys):
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"data={demo}", f"out={tmp_path}", "epochs=1",
            "run_name=x", *TINY]
    assert train_main(args) == 0
    assert train_main(args) == 2
    assert "resume=" in capsys.readouterr().err


def _compare_runs(a: Path, b: Path):
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert ra["test_map"] == rb["test_map"]
    assert ra["best_epoch"] == rb["best_epoch"]
    assert ra["test_per_class_ap"] == rb["test_per_class_ap"]
    ma, mb = read_metrics(a), read_metrics(b)
    assert [(r["epoch"], r["val_map"], r["train_loss"], r["modified"]) for r in ma] == \
           [(r["epoch"], r["val_map"], r["train_loss"], r["modified"]) for r in mb]
    ga = sorted((a / "labels").glob("gen-*"))
    gb = sorted((b / "labels").glob("gen-*"))
    assert [g.name for g in ga] == [g.name for g in gb]
    for x, y in zip(ga, gb):
        for f in sorted(x.iterdir()):
            assert f.read_bytes() == (y / f.name).read_bytes(), f


@pytest.mark.parametrize("kill_at", ["step:2:3", "merge:2", "checkpoint:2"])
def test_resume_after_kill_is_exact(demo, tmp_path, kill_at):
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=3", *TINY]
    ok = run_cmd(base + ["run_name=straight"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    killed = run_cmd(base + ["run_name=killed"], {"LARGELOSS_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "result.json").exists()
    resumed = run_cmd([f"resume={tmp_path / 'killed'}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout
    _compare_runs(tmp_path / "straight", tmp_path / "killed")


def _accelerate_cmd(nproc, args, machines=None):
    machines = machines or ("--num_machines", "1", "--main_process_port", str(29500 + os.getpid() % 1000))
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            *machines, "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train" / "main.py"), *args]


def _env(env_extra=None):
    return dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", **(env_extra or {}))


def _run_accelerate(args, env_extra=None):
    return subprocess.run(_accelerate_cmd(2, args), cwd=ROOT, env=_env(env_extra), capture_output=True, text=True,
                          timeout=600)


def test_two_processes_ll_cp(demo, tmp_path):
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=2", "debug_dump=true", *TINY]
    p = _run_accelerate(base + ["run_name=two"])
    assert p.returncode == 0, p.stderr[-3000:]
    _check_two_ranks_ll_cp(demo, tmp_path / "two")


def _check_two_ranks_ll_cp(demo, run):
    """The checks of a 2-rank LL-Cp run of 2 epochs with debug_dump=true."""
    res = json.loads((run / "result.json").read_text())
    assert res["world_size"] == 2  # `--cpu --num_processes 2` would silently run one process
    from largeloss.shards.protocols import train_val_split

    train_ids, _ = train_val_split(64, 0.2, 1200)
    for epoch in (1, 2):
        d0, d1 = (np.load(run / "debug" / f"e{epoch:04d}-r{r}.npz") for r in (0, 1))
        both = np.concatenate([d0["ids"], d1["ids"]])
        # every training sample exactly once per epoch across the two ranks
        assert np.array_equal(np.sort(both), train_ids)
        # DDP keeps the replicas identical
        assert np.array_equal(d0["weights"], d1["weights"])
    # corrections from both ranks are merged: per rank and epoch, one per batch (ceil(8*10*5/1000) = 1);
    # 51 samples -> ranks of 26 and 25 -> 4 batches each -> 8 corrections in epoch 2, none in epoch 1
    m = read_metrics(run)
    assert [r["modified"] for r in m] == [0, 8]
    from largeloss.shards.labelstore import LabelStore

    store = LabelStore(demo / "train" / "labels.arrow", 10, "single_positive", corrections_dir=run / "labels")
    store.use_generation(2)
    assert store.num_corrections == 8
    # every correction a rank proposed (its debug dump) is in the merged generation, exactly once
    proposed = np.concatenate([np.load(run / "debug" / f"e0002-r{r}.npz")["corrections"] for r in (0, 1)])
    merged = np.stack(store.corrections_for_analysis(), axis=1)
    assert sorted(map(tuple, proposed.tolist())) == sorted(map(tuple, merged.tolist()))
    # only rank 0 writes run files (besides the per-rank debug dumps asked for here)
    names = sorted(p.name for p in run.iterdir())
    assert names == [".lock", "checkpoints", "config.yaml", "debug", "labels", "metrics.jsonl", "result.json"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_of_one_process_ll_cp(demo, tmp_path):
    """Multi-node (README: Multi-node): two `accelerate launch --num_machines 2 --machine_rank R` on this host,
    one process each, meet at 127.0.0.1; the same checks as the 2-process run on one machine."""
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=2", "debug_dump=true", "run_name=nodes", *TINY]
    port = _free_port()
    procs = [subprocess.Popen(_accelerate_cmd(2, base, ("--num_machines", "2", "--machine_rank", str(r),
                                                        "--main_process_ip", "127.0.0.1",
                                                        "--main_process_port", str(port))),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0]  # machine 0 holds the main process, which logs
    _check_two_ranks_ll_cp(demo, tmp_path / "nodes")


def test_two_processes_resume_after_kill(demo, tmp_path):
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=3", *TINY]
    ok = _run_accelerate(base + ["run_name=straight"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    killed = _run_accelerate(base + ["run_name=killed"], {"LARGELOSS_KILL_AT": "step:2:2"})
    assert killed.returncode != 0
    resumed = _run_accelerate([f"resume={tmp_path / 'killed'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _compare_runs(tmp_path / "straight", tmp_path / "killed")


def test_a_write_failing_on_rank_0_alone_stops_every_rank(demo, tmp_path):
    # A full disk while rank 0 alone writes the checkpoint's trainer_state.json (LARGELOSS_FAIL_AT raises ENOSPC
    # there): rank 1 then failed in the next collective (gloo: a "Connection closed by peer" traceback; NCCL: a wait
    # for its timeout). Now every rank stops with one line, the previous
    # checkpoint stays, and the run resumes from it
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=2", "run_name=full", *TINY]
    failed = subprocess.run(_accelerate_cmd(2, base), cwd=ROOT, env=_env({"LARGELOSS_FAIL_AT": "checkpoint:2"}),
                            capture_output=True, text=True, timeout=300)  # a hang fails here, as TimeoutExpired
    assert failed.returncode != 0
    state = tmp_path / "full" / "checkpoints" / ".tmp-epoch-0002" / "trainer_state.json"
    for rank_line in (f"error: {state}: writing the checkpoint failed: No space left on device",
                      "(reported by another process)"):  # rank 0's own line, and rank 1's naming it
        assert rank_line in failed.stderr, failed.stderr[-3000:]
    run = tmp_path / "full"
    assert (run / "checkpoints" / "LATEST").read_text().strip().strip('"') == "epoch-0001"
    assert not (run / "checkpoints" / ".tmp-epoch-0002").exists()
    resumed = _run_accelerate([f"resume={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]


def test_two_processes_global_topk(demo, tmp_path):
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_cp.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=2", "global_topk=true", *TINY]
    p = _run_accelerate(base + ["run_name=g"])
    assert p.returncode == 0, p.stderr[-3000:]
    # per step the top-k is taken over both ranks' batches: ranks of 26 and 25 samples give steps of
    # 8+8, 8+8, 8+8, 2+1 samples; k = ceil(16*10*0.5 %) = 1 and ceil(3*10*0.5 %) = 1 -> 4 per epoch in all
    # (the per-rank top-k of test_two_processes_ll_cp makes 8)
    assert [r["modified"] for r in read_metrics(tmp_path / "g")] == [0, 4]


# The follow-up methods of issue 14, each on two processes. The two with state of their own are also killed in
# epoch 2 and resumed: EM+APL labels after epoch 1 (apl_warmup=1), so its second epoch trains on the
# pseudo-labels that its checkpoint must restore; ROLE's estimates and their optimiser state are in the checkpoint.
# (The others keep no state beyond the model's: tests/test_features.py resumes each of them on one process.)
FOLLOW_UP = {"em": [], "em_apl": ["apl_warmup=1"], "gr_loss": [], "role": [], "partial_bce": ["protocol=partial:0.5"],
             "boostlu_ll_ct": ["delta_rel=2"]}


@pytest.mark.parametrize("method", list(FOLLOW_UP))
def test_follow_up_methods_on_two_processes(demo, tmp_path, method):
    base = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / f"configs/methods/{method}.yaml"),
            f"data={demo}", f"out={tmp_path}", "epochs=2", *TINY, *FOLLOW_UP[method]]
    ok = _run_accelerate(base + ["run_name=straight", "debug_dump=true"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    res = json.loads((tmp_path / "straight" / "result.json").read_text())
    assert res["world_size"] == 2 and res["method"] == method
    for epoch in (1, 2):
        d0, d1 = (np.load(tmp_path / "straight" / "debug" / f"e{epoch:04d}-r{r}.npz") for r in (0, 1))
        assert np.array_equal(d0["weights"], d1["weights"])  # the replicas stay identical
        assert len(d0["ids"]) + len(d1["ids"]) == 51
    if method == "em_apl":
        assert "APL after epoch 1:" in ok.stdout
    if method not in ("em_apl", "role"):
        return
    killed = _run_accelerate(base + ["run_name=killed"], {"LARGELOSS_KILL_AT": "step:2:1"})
    assert killed.returncode != 0
    resumed = _run_accelerate([f"resume={tmp_path / 'killed'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    _compare_runs(tmp_path / "straight", tmp_path / "killed")


def test_analyses_on_the_demo(demo, tmp_path, capsys):
    """Issue 7 in the default run: memorisation tracker + precision of modification during an LL-Ct run,
    then the pointing game, and the report shows Table 1, Figure 4's data and Table 4."""
    rc = train_main(["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/methods/ll_ct.yaml"),
                     f"data={demo}", f"out={tmp_path}", "epochs=3", "analysis_entries=150", *TINY])
    assert rc == 0
    run = tmp_path / "demo-ll_ct-s0"
    for name in ("memorization.json", "table1.md", "memorization.png"):
        assert (run / "analysis" / name).is_file(), name
    m = read_metrics(run)
    # epoch 1 modifies nothing (no precision); from epoch 2 LL-Ct modifies entries whose truth is known
    assert m[0]["precision_modified"] is None
    assert all(0.0 <= r["precision_modified"] <= 1.0 for r in m[1:])
    from largeloss.train.pointing import main as pointing_main

    assert pointing_main([str(run), "--overlays", "2"]) == 0
    assert (run / "pointing.json").is_file() and len(list((run / "pointing").glob("*.png"))) == 2
    capsys.readouterr()
    from largeloss.eval.report import main as report_main

    assert report_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "Table 4" in out and "Figure 4" in out


def test_missing_weights_fail_before_the_run_directory(demo, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    rc = train_main(["--config", str(ROOT / "configs/demo.yaml"), f"data={demo}", f"out={tmp_path / 'runs'}",
                     "arch=resnet18", "weights=IMAGENET1K_V1", "progress=false"])
    assert rc == 2
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # a corrected re-run is not refused as "already holds a run"
    assert train_main(["--config", str(ROOT / "configs/demo.yaml"), f"data={tmp_path / 'nodata'}"]) == 2
    assert "manifest.json: not found" in capsys.readouterr().err
