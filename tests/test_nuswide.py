"""ingest/nuswide.py: generated official trees (CRLF and LF), the npy source, and every error path."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_protocols import cole_reference

from conftest import FIXTURES
from largeloss.ingest import nuswide
from largeloss.shards.format import UNLISTED_NEGATIVE, IngestError
from largeloss.shards.labels import read_labels
from largeloss.shards.protocols import single_positive, train_val_split

CONCEPTS_FILE = FIXTURES / "nuswide" / "ConceptsList" / "Concepts81.txt"  # real, CRLF
CONCEPTS = CONCEPTS_FILE.read_text(encoding="utf-8").split()


# train: 4 images; positives by concept name (everything else 0)
TRAIN = [
    ("actor\\0001_2124494179.jpg", ["airport", "zebra"]),
    ("actor\\0002_174174086.jpg", []),  # no positive
    ("zebra\\0001_1111.jpg", ["animal", "sky", "water"]),
    ("sky\\0003_42.jpg", ["sky"]),
]
TEST = [
    ("water\\0007_99.jpg", []),
    ("water\\0008_100.jpg", ["water"]),
]


def make_tree(root: Path, eol: str, concepts_at_root: bool = False) -> Path:
    def write(path: Path, lines: list[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes("".join(s + eol for s in lines).encode("utf-8"))

    concept_lines = CONCEPTS_FILE.read_bytes().decode().splitlines()
    write(root / ("Concepts81.txt" if concepts_at_root else "ConceptsList/Concepts81.txt"), concept_lines)
    for split, items in (("Train", TRAIN), ("Test", TEST)):
        write(root / "ImageList" / f"{split}Imagelist.txt", [p for p, _ in items])
        for c in CONCEPTS:
            write(root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{split}.txt",
                  ["1" if c in pos else "0" for _, pos in items])
    return root


# 0-based class indices in the real Concepts81.txt: airport 0, animal 1, sky 55, water 75, zebra 80
def idx(*names: str) -> list[int]:
    return sorted(CONCEPTS.index(n) for n in names)


def test_real_concepts_crlf():
    assert CONCEPTS_FILE.read_bytes().count(b"\r\n") == 81
    classes = nuswide.read_concepts(CONCEPTS_FILE)
    assert len(classes) == 81
    assert classes[0] == {"index": 0, "id": "airport", "name": "airport"}
    assert classes[80] == {"index": 80, "id": "zebra", "name": "zebra"}
    assert all("\r" not in c["name"] for c in classes)


@pytest.mark.parametrize("eol,at_root", [("\r\n", False), ("\n", True)])
def test_official_tree_exact(tmp_path: Path, eol: str, at_root: bool):
    root = make_tree(tmp_path / "nus", eol, concepts_at_root=at_root)
    plan = nuswide.plan(root)
    assert plan.dataset == "nuswide" and plan.unlisted == UNLISTED_NEGATIVE
    assert [c["name"] for c in plan.classes] == CONCEPTS
    train = plan.splits["train"]
    # list order; the image without a positive (line 2) is kept, as in Cole et al.'s files
    assert [r.source_id for r in train] == ["actor/0001_2124494179.jpg", "actor/0002_174174086.jpg",
                                            "zebra/0001_1111.jpg", "sky/0003_42.jpg"]
    assert [r.pos for r in train] == [idx("airport", "zebra"), [], idx("animal", "sky", "water"), idx("sky")]
    assert [r.pos for r in train] == [[0, 80], [], [1, 55, 75], [55]]
    assert all(r.neg == [] for r in train)
    assert [r.meta for r in train] == [{"list_line": 1}, {"list_line": 2}, {"list_line": 3}, {"list_line": 4}]
    assert train[0].rel_path == "actor/0001_2124494179.jpg"
    assert train[0].path == str(root / "Flickr" / "actor" / "0001_2124494179.jpg")
    assert plan.counts == {"train": {"listed": 4, "no_positive": 1, "skipped": {}},
                           "test": {"listed": 2, "no_positive": 1, "skipped": {}}}
    assert [(t.source_id, t.pos, t.meta) for t in plan.splits["test"]] == [
        ("water/0007_99.jpg", [], {"list_line": 1}), ("water/0008_100.jpg", [75], {"list_line": 2})]
    assert plan.source["drop_no_positive"] is False
    assert plan.source["labels_from"] == "official-lists"


def test_drop_no_positive_and_images_dir(tmp_path: Path):
    root = make_tree(tmp_path / "nus", "\n")
    plan = nuswide.plan(root, drop_no_positive=True, images=tmp_path / "img")
    train = plan.splits["train"]
    # line 2 (no positive) dropped and counted: not Cole et al.'s protocol, opt-in
    assert [r.pos for r in train] == [[0, 80], [1, 55, 75], [55]]
    assert [r.meta["list_line"] for r in train] == [1, 3, 4]
    assert train[0].path == str(tmp_path / "img" / "actor" / "0001_2124494179.jpg")
    assert [r.source_id for r in plan.splits["test"]] == ["water/0008_100.jpg"]
    assert plan.counts == {"train": {"listed": 4, "no_positive": 1, "skipped": {"no_positive": 1}},
                           "test": {"listed": 2, "no_positive": 1, "skipped": {"no_positive": 1}}}
    assert plan.source["drop_no_positive"] is True


def test_length_mismatch_names_file_and_both_lengths(tmp_path: Path):
    root = make_tree(tmp_path / "nus", "\r\n")
    f = root / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Train.txt"
    f.write_bytes(b"0\r\n1\r\n0\r\n")
    with pytest.raises(IngestError, match=r"Labels_sky_Train\.txt: 3 labels but the image list has 4 lines"):
        nuswide.plan(root)


def test_bad_value_names_file_and_line(tmp_path: Path):
    root = make_tree(tmp_path / "nus", "\r\n")
    f = root / "Groundtruth" / "TrainTestLabels" / "Labels_water_Test.txt"
    f.write_bytes(b"0\r\n2\r\n")
    with pytest.raises(IngestError, match=r"Labels_water_Test\.txt:2: label '2' is not 0 or 1"):
        nuswide.plan(root)


def test_missing_label_file_and_concepts(tmp_path: Path):
    root = make_tree(tmp_path / "nus", "\n")
    (root / "Groundtruth" / "TrainTestLabels" / "Labels_zebra_Test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Labels_zebra_Test\.txt: label file not found"):
        nuswide.plan(root)
    (root / "ConceptsList" / "Concepts81.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Concepts81.txt not found"):
        nuswide.plan(root)


def test_duplicate_concept_is_an_error(tmp_path: Path):
    f = tmp_path / "Concepts81.txt"
    f.write_bytes(b"sky\r\nwater\r\nsky\r\n")
    with pytest.raises(IngestError, match=r"Concepts81\.txt:3: concept 'sky' repeats line 1"):
        nuswide.read_concepts(f)


def test_from_npy(tmp_path: Path):
    npy = tmp_path / "cole"
    npy.mkdir()
    (npy / "Concepts81.txt").write_bytes(CONCEPTS_FILE.read_bytes())
    tr_labels = np.zeros((3, 81), np.float64)
    tr_labels[0, [3, 10]] = 1.0
    tr_labels[2, 80] = 1.0
    np.save(npy / "formatted_train_images.npy", np.array(["a/1_1.jpg", "a/2_2.jpg", "b/3_3.jpg"]))
    np.save(npy / "formatted_train_labels.npy", tr_labels)
    va_labels = np.zeros((1, 81), np.int64)
    va_labels[0, 0] = 1
    np.save(npy / "formatted_val_images.npy", np.array(["c\\4_4.jpg"]))
    np.save(npy / "formatted_val_labels.npy", va_labels)
    plan = nuswide.plan(from_npy=npy)
    assert plan.source["labels_from"] == "cole-npy"
    # every npy row, the one without a positive (row 1) included: the rows are Cole et al.'s sample order
    assert [(r.source_id, r.pos, r.meta) for r in plan.splits["train"]] == [
        ("a/1_1.jpg", [3, 10], {"npy_row": 0}), ("a/2_2.jpg", [], {"npy_row": 1}), ("b/3_3.jpg", [80], {"npy_row": 2})]
    assert plan.splits["train"][0].path == str(npy / "Flickr" / "a" / "1_1.jpg")
    assert [(r.source_id, r.pos) for r in plan.splits["test"]] == [("c/4_4.jpg", [0])]
    assert plan.counts["train"] == {"listed": 3, "no_positive": 1, "skipped": {}}
    dropped = nuswide.plan(from_npy=npy, drop_no_positive=True)
    assert [r.meta["npy_row"] for r in dropped.splits["train"]] == [0, 2]
    assert dropped.counts["train"] == {"listed": 3, "no_positive": 1, "skipped": {"no_positive": 1}}

    tr_labels[1, 5] = 0.5
    np.save(npy / "formatted_train_labels.npy", tr_labels)
    with pytest.raises(IngestError, match=r"formatted_train_labels\.npy: row 1 \(0-based\), column 5 .* not 0 or 1"):
        nuswide.plan(from_npy=npy)
    np.save(npy / "formatted_train_labels.npy", np.zeros((2, 81)))
    with pytest.raises(IngestError, match=r"expected a 3 x 81 matrix"):
        nuswide.plan(from_npy=npy)


@pytest.mark.parametrize("entry", ["..\\..\\secret.jpg", "/etc/secret.jpg"])
def test_list_path_that_leaves_the_image_folder_is_refused(tmp_path: Path, entry: str):
    root = make_tree(tmp_path / "nus", "\r\n")
    lst = root / "ImageList" / "TrainImagelist.txt"
    lines = lst.read_text().splitlines()
    lines[2] = entry
    lst.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    with pytest.raises(IngestError, match=rf"^{lst}:3: image path '{re.escape(entry.replace(chr(92), '/'))}' leaves "
                                          r"the image folder"):
        nuswide.plan(root)
    npy = tmp_path / "npy"
    npy.mkdir()
    for prefix in ("formatted_train", "formatted_val"):
        np.save(npy / f"{prefix}_images.npy", np.array(["a/1.jpg", entry]))
        np.save(npy / f"{prefix}_labels.npy", np.ones((2, len(CONCEPTS)), np.int64))
    with pytest.raises(IngestError, match=r"formatted_train_images\.npy: entry 1 \(0-based\): image path"):
        nuswide.plan(root, from_npy=npy)


def test_needs_a_source():
    with pytest.raises(SystemExit, match="--root DIR .* or --from-npy DIR"):
        nuswide.plan()


def test_write_dataset_end_to_end(tmp_path: Path):
    import cv2
    import pyarrow.ipc as ipc

    from largeloss.shards.writer import write_dataset

    root = make_tree(tmp_path / "nus", "\r\n")
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    for entry, _ in TRAIN + TEST:
        if entry != "sky\\0003_42.jpg":  # this one is gone from Flickr: counted missing by the writer
            path = root / "Flickr" / entry.replace("\\", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buf.tobytes())
    plan = nuswide.plan(root)
    manifest = write_dataset(tmp_path / "out", plan, shard_size=2, progress=False)
    with ipc.open_file(tmp_path / "out" / "train" / "labels.arrow") as f:
        table = f.read_all()
    # sample 1 (list line 2) has no positive and stays, as in Cole et al.'s files
    assert table.column("pos").to_pylist() == [[0, 80], [], [1, 55, 75]]
    c = manifest.counts["train"]
    assert (c["listed"], c["written"], c["missing"], c["no_positive"], c["skipped"]) == (4, 3, 1, 1, {})
    assert manifest.source["labels_from"] == "official-lists"

    # What training makes of it, as Cole et al.'s code does: the row without a positive gets no observed
    # label (its RandomState draws still advance, so the next rows get the reference's choice), and the
    # seed-1200 80/20 cut runs over all three rows.
    truth = read_labels(tmp_path / "out" / "train" / "labels.arrow", 81)
    obs = single_positive(truth)
    assert np.diff(obs.pos_offsets).tolist() == [1, 0, 1]
    assert (obs.dense(range(3)) == cole_reference(truth.dense(range(3)).clip(0, 1))).all()
    train_ids, val_ids = train_val_split(manifest.splits["train"].num_samples)
    assert sorted(train_ids.tolist() + val_ids.tolist()) == [0, 1, 2] and len(val_ids) == 1  # round(0.2 * 3)
