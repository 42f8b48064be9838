"""ingest/openimages.py: the real class files (CSV quoting, UTF-8, mixed line ends), generated annotation
CSVs with every trap (number-like ImageIDs, non-trainable rows, repeats, conflicts, images not on disk),
the image-folder layouts, streaming across many batches, error paths, and one end-to-end write."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.ipc as ipc
import pytest

from conftest import FIXTURES
from largeloss.ingest import openimages
from largeloss.shards.format import UNLISTED_UNKNOWN, IngestError

REL = FIXTURES / "openimages_v3" / "2017_11"
HEADER = "ImageID,Source,LabelName,Confidence"

# trainable MIDs and their class indices (line - 1 in the real classes-trainable.txt)
TRIVIA, SKY, TREE, HELMET, DUCKS = "/m/010dmf", "/m/01bqvp", "/m/07j7r", "/m/0zvk5", "/m/01c_0l"
I_TRIVIA, I_SKY, I_TREE, I_HELMET, I_DUCKS = 0, 407, 3559, 4999, 421
FIAT = "/m/02wvth"  # in class-descriptions.csv (name with doubled quotes) but not trainable

TRAIN_ROWS = [
    # an ImageID that a number parser would read as 0e1234 == 0.0
    ("00000000000e1234", "verification", TREE, "1"),
    ("00000000000e1234", "verification", TRIVIA, "0"),
    ("00000000000e1234", "verification", FIAT, "1"),  # not trainable: ignored, counted
    ("0123456789abcdef", "verification", SKY, "1"),
    ("0123456789abcdef", "crowdsource-verification", SKY, "1"),  # same value again: a duplicate row
    ("0123456789abcdef", "verification", HELMET, "1"),
    ("0123456789abcdef", "verification", HELMET, "0"),  # conflict: the pair becomes unknown (and a duplicate row)
    ("0123456789abcdef", "verification", DUCKS, "0"),
    ("ffff000000000001", "verification", FIAT, "0"),  # only non-trainable rows: skipped no_trainable_label
    ("0000000000000010", "verification", HELMET, "1"),  # only a conflicting pair: no_trainable_label too
    ("0000000000000010", "verification", HELMET, "0"),
    ("1000000000000000", "verification", TRIVIA, "1"),  # not on disk
    ("0000000000000002", "verification", SKY, "0"),  # a verified negative only
]
TRAIN_ON_DISK = ["00000000000e1234", "0123456789abcdef", "ffff000000000001", "0000000000000010", "0000000000000002",
                 "aaaa000000000000"]  # the last one is on disk but not in the CSV: ignored
# expected train records, in sorted ImageID order: (id, pos, neg)
TRAIN_WANT = [
    ("0000000000000002", [], [I_SKY]),
    ("00000000000e1234", [I_TREE], [I_TRIVIA]),
    ("0123456789abcdef", [I_SKY], [I_DUCKS]),
]
TRAIN_COUNTS = {
    "listed": 6,
    "skipped": {"no_trainable_label": 2, "not_on_disk": 1},
    "rows": 13,
    "non_trainable_rows": 2,
    "duplicate_rows": 3,  # 11 trainable rows over 8 (image, class) pairs
    "conflicting_pairs": 2,
    "malformed_rows": 0,
}
VAL_ROWS = [("aaaa000000000001", "verification", SKY, "1"), ("aaaa000000000001", "verification", HELMET, "1")]
TEST_ROWS = [("bbbb000000000001", "verification", TRIVIA, "0"), ("bbbb000000000000", "verification", DUCKS, "1")]
ON_DISK = {"train": TRAIN_ON_DISK, "validation": ["aaaa000000000001"], "test": ["bbbb000000000000", "bbbb000000000001"]}


def write_csv(path: Path, rows: list[tuple[str, ...]], eol: str = "\n", header: str = HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((header + eol + "".join(",".join(r) + eol for r in rows)).encode())


def write_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", np.full((8, 8, 3), 100, np.uint8))
    assert ok
    path.write_bytes(buf.tobytes())


def make_tree(root: Path, *, release_dir: bool = True, images: Path | None = None, flat: bool = False) -> Path:
    meta = root / "2017_11" if release_dir else root
    meta.mkdir(parents=True, exist_ok=True)
    for name in ("classes-trainable.txt", "class-descriptions.csv"):
        shutil.copyfile(REL / name, meta / name)
    write_csv(meta / "train" / "annotations-human.csv", TRAIN_ROWS, eol="\r\n")
    write_csv(meta / "validation" / "annotations-human.csv", VAL_ROWS)
    write_csv(meta / "test" / "annotations-human.csv", TEST_ROWS)
    img_root = images if images is not None else root
    for split, ids in ON_DISK.items():
        folder = img_root if flat else img_root / split
        for i in ids:
            write_jpeg(folder / f"{i}.jpg")
        (folder / "notes.txt").write_text("not an image")
    return root


def records(plan, split: str) -> list[tuple[str, list[int], list[int]]]:
    return [(r.source_id, r.pos, r.neg) for r in plan.splits[split]]


# ------------------------------------------------------------------------------------ class files

def test_real_class_files():
    mids = openimages.read_trainable(REL / "classes-trainable.txt")
    assert len(mids) == 5000 and mids[0] == TRIVIA and mids[4999] == HELMET
    names = openimages.read_descriptions(REL / "class-descriptions.csv")
    assert len(names) == 19995
    assert names["/m/02wvth"] == 'Fiat 500 "topolino"'  # doubled quotes inside a quoted field
    assert names["/m/01c_0l"] == "Ducks, geese and swans"  # a quoted comma
    assert names["/m/0403mwp"] == "Thorns, spines, and prickles"
    assert names["/m/0411t3"] == "R. torre & company, inc."
    assert names["/m/01bw2t"] == "Lamborghini murciélago"  # UTF-8
    assert names["/m/022drf"] == "Pączki"
    assert names["/m/021grn"] == "Cuvier’s Beaked Whale"
    assert not any("\r" in n or "\n" in n for n in names.values())  # mixed CRLF / LF line ends


def test_classes_in_trainable_order(tmp_path: Path):
    classes, _ = openimages.read_classes(make_tree(tmp_path / "oi"))
    assert len(classes) == 5000
    assert classes[0] == {"index": 0, "id": TRIVIA, "name": "Isle of man tt"}
    assert classes[I_DUCKS] == {"index": I_DUCKS, "id": DUCKS, "name": "Ducks, geese and swans"}
    assert classes[2576] == {"index": 2576, "id": "/m/0403mwp", "name": "Thorns, spines, and prickles"}
    assert classes[416]["name"] == "Lamborghini murciélago" and classes[457]["name"] == "Smörgåsbord"
    assert classes[I_HELMET] == {"index": I_HELMET, "id": HELMET, "name": "Helmet"}


def test_trainable_mid_without_name_is_an_error(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    desc = root / "2017_11" / "class-descriptions.csv"
    desc.write_text("".join(ln for ln in desc.read_text(encoding="utf-8").splitlines(keepends=True)
                            if not ln.startswith(SKY + ",")), encoding="utf-8")
    with pytest.raises(IngestError, match=r"class-descriptions\.csv: no display name for 1 trainable MIDs .*/m/01bqvp"):
        openimages.plan(root)


# ---------------------------------------------------------------------------------- annotations

def test_readme_excerpt_exact(tmp_path: Path):
    # the 9 example rows of the official V3 README, all of one image
    excerpt = FIXTURES / "openimages_v3" / "readme-excerpts" / "v3" / "annotations-human.csv"
    parsed = openimages.parse_annotations(excerpt, openimages.read_trainable(REL / "classes-trainable.txt"))
    assert parsed.image_ids.to_pylist() == ["000026e7ee790996"]
    # positives /m/07j7r /m/01bqvp /m/0csby /m/01cbzq; negatives /m/04hgtk /m/01_m7 /m/01czv3 /m/01v4jb /m/03d1rd
    assert parsed.pos_classes.tolist() == [407, 442, 3559, 4152]
    assert parsed.neg_classes.tolist() == [464, 746, 966, 2248, 2763]
    assert parsed.rows == 9 and parsed.counts["non_trainable_rows"] == 0


@pytest.mark.parametrize("layout", ["release-dir", "root-files-flat-images", "images-with-split-folders"])
def test_exact_records_and_counts(tmp_path: Path, layout: str):
    root = tmp_path / "oi"
    if layout == "release-dir":
        make_tree(root)
        options = {}
        folder = {s: root / s for s in ON_DISK}
        prefix = {s: f"{s}/" for s in ON_DISK}
    elif layout == "root-files-flat-images":
        make_tree(root, release_dir=False, images=tmp_path / "flat", flat=True)
        options = {"images": tmp_path / "flat"}
        folder = {s: tmp_path / "flat" for s in ON_DISK}
        prefix = {s: "" for s in ON_DISK}
    else:
        make_tree(root, images=tmp_path / "imgs")
        options = {"images": tmp_path / "imgs"}
        folder = {s: tmp_path / "imgs" / s for s in ON_DISK}
        prefix = {s: f"{s}/" for s in ON_DISK}
    plan = openimages.plan(root, **options)
    assert plan.dataset == "openimages_v3" and plan.unlisted == UNLISTED_UNKNOWN
    assert list(plan.splits) == ["train", "validation", "test"]
    assert records(plan, "train") == TRAIN_WANT
    assert records(plan, "validation") == [("aaaa000000000001", [I_SKY, I_HELMET], [])]
    assert records(plan, "test") == [("bbbb000000000000", [I_DUCKS], []), ("bbbb000000000001", [], [I_TRIVIA])]
    assert plan.counts["train"] == TRAIN_COUNTS
    assert plan.counts["test"]["listed"] == 2 and plan.counts["test"]["skipped"] == {"no_trainable_label": 0,
                                                                                      "not_on_disk": 0}
    r = next(iter(plan.splits["train"]))
    assert r.rel_path == f"{prefix['train']}0000000000000002.jpg"
    assert r.path == f"{folder['train']}/0000000000000002.jpg" and Path(r.path).is_file()
    assert r.meta == {}
    assert plan.source["image_layout"] == ("flat" if layout == "root-files-flat-images" else "split-folders")
    # sized and re-iterable (the writer may iterate twice when it resumes)
    assert len(plan.splits["train"]) == 3 and records(plan, "train") == TRAIN_WANT


def test_streaming_across_many_small_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = make_tree(tmp_path / "oi")
    monkeypatch.setattr(openimages, "_BLOCK", 128)  # ~2 rows per record batch: images span batches
    monkeypatch.setattr(openimages, "_YIELD_CHUNK", 2)  # several chunks while yielding
    plan = openimages.plan(root, splits=["train"])
    assert list(plan.splits) == ["train"]
    assert records(plan, "train") == TRAIN_WANT
    assert plan.counts["train"] == TRAIN_COUNTS


def test_bigger_random_csv_matches_a_plain_python_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(3)
    mids = openimages.read_trainable(REL / "classes-trainable.txt")
    pool = mids[:40] + ["/m/not_trainable_1", "/m/not_trainable_2"]
    ids = [f"{x:016x}" for x in rng.integers(0, 2**62, 300)]
    rows = [(ids[i], "verification", pool[c], str(v))
            for i, c, v in zip(rng.integers(0, 300, 3000), rng.integers(0, 42, 3000), rng.integers(0, 2, 3000))]
    path = tmp_path / "a.csv"
    write_csv(path, rows)
    monkeypatch.setattr(openimages, "_BLOCK", 4096)
    parsed = openimages.parse_annotations(path, mids)
    # reference: per (image, class) the set of values; {0, 1} = conflict -> unknown
    seen: dict[tuple[str, int], set[str]] = {}
    for i, _, m, v in rows:
        if m in mids:
            seen.setdefault((i, mids.index(m)), set()).add(v)
    want: dict[str, tuple[list[int], list[int]]] = {i: ([], []) for i, _, _, _ in rows}
    for (i, c), vals in sorted(seen.items()):
        if vals == {"1"}:
            want[i][0].append(c)
        elif vals == {"0"}:
            want[i][1].append(c)
    recs = openimages.SplitRecords(parsed, np.ones(len(parsed.image_ids), bool), tmp_path, "")
    got = {r.source_id: (r.pos, r.neg) for r in recs}
    assert list(got) == sorted(want)
    assert got == want


def test_confidence_other_than_0_or_1_names_line(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    rows = list(TRAIN_ROWS)
    rows[2] = ("00000000000e1234", "machine", TREE, "0.5")
    write_csv(root / "2017_11" / "train" / "annotations-human.csv", rows, eol="\r\n")
    with pytest.raises(IngestError, match=r"train/annotations-human\.csv:4: Confidence 0\.5 is neither 1"):
        openimages.plan(root)


@pytest.mark.parametrize("image_id", ["../../secret", "a/b"])
def test_image_id_that_is_not_a_file_name_is_refused(tmp_path: Path, image_id: str):
    root = make_tree(tmp_path / "oi")
    rows = list(TRAIN_ROWS)
    rows[2] = (image_id, "verification", TREE, "1")
    write_csv(root / "2017_11" / "train" / "annotations-human.csv", rows, eol="\r\n")
    with pytest.raises(IngestError, match=rf"train/annotations-human\.csv:4: ImageID {re.escape(repr(image_id))} "
                                          r"is not a plain file name"):
        openimages.plan(root)


def test_non_numeric_confidence_names_line(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    # a malformed row first: it must not shift the reported line
    rows = [VAL_ROWS[0], ("x", "y"), ("aaaa000000000001", "verification", TREE, "yes")]
    write_csv(root / "2017_11" / "validation" / "annotations-human.csv", rows)
    with pytest.raises(IngestError, match=r"validation/annotations-human\.csv:4: Confidence 'yes' is not a number"):
        openimages.plan(root)


def test_bad_confidence_after_a_malformed_row_names_the_right_line(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    rows = [VAL_ROWS[0], ("x", "y"), ("aaaa000000000001", "verification", TREE, "2")]
    write_csv(root / "2017_11" / "validation" / "annotations-human.csv", rows)
    with pytest.raises(IngestError, match=r"validation/annotations-human\.csv:4: Confidence 2 is neither"):
        openimages.plan(root)


def test_empty_field_names_line(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    path = root / "2017_11" / "validation" / "annotations-human.csv"
    write_csv(path, VAL_ROWS + [("", "verification", SKY, "1")])
    with pytest.raises(IngestError, match=r"validation/annotations-human\.csv:4: empty ImageID, LabelName or "):
        openimages.plan(root)


def test_malformed_row_skipped_and_counted_or_fatal_under_strict(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    path = root / "2017_11" / "validation" / "annotations-human.csv"
    write_csv(path, VAL_ROWS[:1] + [("aaaa000000000001", "verification", TREE, "1", "extra")] + VAL_ROWS[1:])
    plan = openimages.plan(root)
    assert records(plan, "validation") == [("aaaa000000000001", [I_SKY, I_HELMET], [])]
    assert plan.counts["validation"]["malformed_rows"] == 1 and plan.counts["validation"]["rows"] == 2
    with pytest.raises(IngestError, match=r"validation/annotations-human\.csv:3: expected 4 fields, got 5"):
        openimages.plan(root, strict=True)


def test_bad_header(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    write_csv(root / "2017_11" / "test" / "annotations-human.csv", TEST_ROWS, header="ImageID,Source,Label,Confidence")
    with pytest.raises(IngestError, match=r"test/annotations-human\.csv:1: header must name ImageID, LabelName"):
        openimages.plan(root)


def test_missing_split_file_and_splits_option(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    (root / "2017_11" / "validation" / "annotations-human.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"validation/annotations-human\.csv not found"):
        openimages.plan(root)
    plan = openimages.plan(root, splits="test,train")
    assert list(plan.splits) == ["test", "train"] and records(plan, "train") == TRAIN_WANT
    with pytest.raises(SystemExit, match="--splits must be"):
        openimages.plan(root, splits="train,val")


def test_header_only_csv_gives_an_empty_split(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    write_csv(root / "2017_11" / "validation" / "annotations-human.csv", [])
    plan = openimages.plan(root)
    assert records(plan, "validation") == [] and len(plan.splits["validation"]) == 0
    assert plan.counts["validation"]["listed"] == 0 and plan.counts["validation"]["rows"] == 0


def test_help_explains_the_layout():
    p = argparse.ArgumentParser(description=openimages.DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    openimages.add_arguments(p)
    text = p.format_help()
    for needle in ("classes-trainable.txt", "class-descriptions.csv", "2017_11/", "annotations-human.csv",
                   "<ImageID>.jpg", "--images", "--splits"):
        assert needle in text
    assert p.parse_args([]).root == Path(".")  # the command line's default


def test_missing_image_folder_counts_everything_not_on_disk(tmp_path: Path):
    root = make_tree(tmp_path / "oi")
    shutil.rmtree(root / "test")
    plan = openimages.plan(root)
    assert records(plan, "test") == []
    assert plan.counts["test"]["skipped"] == {"no_trainable_label": 0, "not_on_disk": 2}


# ------------------------------------------------------------------------------------ end to end

def test_write_dataset_end_to_end(tmp_path: Path):
    writer = pytest.importorskip("largeloss.shards.writer")
    root = make_tree(tmp_path / "oi")
    plan = openimages.plan(root)
    out = tmp_path / "out"
    manifest = writer.write_dataset(out, plan, shard_size=2, progress=False)
    with ipc.open_file(out / "train" / "labels.arrow") as f:
        table = f.read_all()
    assert table.schema.metadata[b"unlisted"] == b"unknown"
    assert table.column("pos").to_pylist() == [w[1] for w in TRAIN_WANT]
    assert table.column("neg").to_pylist() == [w[2] for w in TRAIN_WANT]
    assert table.column("sample").to_pylist() == [0, 1, 2]
    c = manifest.counts["train"]
    assert (c["listed"], c["written"], c["missing"], c["corrupt"]) == (6, 3, 0, 0)
    assert c["skipped"] == {"no_trainable_label": 2, "not_on_disk": 1}
    assert c["listed"] == c["written"] + c["missing"] + c["corrupt"] + sum(c["skipped"].values())
    assert manifest.splits["validation"].num_samples == 1 and manifest.splits["test"].num_samples == 2
    assert manifest.classes[I_DUCKS]["name"] == "Ducks, geese and swans"
    # known labels per class of train: sky known on 2 images (a negative and a positive), helmet on none
    known = manifest.splits["train"].known_per_class
    assert (known[I_SKY], known[I_TREE], known[I_TRIVIA], known[I_DUCKS], known[I_HELMET]) == (2, 1, 1, 1, 0)
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["source"]["conflict_rule"].startswith("an (image, class) pair with both 1 and 0 rows")
