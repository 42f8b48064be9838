"""The VOC adapter (ingest/voc.py) and the ingest CLI (ingest/cli.py), on the real fixtures and on generated trees."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

import largeloss.ingest.cli as cli
from conftest import FIXTURES, ROOT
from largeloss.ingest import voc
from largeloss.ingest.voc import VOC_CLASSES, parse_annotation, plan_from_devkit
from largeloss.shards.format import IngestError
from largeloss.shards.reader import open_dataset, verify
from largeloss.shards.writer import write_dataset

VOCDEVKIT07 = FIXTURES / "voc2007-format-reference" / "VOCdevkit"
VOCDEVKIT12 = FIXTURES / "voc2012" / "VOCdevkit"


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return simplejpeg.encode_jpeg(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8), quality=90)


def _list_labels(path: Path) -> dict[str, int]:
    """An independent reading of one Main list: {id: label}."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return {image_id: int(label) for image_id, label in rows}


def _samples(out: Path, split: str) -> dict[str, tuple[list[int], dict]]:
    """{source_id: (positive classes from labels.arrow, sample json)} of one written split."""
    ds = open_dataset(out)
    pos = ds.labels_table(split).column("pos").to_pylist()
    return {s.meta["source_id"]: (pos[s.sample_id], s.meta) for s in ds.iter_samples(split)}


def _assert_labels_equal_lists(out: Path, main: Path, split: str, list_name: str, classes=VOC_CLASSES) -> None:
    samples = _samples(out, split)
    tables = {c: _list_labels(main / f"{name}_{list_name}.txt") for c, name in enumerate(classes)}
    with_positive = sorted(i for i in tables[0] if any(t[i] == 1 for t in tables.values()))
    assert sorted(samples) == with_positive
    for c, table in tables.items():
        for image_id, (pos, _) in samples.items():
            assert (c in pos) == (table[image_id] == 1), (split, classes[c], image_id)


# ---------------------------------------------------------------------------------------- real fixtures

