"""train.sweep: the grid, run names, resumability, parallel runs and failures; the report's sweep table and plot
(Figure 5 / 6)."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from largeloss import configs
from largeloss.eval import report, tables
from largeloss.eval.rundir import find_runs
from largeloss.train import sweep
from largeloss.train.config import ConfigError
from largeloss.train.sweep import Job, parse_grid, plan_jobs


@pytest.fixture
def cfg_file(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text("data: data/none\nepochs: 2\ndelta_rel_table: {ll_r: 0.2, ll_ct: 0.2, ll_cp: 0.1}\n")
    return str(p)


def test_parse_grid():
    assert parse_grid(["delta_rel=0.1,0.2, 0.4", "train_fraction=1.0"]) == [
        ("delta_rel", ["0.1", "0.2", "0.4"]), ("train_fraction", ["1.0"])]
    for bad, msg in ((["delta_rel"], "expected KEY=V1"), (["a=1,,2"], "no empty value"), (["a=1", "a=2"], "twice"),
                     (["seed=1,2"], "--seeds"), (["a=1,1"], "repeated")):
        with pytest.raises(ValueError, match=msg):
            parse_grid(bad)


def test_plan_names_states_and_validation(cfg_file, tmp_path):
    out = tmp_path / "runs"
    grid = parse_grid(["delta_rel=0.1,0.4", "train_fraction=0.5"])
    jobs = plan_jobs([cfg_file], ["an", "full"], grid, [0, 1], ["lr=0.01"], out)
    # methods x delta_rel x train_fraction x seeds = 2 x 2 x 1 x 2
    assert [j.name for j in jobs[:4]] == [
        "an-delta_rel=0.1-train_fraction=0.5-s0", "an-delta_rel=0.1-train_fraction=0.5-s1",
        "an-delta_rel=0.4-train_fraction=0.5-s0", "an-delta_rel=0.4-train_fraction=0.5-s1"]
    assert len(jobs) == 8 and all(j.state == "new" for j in jobs)
    full = jobs[4]
    assert full.configs == [cfg_file, str(configs.method("full"))]
    cmd = full.command(None)
    assert cmd[:3] == [sys.executable, "-m", "largeloss.train.main"]
    assert cmd[3:] == ["--config", cfg_file, "--config", str(configs.method("full")), "lr=0.01",
                       "delta_rel=0.1", "train_fraction=0.5", "seed=0", f"out={out}",
                       "run_name=full-delta_rel=0.1-train_fraction=0.5-s0"]
    assert full.command("F")[:6] == [sys.executable, "-m", "largeloss.train.features", "train", "--features-dir", "F"]
    # finished and interrupted runs are found again
    (out / jobs[0].name).mkdir(parents=True)
    (out / jobs[0].name / "config.yaml").write_text("x: 1\n")
    (out / jobs[0].name / "result.json").write_text("{}")
    (out / jobs[1].name).mkdir()
    (out / jobs[1].name / "config.yaml").write_text("x: 1\n")
    again = plan_jobs([cfg_file], ["an", "full"], grid, [0, 1], ["lr=0.01"], out)
    assert [j.state for j in again[:3]] == ["done", "resume", "new"]
    assert again[1].command(None)[3:] == [f"resume={out / jobs[1].name}", "progress=false"]
    # a bad key or value fails before anything runs, as do keys the sweep owns
    with pytest.raises(ConfigError, match="unknown config key 'delta_rell'"):
        plan_jobs([cfg_file], [], parse_grid(["delta_rell=0.1"]), [0], [], out)
    with pytest.raises(ConfigError, match="must be a number"):
        plan_jobs([cfg_file], [], parse_grid(["lr=fast"]), [0], [], out)
    with pytest.raises(ValueError, match="also given as key=value"):
        plan_jobs([cfg_file], [], grid, [0], ["delta_rel=0.3"], out)
    with pytest.raises(ValueError, match="known methods: .*ll_ct"):
        plan_jobs([cfg_file], ["ll_xx"], grid, [0], [], out)


FAKE_TRAINER = r"""
import json, sys, pathlib, yaml
over = dict(a.split("=", 1) for a in sys.argv[1:])
run = pathlib.Path(over["out"]) / over["run_name"]
run.mkdir(parents=True, exist_ok=True)
seed, d = int(over["seed"]), float(over["delta_rel"])
(run / "config.yaml").write_text(yaml.safe_dump({"dataset": "toy", "method": "ll_ct", "seed": seed, "delta_rel": d}))
if d == 0.8 and seed == 1:
    sys.exit(3)
