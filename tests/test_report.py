"""eval.report: run directories -> the paper's Table 2 / Table 3 layouts, CSV, JSON and the plot."""

import csv
import json

import pytest
import yaml

from largeloss.eval import tables
from largeloss.eval.report import main
from largeloss.eval.rundir import RunDirError, find_runs


def make_run(root, name, dataset, method, seed, test_map=None, best_epoch=2, val_maps=(0.5, 0.6, 0.55),
             protocol="single_positive", groups=None, convention="exclude", excluded=(), extra_config=None,
             truncated_tail=False):
    """A run directory as the trainer writes it; ``test_map=None`` leaves out result.json."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"dataset": dataset, "method": method, "seed": seed, "protocol": protocol, "lr": 1e-5}
    cfg.update(extra_config or {})
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [json.dumps({"epoch": i + 1, "train_loss": 0.1, "val_map": v, "time_s": 1.0})
             for i, v in enumerate(val_maps)]
    if truncated_tail:
        lines.append('{"epoch": 4, "train_lo')  # killed mid-write
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if test_map is not None:
        res = {"dataset": dataset, "method": method, "seed": seed, "best_epoch": best_epoch,
               "best_val_map": max(val_maps), "test_map": test_map, "test_per_class_ap": [test_map],
               "map_convention": convention, "excluded_classes": list(excluded)}
        if groups is not None:
            res["groups"] = groups
        (d / "result.json").write_text(json.dumps(res))
    return d


@pytest.fixture
def table2_runs(tmp_path):
    root = tmp_path / "runs"
    # Naive AN on VOC, three seeds: 85.1, 85.3, 85.5 -> mean 85.3; deviations -0.2, 0, +0.2,
    # sample variance (0.04 + 0 + 0.04) / 2 = 0.04 -> std 0.2
    for seed, m, ep in ((1, 0.851, 3), (2, 0.853, 4), (3, 0.855, 2)):
        make_run(root / "voc", f"an_s{seed}", "voc2012", "an", seed, m, best_epoch=ep)
    make_run(root / "voc", "llct_s1", "voc2012", "ll_ct", 1, 0.89, best_epoch=5)
    make_run(root / "voc", "mine_s1", "voc2012", "mine", 1, 0.5, best_epoch=1)
    make_run(root / "coco", "full_s1", "coco2014", "full", 1, 0.78, best_epoch=7, excluded=(3, 9))
    make_run(root / "coco", "llr_s1", "coco2014", "ll_r", 1, None, val_maps=(0.6, 0.65), truncated_tail=True)
    return root


def test_table2_layout(table2_runs, capsys):
    assert main([str(table2_runs)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # Columns in the paper's order (VOC before COCO), rows full, an, ..., ll_ct, then other methods.
    assert lines[0] == "### Test mAP by dataset (paper Table 2 layout)"
    assert lines[2] == "| Method | VOC | VOC best epoch | COCO | COCO best epoch |"
    assert lines[3] == "| :-- | --: | --: | --: | --: |"
    assert lines[4] == "| Full label |  |  | 78.0 | 7 |"
    assert lines[5] == "| Naive AN | 85.3 ± 0.2 (3 seeds) | 3, 4, 2 |  |  |"
    assert lines[6] == "| LL-Ct | 89.0 | 5 |  |  |"
    assert lines[7] == "| mine | 50.0 | 1 |  |  |"
    assert "mAP convention: exclude." in lines
    assert "COCO: 2 class(es) without a known test positive excluded: 3, 9." in lines
    # The LL-R run has no result.json: listed, with its logged epochs and last val mAP (65.0 %).
    i = lines.index("### Unfinished runs (no result.json)")
    row = lines[i + 4]
    assert "llr_s1 | COCO | LL-R | 1 | 2 | 65.0 | metrics.jsonl line 3 truncated (skipped) |" in row


def test_two_decimals_and_explicit_run_dirs(table2_runs, capsys):
    voc = table2_runs / "voc"
    assert main([str(voc / "an_s1"), str(voc / "an_s2"), "--digits", "2"]) == 0
    # 85.1 and 85.3: mean 85.2, sample std sqrt(((-0.1)^2 + 0.1^2) / 1) = sqrt(0.02) = 0.1414 -> 0.14
    assert "| Naive AN | 85.20 ± 0.14 (2 seeds) | 3, 4 |" in capsys.readouterr().out


def test_protocols_and_by_key_split_columns(tmp_path, capsys):
    make_run(tmp_path, "a", "voc2012", "an", 1, 0.80, protocol="single_positive")
    make_run(tmp_path, "b", "voc2012", "an", 1, 0.90, protocol="full")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| Method | VOC (full) | VOC (full) best epoch | VOC (single_positive) |" in out
    assert "| Naive AN | 90.0 | 2 | 80.0 | 2 |" in out

    other = tmp_path / "other"
    make_run(other, "e2e", "cub", "an", 1, 0.20, extra_config={"model": {"linear_init_epochs": 0}})
    make_run(other, "li", "cub", "an", 1, 0.21, extra_config={"model": {"linear_init_epochs": 1}})
    assert main([str(other)]) == 1  # same method, dataset and seed twice
    assert "two runs of method/column an on CUB with seed 1" in capsys.readouterr().err
    assert main([str(other), "--by", "model.linear_init_epochs"]) == 0
    out = capsys.readouterr().out
    assert "| Naive AN | 20.0 | 2 | 21.0 | 2 |" in out
    assert "| Method | CUB (model.linear_init_epochs=0) |" in out


def openimages_groups(base):
    return {"G1": base, "G2": base + 0.01, "G3": base + 0.02, "G4": base + 0.03, "G5": base + 0.04, "All": base + 0.02}


def test_groups_table(tmp_path, capsys):
    make_run(tmp_path, "an1", "openimages_v3", "an", 1, 0.82, groups=openimages_groups(0.771), best_epoch=3)
    make_run(tmp_path, "an2", "openimages_v3", "an", 2, 0.82, groups=openimages_groups(0.773), best_epoch=4)
    make_run(tmp_path, "ct1", "openimages_v3", "ll_ct", 1, 0.826, groups=openimages_groups(0.777))
    make_run(tmp_path, "voc", "voc2012", "an", 1, 0.85)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # auto: VOC in the Table 2 layout, OpenImages (which has groups) in the Table 3 layout.
    assert "| Method | VOC | VOC best epoch |" in out
    assert "OpenImages" not in out.split("### Test mAP by class group")[0]
    assert "| Method | G1 | G2 | G3 | G4 | G5 | All | best epoch |" in out
    # G1 of Naive AN: 77.1 and 77.3 -> 77.2 ± sqrt(0.02) = 0.14 -> "77.2 ± 0.1 (2 seeds)"
    assert ("| Naive AN | 77.2 ± 0.1 (2 seeds) | 78.2 ± 0.1 (2 seeds) | 79.2 ± 0.1 (2 seeds) | "
            "80.2 ± 0.1 (2 seeds) | 81.2 ± 0.1 (2 seeds) | 79.2 ± 0.1 (2 seeds) | 3, 4 |") in out
    assert "| LL-Ct | 77.7 | 78.7 | 79.7 | 80.7 | 81.7 | 79.7 | 2 |" in out

    assert main([str(tmp_path), "--table", "datasets"]) == 0
    out = capsys.readouterr().out
    assert "### Test mAP by class group" not in out
    # OpenImages then sits in Table 2 with its overall test mAP: 82.0 twice -> std 0.0
    assert "| Method | VOC | VOC best epoch | OpenImages | OpenImages best epoch |" in out
    assert "| Naive AN | 85.0 | 2 | 82.0 ± 0.0 (2 seeds) | 3, 4 |" in out
    assert "| LL-Ct |  |  | 82.6 | 2 |" in out

    assert main([str(tmp_path / "voc"), "--table", "groups"]) == 1
    assert "no finished run has \"groups\"" in capsys.readouterr().err


def test_csv_json_and_plot(table2_runs, tmp_path, capsys):
    csv_path, json_path, png = tmp_path / "t.csv", tmp_path / "t.json", tmp_path / "val.png"
    assert main([str(table2_runs), "--csv", str(csv_path), "--json", str(json_path), "--plot", str(png)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    an = [r for r in rows if r["method"] == "an"][0]
    assert (an["column"], an["n_seeds"], an["seeds"], an["best_epochs"]) == ("VOC", "3", "1;2;3", "3;4;2")
    assert float(an["map_pct_mean"]) == pytest.approx(85.3) and float(an["map_pct_std"]) == pytest.approx(0.2)
    assert [r["method"] for r in rows if r["table"] == "unfinished"] == ["ll_r"]
    doc = json.loads(json_path.read_text())  # strict JSON: NaN written as null
    assert doc["tables"][0]["name"] == "datasets"
    full = [c for c in doc["tables"][0]["cells"] if c["method"] == "full"][0]
    assert full["map_pct_std"] is None and full["map_pct_mean"] == pytest.approx(78.0)
    status = {(r["method"], r["seed"]): r["status"] for r in doc["runs"]}
    assert status[("ll_r", 1)] == "unfinished" and status[("an", 2)] == "finished"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_rendering_functions_are_importable(table2_runs):
    runs = find_runs([table2_runs])
    assert len(runs) == 7 and sum(r.finished for r in runs) == 6
    table = tables.datasets_table(runs)
    md = tables.render_markdown(table)
    assert md.startswith("### Test mAP by dataset") and "| LL-Ct | 89.0 | 5 |" in md
    assert tables.format_cell([0.851, 0.853, 0.855]) == "85.3 ± 0.2 (3 seeds)"
    assert tables.format_cell([float("nan")]) == "n/a"


def test_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    assert "not a run directory" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err

    d = make_run(tmp_path, "noconf", "voc2012", "an", 1, 0.8)
    (d / "config.yaml").unlink()
    with pytest.raises(RunDirError, match=r"noconf/config.yaml: missing"):
        find_runs([d])

    d = make_run(tmp_path, "pct", "voc2012", "an", 1, 85.1)  # percent instead of a fraction
    with pytest.raises(RunDirError, match=r"pct/result.json: test_map: mAP 85.1 is outside \[0, 1\]"):
        find_runs([d])

    d = make_run(tmp_path, "badline", "voc2012", "an", 1, 0.8)
    with open(d / "metrics.jsonl", "a") as f:
        f.write("{oops\n")  # a bad line in a finished run is not a crash artefact
    with pytest.raises(RunDirError, match=r"badline/metrics.jsonl:4: not valid JSON"):
        find_runs([d])

    d = make_run(tmp_path, "mismatch", "voc2012", "an", 1, 0.8)
    res = json.loads((d / "result.json").read_text())
    res["method"] = "ll_r"
    (d / "result.json").write_text(json.dumps(res))
    with pytest.raises(RunDirError, match=r"method = 'll_r' but .*config.yaml says 'an'"):
        find_runs([d])

    d = make_run(tmp_path, "noseed", "voc2012", "an", 1, 0.8)
    (d / "config.yaml").write_text("dataset: voc2012\nmethod: an\n")
    with pytest.raises(RunDirError, match=r"noseed/config.yaml: no top-level key 'seed'"):
        find_runs([d])


def test_mixed_conventions_in_one_cell(tmp_path, capsys):
    make_run(tmp_path, "a", "voc2012", "an", 1, 0.8, convention="exclude")
    make_run(tmp_path, "b", "voc2012", "an", 2, 0.8, convention="cole")
    assert main([str(tmp_path)]) == 1
    assert "different mAP conventions ['cole', 'exclude']" in capsys.readouterr().err


def test_openimages_convention_in_the_footer(tmp_path, capsys):
    # VOC under "cole" (no class left out) beside OpenImages under "openimages", which leaves out the classes
    # without any known test label (here 7 and 12) and scores those without a known positive as AP 0.
    make_run(tmp_path, "voc", "voc2012", "an", 1, 0.8, convention="cole")
    make_run(tmp_path, "oi", "openimages_v3", "an", 1, 0.7, convention="openimages", excluded=(12, 7))
    assert main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "mAP convention: OpenImages: openimages; VOC: cole." in lines  # columns in the order of the runs found
    assert "OpenImages: 2 class(es) without a known test label excluded: 7, 12." in lines