def test_voc2007_fixture_lists_and_boxes(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["voc", "--root", str(VOCDEVKIT07), "--year", "2007", "--split-lists", "train=trainval,test=test",
                   "--out", str(out), "--shard-size", "3", "--no-progress", "--workers", "1"])
    assert rc == 0
    main = VOCDEVKIT07 / "VOC2007" / "ImageSets" / "Main"
    _assert_labels_equal_lists(out, main, "train", "trainval")
    _assert_labels_equal_lists(out, main, "test", "test")
    test = _samples(out, "test")
    # from the test lists: 000001 dog+person, 000002 train, 000003 chair+sofa, 000004 car
    assert {k: v[0] for k, v in test.items()} == {"000001": [11, 14], "000002": [18], "000003": [8, 17], "000004": [6]}
    assert test["000001"][1] == {
        "source_id": "000001", "rel_path": "JPEGImages/000001.jpg", "width": 353, "height": 500,
        "boxes": [{"class": 11, "bbox": [48.0, 240.0, 195.0, 371.0], "difficult": 0},
                  {"class": 14, "bbox": [8.0, 12.0, 352.0, 498.0], "difficult": 0}]}
    assert {k: v[0] for k, v in _samples(out, "train").items()} == {"000005": [8]}  # chair_trainval: "000005  1"
    ds = open_dataset(out)
    assert ds.manifest.dataset == "voc2007" and ds.class_names == list(VOC_CLASSES)
    assert ds.manifest.counts["test"] == {"listed": 4, "written": 4, "missing": 0, "corrupt": 0,
                                          "skipped": {"no_positive": 0}, "missing_annotations": 0,
                                          "unknown_box_classes": 0, "invalid_boxes": 0, "problems": []}
    assert [sample.jpeg for sample in ds.iter_samples("train")] == [
        (VOCDEVKIT07 / "VOC2007" / "JPEGImages" / "000005.jpg").read_bytes()]
    summary = capsys.readouterr().out
    assert summary.splitlines()[0].split()[:6] == ["split", "listed", "written", "missing", "corrupt", "skipped"]

    # the fixture has no <class>_train.txt (its train lists had no row for 000001-000005 and were dropped)
    rc = cli.main(["voc", "--root", str(VOCDEVKIT07), "--year", "2007", "--out", str(tmp_path / "o2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"ingest voc: error: {main / 'aeroplane_train.txt'}: list for class 'aeroplane' not found")


def test_voc2007_fixture_default_splits_with_empty_train_lists(tmp_path):
    # the fixture dropped the (then empty) <class>_train.txt files; put them back empty, as a devkit whose
    # train lists name none of 000001-000005 would have them: train is empty, test comes from the val lists
    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(VOCDEVKIT07, devkit)
    main = devkit / "VOC2007" / "ImageSets" / "Main"
    for name in VOC_CLASSES:
        (main / f"{name}_train.txt").write_bytes(b"")
    out = tmp_path / "out"
    assert cli.main(["voc", "--root", str(devkit), "--year", "2007", "--out", str(out), "--no-progress"]) == 0
    _assert_labels_equal_lists(out, main, "test", "val")
    ds = open_dataset(out)
    assert ds.num_samples("train") == 0 and ds.labels_table("train").num_rows == 0
    assert {k: v[0] for k, v in _samples(out, "test").items()} == {"000005": [8]}  # chair_val: "000005  1"
    assert ds.manifest.source["split_lists"] == {"train": "train", "test": "val"}


def _voc_list_label(boxes_of_class: list[dict]) -> int:
    """VOC's classification label from the objects of one class: 1 any non-difficult, 0 only difficult, -1 none."""
    if not boxes_of_class:
        return -1
    return 1 if any(b["difficult"] == 0 for b in boxes_of_class) else 0


def test_voc2012_fixture_with_lists_generated_from_xml(tmp_path):
    voc_root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(VOCDEVKIT12 / "VOC2012", voc_root)
    main = voc_root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    index = {name: c for c, name in enumerate(VOC_CLASSES)}
    ids = sorted(p.stem for p in (voc_root / "Annotations").glob("*.xml"))
    boxes = {i: parse_annotation(voc_root / "Annotations" / f"{i}.xml", index)[0] for i in ids}
    for list_name, part in (("train", ids[:3]), ("val", ids[3:])):
        for c, name in enumerate(VOC_CLASSES):
            rows = ["%s %2d" % (i, _voc_list_label([b for b in boxes[i] if b["class"] == c])) for i in part]
            (main / f"{name}_{list_name}.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert cli.main(["voc", "--root", str(tmp_path / "VOCdevkit"), "--out", str(out), "--no-progress"]) == 0
    _assert_labels_equal_lists(out, main, "train", "train")
    _assert_labels_equal_lists(out, main, "test", "val")
    samples = {**_samples(out, "train"), **_samples(out, "test")}
    assert sorted(samples) == ids  # every fixture image has a positive object
    # 2007_000027: one person with head/hand/foot parts; the parts are not classes
    assert samples["2007_000027"] == ([14], {
        "source_id": "2007_000027", "rel_path": "JPEGImages/2007_000027.jpg", "width": 486, "height": 500,
        "boxes": [{"class": 14, "bbox": [174.0, 101.0, 349.0, 351.0], "difficult": 0}]})
    assert open_dataset(out).manifest.dataset == "voc2012"
    assert verify(out) == []


# ------------------------------------------------------------------------------------- generated trees

CLASSES3 = ["cat", "dog", "person"]
_XML_PERSON_WITH_PARTS = """<annotation>
  <size><width>16</width><height>8</height><depth>3</depth></size>
  <object>
    <name>person</name><difficult>0</difficult>
    <bndbox><xmin>1.5</xmin><ymin>2.70000076293945</ymin><xmax>10</xmax><ymax>7</ymax></bndbox>
    <part><name>head</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></part>
    <part><name>dog</name><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></part>
  </object>
  <object>
    <name>
      dog
    </name><difficult>1</difficult>
    <bndbox><xmin>3</xmin><ymin>1</ymin><xmax>6</xmax><ymax>4</ymax></bndbox>
  </object>
  <object>
    <name>horse</name><difficult>0</difficult>
    <bndbox><xmin>0</xmin><ymin>0</ymin><xmax>1</xmax><ymax>1</ymax></bndbox>
  </object>
</annotation>
"""


def _xml_one(name: str) -> str:
    return (f"<annotation><object><name>{name}</name><difficult>0</difficult><bndbox><xmin>1</xmin>"
            f"<ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>")


def _make_tree(tmp_path: Path) -> Path:
    """A VOC-layout folder 'MYSET' with classes cat, dog, person and six images a..f:

    a: cat (lists use CRLF)        b: only a difficult dog (0) -> no positive, skipped
    c: cat, JPEG missing            d: cat, JPEG truncated
    e: dog + person; XML with nested person parts, a float coordinate, a difficult dog, a horse
    f: cat, no XML
    """
    root = tmp_path / "devkit" / "MYSET"
    main = root / "ImageSets" / "Main"
    for d in (main, root / "JPEGImages", root / "Annotations"):
        d.mkdir(parents=True)
    labels = {"a": [1, -1, -1], "b": [-1, 0, -1], "c": [1, -1, -1], "d": [1, -1, -1], "e": [-1, 1, 1], "f": [1, -1, -1]}
    for c, name in enumerate(CLASSES3):
        rows = ["%s %2d" % (i, labels[i][c]) for i in ("f", "e", "d", "c", "b", "a")]  # not in id order on disk
        newline = "\r\n" if name == "cat" else "\n"
        (main / f"{name}_train.txt").write_bytes((newline.join(rows) + newline).encode())
        (main / f"{name}_val.txt").write_bytes(b"")
    for i, image_id in enumerate("abcdef"):
        if image_id != "c":
            (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg(i))
        if image_id != "f":
            xml = _XML_PERSON_WITH_PARTS if image_id == "e" else _xml_one("cat" if image_id != "b" else "dog")
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "JPEGImages" / "d.jpg").write_bytes(_jpeg(3)[:-20])
    # a BOM, CRLF line ends and a blank line
    (tmp_path / "classes.txt").write_text("\ufeffcat\r\ndog\r\n\r\nperson\r\n", encoding="utf-8")
    return root


def test_generated_tree_quirks(tmp_path):
    root = _make_tree(tmp_path)
    out = tmp_path / "out"
    argv = ["voc", "--root", str(root.parent), "--folder", "MYSET", "--classes", str(tmp_path / "classes.txt"),
            "--out", str(out), "--no-progress", "--shard-size", "2"]
    assert cli.main(argv) == 0
    ds = open_dataset(out)
    assert ds.class_names == CLASSES3 and ds.manifest.dataset == "myset"
    c = ds.manifest.counts["train"]
    # record indices count the records the adapter handed over (b, without a positive, is not one)
    assert c["problems"] == [[1, "missing", "JPEGImages/c.jpg", "file not found"],
                             [2, "corrupt", "JPEGImages/d.jpg",
                              "truncated: no end-of-image marker after the scan data"]]
    del c["problems"]
    assert c == {"listed": 6, "written": 3, "missing": 1, "corrupt": 1, "skipped": {"no_positive": 1},
                 "missing_annotations": 1, "unknown_box_classes": 1, "invalid_boxes": 0}
    assert ds.manifest.counts["test"]["listed"] == 0 and ds.num_samples("test") == 0
    samples = _samples(out, "train")
    assert list(samples) == ["a", "e", "f"]  # sorted ids, b (no positive), c (missing), d (corrupt) left out
    assert samples["a"] == ([0], {"source_id": "a", "rel_path": "JPEGImages/a.jpg", "width": 16, "height": 8,
                                  "boxes": [{"class": 0, "bbox": [1.0, 2.0, 3.0, 4.0], "difficult": 0}]})
    assert samples["e"] == ([1, 2], {"source_id": "e", "rel_path": "JPEGImages/e.jpg", "width": 16, "height": 8,
                                     "boxes": [{"class": 2, "bbox": [1.5, 2.70000076293945, 10.0, 7.0], "difficult": 0},
                                               {"class": 1, "bbox": [3.0, 1.0, 6.0, 4.0], "difficult": 1}]})
    assert samples["f"] == ([0], {"source_id": "f", "rel_path": "JPEGImages/f.jpg", "width": 16, "height": 8})
    assert ds.manifest.splits["train"].positives_per_class == [2, 1, 1]
    assert ds.manifest.splits["train"].known_per_class == [3, 3, 3]

    plan = voc.plan(root.parent, folder="MYSET", classes_file=tmp_path / "classes.txt")
    with pytest.raises(IngestError, match=rf"^{root / 'JPEGImages' / 'c.jpg'}: missing image"):
        write_dataset(tmp_path / "strict", plan, strict=True, progress=False)


def _replace_in(path: Path, old: str, new: str) -> None:
    path.write_bytes(path.read_bytes().replace(old.encode(), new.encode()))


@pytest.mark.parametrize("damage, message", [
    (lambda r: _replace_in(r / "ImageSets/Main/dog_train.txt", "e  1", "e  2"),
     r"dog_train.txt:2: malformed row 'e  2'; expected '<image id> <-1\|0\|1>'"),
    (lambda r: _replace_in(r / "ImageSets/Main/dog_train.txt", "e  1", "e 1 x"),
     r"dog_train.txt:2: malformed row 'e 1 x'"),
    (lambda r: _replace_in(r / "ImageSets/Main/dog_train.txt", "d -1", "e -1"),
     r"dog_train.txt:3: image e is listed again \(first on line 2\)"),
    (lambda r: _replace_in(r / "ImageSets/Main/dog_train.txt", "d -1\n", ""),
     r"dog_train.txt: image d \(line 3 of cat_train.txt\) is missing; every class list of a split must name the same"),
    (lambda r: _replace_in(r / "ImageSets/Main/person_train.txt", "d -1", "z -1"),
     r"person_train.txt:3: image z is not in cat_train.txt"),
    (lambda r: (r / "ImageSets/Main/person_val.txt").unlink(),
     r"person_val.txt: list for class 'person' not found"),
    (lambda r: shutil.rmtree(r / "ImageSets"), r"MYSET/ImageSets/Main: not found"),
    (lambda r: _replace_in(r / "Annotations/a.xml", "<xmin>1</xmin>", "<xmin>one</xmin>"),
     r"a.xml: object 0 \(cat\) bndbox/xmin is 'one', not a finite number"),
    (lambda r: _replace_in(r / "Annotations/a.xml", "</annotation>", ""), r"a.xml:1: malformed XML"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, damage, message):
    root = _make_tree(tmp_path)
    damage(root)
    rc = cli.main(["voc", "--root", str(root.parent), "--folder", "MYSET", "--classes", str(tmp_path / "classes.txt"),
                   "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ingest voc: error: ")
    assert re.search(message, err), err


def test_image_id_that_leaves_the_image_folder_is_refused(tmp_path, capsys):
    """A list row '../../../secretdir/secret 1' must not pull a file from outside --root into a shard."""
    root = _make_tree(tmp_path)
    secret = tmp_path / "secretdir" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(_jpeg(9))
    for name in CLASSES3:
        row = "../../../secretdir/secret %2d\n" % (1 if name == "cat" else -1)
        with open(root / f"ImageSets/Main/{name}_train.txt", "a", newline="") as f:
            f.write(row)
    rc = cli.main(["voc", "--root", str(root.parent), "--folder", "MYSET", "--classes", str(tmp_path / "classes.txt"),
                   "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert err.startswith(f"ingest voc: error: {root / 'ImageSets/Main/cat_train.txt'}:7: image id "
                          "'../../../secretdir/secret' leaves the image folder")
    assert not (tmp_path / "out" / "manifest.json").exists()


def _xml_box(xmin, ymin, xmax, ymax, name: str = "cat") -> str:
    return (f"<annotation><size><width>16</width><height>8</height></size><object><name>{name}</name>"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
            f"<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>16</xmax><ymax>8</ymax></bndbox>"
            "</object></annotation>")


@pytest.mark.parametrize("box, reason", [
    ((10, 2, 3, 4), "xmax 3 < xmin 10"),
    ((1, 6, 3, 2), "ymax 2 < ymin 6"),
    ((-5, 2, 3, 4), "xmin -5 < 0"),
    ((1, 2, 1e30, 4), "xmax 1e+30 > width 16"),
    ((1, 2, 3, 9.5), "ymax 9.5 > height 8"),
])
def test_invalid_boxes_are_dropped_and_counted_or_fatal_under_strict(tmp_path, caplog, box, reason):
    root = _make_tree(tmp_path)
    xml = root / "Annotations" / "a.xml"
    xml.write_text(_xml_box(*box))
    classes = tmp_path / "classes.txt"
    out = tmp_path / "out"
    m = write_dataset(out, voc.plan(root.parent, folder="MYSET", classes_file=classes), progress=False)
    assert m.counts["train"]["invalid_boxes"] == 1
    assert _samples(out, "train")["a"][1]["boxes"] == [{"class": 1, "bbox": [1.0, 1.0, 16.0, 8.0], "difficult": 0}]
    assert f"{xml}: object 0 (cat): box dropped: {reason}" in caplog.text
    with pytest.raises(IngestError, match=rf"^{re.escape(str(xml))}: object 0 \(cat\): invalid box: "
                                          rf"{re.escape(reason)}; fix the XML, or run without --strict"):
        write_dataset(tmp_path / "strict", voc.plan(root.parent, folder="MYSET", classes_file=classes, strict=True),
                      progress=False)


def test_xml_path_that_is_a_folder_is_one_line(tmp_path, capsys):
    root = _make_tree(tmp_path)
    xml = root / "Annotations" / "a.xml"
    xml.unlink()
    xml.mkdir()
    rc = cli.main(["voc", "--root", str(root.parent), "--folder", "MYSET", "--classes", str(tmp_path / "classes.txt"),
                   "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"ingest voc: error: {xml}: is a folder, not an XML file; remove it or replace it " \
                              "with the image's annotation\n"


def test_missing_devkit_and_overlapping_splits(tmp_path, capsys):
    assert cli.main(["voc", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert f"{tmp_path / 'VOC2012'}: not found; --root must be the VOCdevkit folder" in capsys.readouterr().err
    root = _make_tree(tmp_path)
    for name in CLASSES3:
        shutil.copy(root / f"ImageSets/Main/{name}_train.txt", root / f"ImageSets/Main/{name}_trainval.txt")
    overlap = r"image a is in split 'train' \(list 'train'\) and in split 'test' \(list 'trainval'\)"
    with pytest.raises(IngestError, match=overlap):
        plan_from_devkit(root, CLASSES3, "x", {}, {"train": "train", "test": "trainval"})


def test_class_file_errors(tmp_path):
    bad = tmp_path / "classes.txt"
    bad.write_text("cat\ndog\ncat\n")
    with pytest.raises(IngestError, match=r"classes.txt:3: class 'cat' repeats line 1"):
        voc.read_class_file(bad)
    bad.write_text("cat\nhot dog\n")
    with pytest.raises(IngestError, match=r"classes.txt:2: class name 'hot dog' has a space"):
        voc.read_class_file(bad)


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_verify(tmp_path, capsys):
    root = _make_tree(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["voc", "--root", str(root.parent), "--folder", "MYSET", "--classes", str(tmp_path / "classes.txt"),
                     "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 0
    assert capsys.readouterr().out == (
        f"ingest verify: {out} is intact (train: 3 samples in 1 shards, test: 0 samples in 0 shards)\n")
    idx = out / "train" / "000000.idx"
    size = idx.stat().st_size
    idx.write_text("v1.2 1\n")
    assert cli.main(["verify", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{idx}: 7 bytes, manifest.json says {size}; re-run ingest for split 'train'",
        f"{idx}: does not match the DALI index of 000000.tar; re-run ingest",
        f"ingest verify: 2 problem(s) in {out}"]
    assert cli.main(["verify", str(tmp_path)]) == 1
    assert "manifest.json: not found" in capsys.readouterr().err



def test_python_dash_m_ingest(tmp_path):
    r = subprocess.run([sys.executable, "-m", "largeloss.ingest", "voc", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--split-lists" in r.stdout and "--shard-size" in r.stdout
    r = subprocess.run([sys.executable, "-m", "largeloss.ingest", "verify", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
