"""The embedded demo dataset: a deterministic, well-formed VOC tree (ingest/demo_images.py), and `ingest demo`
(ingest/demo.py)."""
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
    assert len(demo_images.CLASSES) == len(set(demo_images.CLASSES)) == 20
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
        img = cv2.imread(str(tree / "JPEGImages" / f"{image_id}.jpg"), cv2.IMREAD_COLOR)
        assert img.shape == (h, w, 3)
        assert 128 <= w <= 256 and 128 <= h <= 256
        objects = root.findall("object")
        assert 1 <= len(objects) <= 4
        assert {o.findtext("name") for o in objects} == pos
        for o in objects:
            assert o.findtext("difficult") == "0"
            xmin, ymin, xmax, ymax = (float(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
            # VOC's 1-based inclusive pixel coordinates
            assert 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h, (image_id, xmin, ymin, xmax, ymax)
            # nominal diameter >= 20 % of the short side (>= 25 px here), shrunk to at most 0.85^3 of it
            # when it did not fit; the minor extent of a thin shape (ellipse) can be a few pixels
            assert max(xmax - xmin, ymax - ymin) >= 12
    assert 1.3 < np.mean(n_pos) < 2.7  # about 2 positives per image (40+10 images: loose bounds)


def test_deterministic_across_runs_and_workers(tree: Path, tmp_path: Path):
    again = demo_images.write_voc_tree(tmp_path / "b", n_train=N_TRAIN, n_test=N_TEST, seed=3, workers=2)
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
    img, objects = demo_images.render_image(0, 1, 0)
    img2, objects2 = demo_images.render_image(0, 1, 0)
    assert np.array_equal(img, img2) and objects == objects2


def test_size_range(tmp_path: Path):
    devkit = demo_images.write_voc_tree(tmp_path, n_train=6, n_test=2, min_size=96, max_size=100)
    for p in (devkit / "JPEGImages").glob("*.jpg"):
        h, w = cv2.imread(str(p)).shape[:2]
        assert 96 <= h <= 100 and 96 <= w <= 100
    with pytest.raises(ValueError, match="size range"):
        demo_images.write_voc_tree(tmp_path, n_train=1, n_test=1, min_size=200, max_size=100)
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
    assert cli.main(["demo", "--out", str(tmp_path / "bad"), "--size", "300", "200", "--no-progress"]) == 1


def test_kill_dash_9_of_ingest_demo_leaves_no_worker_behind(tmp_path: Path):
    """kill -9 of `ingest demo` while its worker processes draw images: the workers (and with them the
    multiprocessing resource tracker) must not outlive it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "largeloss.ingest", "demo", "--out", str(out), "--n-train", "20000",
                             "--n-test", "10", "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        jpegs = out / "_source_voc" / "VOCdevkit"
        while time.monotonic() < deadline:  # wait until both workers are drawing
            children = psutil.Process(proc.pid).children(recursive=True)
            workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
            if len(workers) == 2 and any(jpegs.glob(".VOCDEMO.partial-*/JPEGImages/*.jpg")):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the workers did not start drawing: children {children}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        def alive() -> list[str]:
            out = []
            for c in children:
                try:
                    if c.status() != psutil.STATUS_ZOMBIE:
                        out.append(" ".join(c.cmdline())[:100])
                except psutil.NoSuchProcess:
                    pass
            return out

        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive() == []
    finally:
        for c in children:  # never leave a process behind, whatever the outcome
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