(run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_map": 0.5}) + "\n")
res = {"dataset": "toy", "method": "ll_ct", "seed": seed, "best_epoch": 1 + seed, "best_val_map": 0.5,
       "test_map": 0.5 + d / 10 + seed / 100, "map_convention": "exclude"}
(run / "result.json").write_text(json.dumps(res))
"""


def test_main_runs_in_parallel_resumes_and_reports(cfg_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)

    def command(self, features_dir):
        overrides = [o for o in self.overrides if o.split("=", 1)[0] in ("out", "run_name", "seed", "delta_rel")]
        return [sys.executable, str(script), *overrides]

    monkeypatch.setattr(Job, "command", command)
    argv = ["--config", cfg_file, "--methods", "ll_ct", "--grid", "delta_rel=0.2,0.8", "--seeds", "0", "1",
            "--out", str(out), "--jobs", "2"]
    assert sweep.main(argv) == 1  # delta_rel 0.8, seed 1 fails
    text = capsys.readouterr()
    assert "4 runs under" in text.out and "FAILED ll_ct-delta_rel=0.8-s1" in text.out
    assert "1 run(s) failed: ll_ct-delta_rel=0.8-s1" in text.err
    assert (out / "logs" / "ll_ct-delta_rel=0.2-s0.log").is_file()
    # the sweep table of the finished runs: test mAP 0.5 + d/10 + seed/100 -> d = 0.2: 52.0, 53.0 -> 52.5 ± 0.7
    assert "| LL-Ct | 52.5 ± 0.7 (2 seeds) | 58.0 |" in text.out
    assert "| LL-Ct: best epoch | 1.5 | 1.0 |" in text.out
    # re-running: three are done, the failed one has config.yaml only and is resumed (fails again here)
    assert sweep.main(argv + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("3 done, 1 to resume, 0 to start")
    assert sum(line.startswith("done") for line in lines) == 3


def toy_run(root, name, method, seed, value, test_map, best_epoch, key="delta_rel"):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"dataset": "coco2014", "method": method, "seed": seed, key: value}))
    (d / "result.json").write_text(json.dumps({"dataset": "coco2014", "method": method, "seed": seed,
                                               "best_epoch": best_epoch, "best_val_map": 0.5, "test_map": test_map,
                                               "map_convention": "exclude"}))


def test_sweep_table_and_plot(tmp_path, capsys):
    # LL-Ct against delta_rel: at 0.1 seeds 0/1/2 give 70.0, 71.0, 72.0 -> 71.0 ± 1.0, best epochs 4, 5, 6 -> 5.0;
    # at 0.4 one seed, 69.5. Naive AN only at 0.2 (values sort numerically: 0.1 < 0.2 < 0.4 < 1.0 < 10)
    for s, m in enumerate((0.70, 0.71, 0.72)):
        toy_run(tmp_path, f"ct01-{s}", "ll_ct", s, 0.1, m, 4 + s)
    toy_run(tmp_path, "ct04", "ll_ct", 0, 0.4, 0.695, 2)
    toy_run(tmp_path, "ct10", "ll_ct", 0, 10, 0.60, 1)
    toy_run(tmp_path, "an02", "an", 0, 0.2, 0.65, 3)
    runs = find_runs([tmp_path])
    t = tables.sweep_table(runs, "delta_rel")
    assert t.header == ["Method", "delta_rel=0.1", "delta_rel=0.2", "delta_rel=0.4", "delta_rel=10"]
    assert t.rows == [["Naive AN", "", "65.0", "", ""], ["Naive AN: best epoch", "", "3.0", "", ""],
                      ["LL-Ct", "71.0 ± 1.0 (3 seeds)", "", "69.5", "60.0"],
                      ["LL-Ct: best epoch", "5.0", "", "2.0", "1.0"]]
    assert report.main([str(tmp_path), "--sweep", "delta_rel", "--plot-sweep", str(tmp_path / "f5.png")]) == 0
    assert "### Test mAP against delta_rel (paper Figure 5 / 6)" in capsys.readouterr().out
    assert (tmp_path / "f5.png").stat().st_size > 10_000
    # two runs of one seed in one cell (another key varies): refused, naming --by
    toy_run(tmp_path, "ct01-dup", "ll_ct", 0, 0.1, 0.7, 4)
    with pytest.raises(tables.ReportError, match="--by KEY"):
        tables.sweep_table(find_runs([tmp_path]), "delta_rel")
    with pytest.raises(tables.ReportError, match="has no key 'lr'"):
        tables.sweep_table(runs, "lr")


def test_two_sweep_keys_split_each_other(tmp_path, capsys):
    # a 2 x 2 grid (delta_rel x train_fraction), one seed: each sweep table splits its rows by the other key
    for d in (0.1, 0.2):
        for f in (0.5, 1.0):
            d_dir = tmp_path / f"ct-{d}-{f}"
            d_dir.mkdir()
            (d_dir / "config.yaml").write_text(yaml.safe_dump({"dataset": "coco2014", "method": "ll_ct", "seed": 0,
                                                                "delta_rel": d, "train_fraction": f}))
            (d_dir / "result.json").write_text(json.dumps({
                "dataset": "coco2014", "method": "ll_ct", "seed": 0, "best_epoch": 3, "best_val_map": 0.5,
                "test_map": 0.6 + d / 10 + f / 100, "map_convention": "exclude"}))
    assert report.main([str(tmp_path), "--sweep", "delta_rel", "--sweep", "train_fraction"]) == 0
    out = capsys.readouterr().out
    # 0.6 + 0.01 + 0.005 = 61.5 and 0.6 + 0.02 + 0.005 = 62.5 at train_fraction 0.5
    assert "| LL-Ct (train_fraction=0.5) | 61.5 | 62.5 |" in out
    assert "| LL-Ct (delta_rel=0.1) | 61.5 | 62.0 |" in out
