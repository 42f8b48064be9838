"""The embedded demo dataset: real handwritten digits composed into a deterministic, well-formed VOC tree
(ingest/demo_images.py), and `ingest demo` (ingest/demo.py)."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from largeloss.ingest import demo, demo_images

N_TRAIN, N_TEST = 40, 10
ROW = re.compile(r"^(demo_\d{6}) ( 1|-1)$")  # VOC's "%s %2d": two spaces before a 1


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return demo_images.write_voc_tree(tmp_path_factory.mktemp("demo_a"), n_train=N_TRAIN, n_test=N_TEST, seed=3)


def read_list(path: Path) -> list[tuple[str, int]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text, path
    rows = []
    for line in text.split("\n")[:-1]:
        m = ROW.match(line)
        assert m, f"{path}: bad row {line!r}"
        rows.append((m.group(1), int(m.group(2))))
    return rows


def positives(devkit: Path, list_name: str) -> dict[str, set[str]]:
    """image id -> names of the classes whose list row is 1"""
    out: dict[str, set[str]] = {}
    for name in demo_images.CLASSES:
        for image_id, label in read_list(devkit / "ImageSets" / "Main" / f"{name}_{list_name}.txt"):
            out.setdefault(image_id, set())
            if label == 1:
                out[image_id].add(name)
    return out


def all_files(devkit: Path) -> dict[str, bytes]:
    return {str(p.relative_to(devkit)): p.read_bytes() for p in sorted(devkit.rglob("*")) if p.is_file()}


def test_layout_and_counts(tree: Path):
    assert tree.name == "VOCDEMO" and tree.parent.name == "VOCdevkit"
    assert (tree / "classes.txt").read_text(encoding="utf-8").split("\n") == [*demo_images.CLASSES, ""]
    assert demo_images.CLASSES == ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                   "nine")
    ids = [f"demo_{i:06d}" for i in range(N_TRAIN + N_TEST)]
    assert sorted(p.stem for p in (tree / "JPEGImages").glob("*.jpg")) == ids
    assert sorted(p.stem for p in (tree / "Annotations").glob("*.xml")) == ids
    main = tree / "ImageSets" / "Main"
    expected = {"train": ids[:N_TRAIN], "val": ids[N_TRAIN:], "trainval": ids}
    for list_name, want in expected.items():
        assert (main / f"{list_name}.txt").read_text(encoding="utf-8").split() == want
        for name in demo_images.CLASSES:  # every class list names every image of the split, in sorted order
            assert [i for i, _ in read_list(main / f"{name}_{list_name}.txt")] == want
    params = json.loads((tree / "params.json").read_text(encoding="utf-8"))
    assert params["params"]["n_train"] == N_TRAIN and params["params"]["seed"] == 3
    assert params["stats"]["train"]["images"] == N_TRAIN
    assert not list(tree.parent.glob(".VOCDEMO.partial-*"))


def test_lists_annotations_and_images_agree(tree: Path):
    train, val = positives(tree, "train"), positives(tree, "val")
    trainval = positives(tree, "trainval")
    assert trainval == {**train, **val}
    n_pos = []
    for image_id, pos in trainval.items():
        assert pos, f"{image_id} has no positive"
        n_pos.append(len(pos))
        root = ET.parse(tree / "Annotations" / f"{image_id}.xml").getroot()
        assert root.findtext("filename") == f"{image_id}.jpg"
        w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
        img = cv2.imread(str(tree / "JPEGImages" / f"{image_id}.jpg"), cv2.IMREAD_GRAYSCALE)
        assert img.shape == (h, w) == (64, 64)
        objects = root.findall("object")
        assert 1 <= len(objects) <= 4
        names = [o.findtext("name") for o in objects]
        assert len(set(names)) == len(names) and set(names) == pos  # distinct classes, one digit each
        cells = set()
        for o in objects:
            assert o.findtext("difficult") == "0"
            x0, y0, x1, y1 = (int(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            # VOC's 1-based inclusive pixels, inside one 32 x 32 cell of the 2 x 2 grid
            assert 1 <= x0 <= x1 <= w and 1 <= y0 <= y1 <= h, (image_id, x0, y0, x1, y1)
            cell = ((x0 - 1) // 32, (y0 - 1) // 32)
            assert cell == ((x1 - 1) // 32, (y1 - 1) // 32)
            cells.add(cell)
            # the digit is drawn in its box: bright ink inside (JPEG noise outside the boxes stays dark)
            assert img[y0 - 1:y1, x0 - 1:x1].max() > 128
        assert len(cells) == len(objects)  # one digit per cell
        ink = np.zeros_like(img, dtype=bool)
        for o in objects:
            x0, y0, x1, y1 = (int(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            ink[y0 - 1:y1, x0 - 1:x1] = True
        assert img[~ink].max() < 64  # nothing bright outside the digits' boxes
    assert 1.7 < np.mean(n_pos) < 2.9  # 2.3 positives per image on average (40 + 10 images: loose bounds)


def test_deterministic_across_runs(tree: Path, tmp_path: Path):
    again = demo_images.write_voc_tree(tmp_path / "b", n_train=N_TRAIN, n_test=N_TEST, seed=3)
    a, b = all_files(tree), all_files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = demo_images.write_voc_tree(tmp_path / "c", n_train=N_TRAIN, n_test=N_TEST, seed=4)
    assert (other / "JPEGImages" / "demo_000000.jpg").read_bytes() != a["JPEGImages/demo_000000.jpg"]


def test_test_images_do_not_depend_on_n_train(tmp_path: Path):
    small = demo_images.write_voc_tree(tmp_path / "s", n_train=2, n_test=2)
    large = demo_images.write_voc_tree(tmp_path / "l", n_train=5, n_test=2)
    for j in range(2):  # test image j is demo_{n_train + j}
        assert (small / "JPEGImages" / f"demo_{2 + j:06d}.jpg").read_bytes() == \
            (large / "JPEGImages" / f"demo_{5 + j:06d}.jpg").read_bytes()
    digits, labels = demo_images.load_digits()
    pools = demo_images.digit_pools(labels)[1]
    img, objects = demo_images.compose_image(digits, pools, 0, 1, 0, 64)
    img2, objects2 = demo_images.compose_image(digits, pools, 0, 1, 0, 64)
    assert np.array_equal(img, img2) and objects == objects2


def test_digit_pools_are_disjoint_and_keep_test_digits_out_of_training(tmp_path: Path, monkeypatch):
    digits, labels = demo_images.load_digits()
    assert digits.shape == (1797, 8, 8) and digits.dtype == np.uint8 and digits.max() == 255
    train, test = demo_images.digit_pools(labels)
    for c in range(10):
        assert np.intersect1d(train[c], test[c]).size == 0
        assert sorted(np.concatenate([train[c], test[c]])) == list(np.flatnonzero(labels == c))
        assert (labels[train[c]] == c).all() and len(train[c]) == round(0.8 * (labels == c).sum())
    # paint every training-pool digit 80 and every test-pool digit 240: the composed training images may only
    # hold the first, the test images only the second
    marked = np.zeros_like(digits)
    for c in range(10):
        marked[train[c]] = 80
        marked[test[c]] = 240
    monkeypatch.setattr(demo_images, "load_digits", lambda: (marked, labels))
    devkit = demo_images.write_voc_tree(tmp_path, n_train=30, n_test=30, seed=1)
    for i in range(60):
        img = cv2.imread(str(devkit / "JPEGImages" / f"demo_{i:06d}.jpg"), cv2.IMREAD_GRAYSCALE)
        ink = np.median(img[img > 40])
        assert abs(ink - (80 if i < 30 else 240)) < 15, (i, ink)


def test_size_and_count_checks(tmp_path: Path):
    devkit = demo_images.write_voc_tree(tmp_path, n_train=3, n_test=1, size=20)
    assert cv2.imread(str(devkit / "JPEGImages" / "demo_000000.jpg")).shape == (20, 20, 3)
    with pytest.raises(ValueError, match="size must be in 16..1024"):
        demo_images.write_voc_tree(tmp_path, n_train=1, n_test=1, size=8)
    with pytest.raises(ValueError, match="n_train"):
        demo_images.write_voc_tree(tmp_path, n_train=0, n_test=1)


def test_reuse_regenerate_and_refuse_foreign_tree(tmp_path: Path):
    devkit, reused = demo_images.ensure_voc_tree(tmp_path, n_train=3, n_test=1, verbose=False)
    assert not reused
    stamp = (devkit / "params.json").stat().st_mtime_ns
    again, reused = demo_images.ensure_voc_tree(tmp_path, n_train=3, n_test=1, verbose=False)
    assert reused and again == devkit and (devkit / "params.json").stat().st_mtime_ns == stamp
    # other arguments, or a damaged tree: regenerated in place
    _, reused = demo_images.ensure_voc_tree(tmp_path, n_train=4, n_test=1, verbose=False)
    assert not reused and len(list((devkit / "JPEGImages").glob("*.jpg"))) == 5
    (devkit / "JPEGImages" / "demo_000000.jpg").unlink()
    _, reused = demo_images.ensure_voc_tree(tmp_path, n_train=4, n_test=1, verbose=False)
    assert not reused and (devkit / "JPEGImages" / "demo_000000.jpg").is_file()
    # a VOCDEMO folder this generator did not write is never deleted
    foreign = tmp_path / "x" / "VOCdevkit" / "VOCDEMO"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a demo tree"):
        demo_images.write_voc_tree(tmp_path / "x", n_train=1, n_test=1)
    assert (foreign / "mine.txt").read_text() == "keep"


def _arrow_positives(path: Path) -> list[list[int]]:
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.column("sample").to_pylist() == list(range(table.num_rows))
    assert all(not n for n in table.column("neg").to_pylist())  # complete annotation: unlisted = negative
    return [sorted(p) for p in table.column("pos").to_pylist()]


def test_plan_puts_the_tree_under_out_or_tree(tmp_path: Path):
    plan = demo.plan(out=tmp_path / "data", n_train=3, n_test=1, progress=False)
    devkit = tmp_path / "data" / "_source_voc" / "VOCdevkit" / "VOCDEMO"
    assert plan.dataset == "demo" and plan.source["tree"] == str(devkit.resolve())
    assert [c["name"] for c in plan.classes] == list(demo_images.CLASSES) and len(plan.splits["test"]) == 1
    plan = demo.plan(tmp_path / "tree", out=tmp_path / "data", n_train=3, n_test=1, progress=False)
    assert plan.source["tree"] == str((tmp_path / "tree" / "VOCdevkit" / "VOCDEMO").resolve())
    with pytest.raises(ValueError, match="pass tree"):
        demo.plan(n_train=3, n_test=1)


def test_cli_ingests_the_generated_lists(tmp_path: Path):
    from largeloss.ingest import cli

    out = tmp_path / "data"
    argv = ["demo", "--out", str(out), "--n-train", str(N_TRAIN), "--n-test", str(N_TEST), "--no-progress"]
    assert cli.main(argv) == 0
    devkit = out / "_source_voc" / "VOCdevkit" / "VOCDEMO"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["dataset"] == "demo"
    assert [c["name"] for c in manifest["classes"]] == list(demo_images.CLASSES)
    index = {name: c for c, name in enumerate(demo_images.CLASSES)}
    for split, list_name in (("train", "train"), ("test", "val")):
        truth = positives(devkit, list_name)
        want = [sorted(index[n] for n in truth[i]) for i in sorted(truth)]
        assert _arrow_positives(out / split / "labels.arrow") == want
    # the same command again reuses the tree and finds the ingest complete (the plan's source is stable)
    before = (out / "manifest.json").read_bytes()
    assert cli.main(argv) == 0
    assert (out / "manifest.json").read_bytes() == before
    # bad arguments end with a message, not a traceback
    assert cli.main(["demo", "--out", str(tmp_path / "bad"), "--size", "2000", "--no-progress"]) == 1

def test_kill_dash_9_during_composition_leaves_nothing_behind(tmp_path: Path):
    """kill -9 of `ingest demo` while it composes images: it runs in one process (nothing to outlive it), the
    half-written tree stays in a temporary folder, and the next run removes it and writes the complete tree."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    parent = out / "_source_voc" / "VOCdevkit"
    proc = subprocess.Popen([sys.executable, "-m", "largeloss.ingest", "demo", "--out", str(out), "--n-train",
                             "50000", "--n-test", "10", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(parent.glob(".VOCDEMO.partial-*/JPEGImages/*.jpg")):
            assert time.monotonic() < deadline and proc.poll() is None, "composition did not start"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p.name for p in parent.iterdir()] == [f".VOCDEMO.partial-{proc.pid}"]  # never a half VOCDEMO
    devkit, reused = demo_images.ensure_voc_tree(out / "_source_voc", n_train=3, n_test=1, verbose=False)
    assert not reused and [p.name for p in parent.iterdir()] == ["VOCDEMO"]
    assert len(list((devkit / "JPEGImages").glob("*.jpg"))) == 4


def _run(method: str, delta: float, seed: int, val: float):
    from largeloss.eval.rundir import Run

    return Run(path=Path(f"/runs/{method}-{delta}-s{seed}"), config={"delta_rel": delta}, dataset="demo",
               method=method, seed=seed, protocol="single_positive", epochs=[],
               result={"best_val_map": val, "test_map": 0.5})


def test_delta_rel_is_chosen_on_mean_validation_map():
    from largeloss.train.demo import choose_deltas, selected

    runs = [_run("an", 0.2, 0, 0.60), _run("an", 0.2, 1, 0.62),
            # LL-R: delta 0.5 -> mean val (0.70 + 0.66) / 2 = 0.68; delta 1.0 -> (0.69 + 0.69) / 2 = 0.69: 1.0 wins
            _run("ll_r", 0.5, 0, 0.70), _run("ll_r", 0.5, 1, 0.66),
            _run("ll_r", 1.0, 0, 0.69), _run("ll_r", 1.0, 1, 0.69),
            # LL-Ct: a tie (0.65 both): the smaller delta
            _run("ll_ct", 0.5, 0, 0.65), _run("ll_ct", 1.0, 0, 0.65)]
    chosen, table = choose_deltas(runs)
    assert chosen == {"ll_r": 1.0, "ll_ct": 0.5}
    assert table.header == ["Method", "δ 0.5", "δ 1"]
    assert table.rows == [["LL-R", "68.0 ± 2.8 (2 seeds)", "69.0 ± 0.0 (2 seeds) **<-**"],
                          ["LL-Ct", "65.0 **<-**", "65.0"]]
    assert [(r.method, r.config["delta_rel"], r.seed) for r in selected(runs, chosen)] == [
        ("an", 0.2, 0), ("an", 0.2, 1), ("ll_r", 1.0, 0), ("ll_r", 1.0, 1), ("ll_ct", 0.5, 0)]


def test_largeloss_demo_end_to_end(tmp_path: Path, capsys):
    """The main job on a tiny dataset: data, features, every head, the choice of delta_rel, tables and figures;
    run again, it finds everything done and prints the same table."""
    from largeloss.train.demo import main

    argv = ["--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--n-train", "60", "--n-test", "20",
            "--seeds", "0", "--deltas", "0.5", "2", "--jobs", "1", "--set", "epochs=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    table = (runs / "table.md").read_text(encoding="utf-8")
    for row in ("| Full label |", "| Naive AN |", "| LL-R |", "| LL-Ct |", "| LL-Cp |"):
        assert row in table and row in out
    assert "delta_rel chosen on validation" in table and "Table 1 analogue (Naive AN)" in table
    assert f"wrote {runs / 'table.md'}" in out
    for png in ("val_map.png", "delta_rel.png"):
        assert (runs / png).stat().st_size > 1000
    heads = sorted(p.name for p in (runs / "heads").iterdir() if (p / "result.json").is_file())
    assert heads == sorted(["full-s0", "an-s0"] + [f"{m}-delta_rel={d}-s0" for m in ("ll_cp", "ll_ct", "ll_r")
                                                   for d in ("0.5", "2.0")])
    assert (runs / "heads" / "an-s0" / "analysis" / "memorization.png").is_file()
    assert sorted(p.name for p in (runs / "features").iterdir()) == ["test.json", "test.npy", "train.json", "train.npy"]
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "0 to train" in again and (runs / "table.md").read_text(encoding="utf-8") == table
