"""ingest/coco.py: class order and parse of the real (subset) jsons, exact records of a generated tree."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import FIXTURES
from largeloss.ingest import coco
from largeloss.shards.format import UNLISTED_NEGATIVE, IngestError

COCO = FIXTURES / "coco2014"


def real_categories() -> list[dict]:
    return json.loads((COCO / "annotations" / "instances_val2014.json").read_text())["categories"]


def write_jpeg(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), 128, np.uint8))
    assert ok
    path.write_bytes(buf.tobytes())


def image(iid: int, folder: str, w: int = 32, h: int = 24) -> dict:
    return {"license": 1, "file_name": f"COCO_{folder}_{iid:012d}.jpg", "coco_url": "http://x", "height": h,
            "width": w, "date_captured": "2013-11-14 11:18:45", "flickr_url": "http://y", "id": iid}


def ann(aid: int, iid: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
    seg = {"counts": [0, 5, 3], "size": [24, 32]} if crowd else [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]
    return {"segmentation": seg, "area": 10.0, "iscrowd": crowd, "image_id": iid, "bbox": bbox,
            "category_id": cat, "id": aid}


def make_tree(root: Path, train_images: list[dict], train_anns: list[dict], val_images: list[dict],
              val_anns: list[dict], categories: list[dict] | None = None) -> Path:
    cats = categories if categories is not None else real_categories()
    for folder, imgs, anns in (("train2014", train_images, train_anns), ("val2014", val_images, val_anns)):
        d = {"info": {"year": 2014}, "images": imgs, "licenses": [], "annotations": anns, "categories": cats}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(d))
        for im in imgs:
            write_jpeg(root / folder / im["file_name"], im["width"], im["height"])
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    # COCO category ids -> class index (real categories): 1 person -> 0, 3 car -> 2, 13 stop sign -> 11,
    # 18 dog -> 16, 90 toothbrush -> 79
    train_images = [image(9, "train2014", 40, 30), image(25, "train2014"), image(100, "train2014"),
                    image(1000, "train2014"), image(7, "train2014")]
    train_anns = [
        ann(501, 9, 18, [1.5, 2.0, 10.0, 4.25]),
        ann(500, 9, 1, [0.0, 0.0, 5.0, 5.0]),
        ann(502, 9, 18, [3.0, 3.0, 1.0, 1.0]),  # same class twice: one positive, two boxes
        ann(510, 25, 13, [2.0, 4.0, 8.0, 8.0], crowd=1),  # crowd only: still positive
        ann(520, 100, 90, [0.25, 0.5, 2.0, 2.0]),
        ann(521, 1000, 3, [4.0, 4.0, 4.0, 4.0]),
        # image 7 has no annotation
    ]
    val_images = [image(42, "val2014"), image(73, "val2014")]
    val_anns = [ann(900, 73, 1, [1.0, 1.0, 2.0, 2.0]), ann(901, 73, 3, [2.0, 2.0, 2.0, 2.0], crowd=1)]
    return make_tree(tmp_path / "coco", train_images, train_anns, val_images, val_anns)


def test_fixture_class_order_and_parse():
    plan = coco.plan(COCO)
    assert plan.dataset == "coco2014" and plan.unlisted == UNLISTED_NEGATIVE
    assert len(plan.classes) == 80
    assert [c["index"] for c in plan.classes] == list(range(80))
    assert plan.classes[0] == {"index": 0, "id": 1, "name": "person"}
    assert plan.classes[11] == {"index": 11, "id": 13, "name": "stop sign"}  # id 12 is a gap
    assert plan.classes[79] == {"index": 79, "id": 90, "name": "toothbrush"}
    ids = [c["id"] for c in plan.classes]
    assert ids == sorted(ids) and 12 not in ids and 26 not in ids and 83 not in ids
    # the subset jsons keep the first 100 images and the first 100 annotations: only one pair joins
    assert plan.splits["train"] == []
    (rec,) = plan.splits["test"]
    assert rec.source_id == "173350"
    assert rec.rel_path == "val2014/COCO_val2014_000000173350.jpg"
    assert rec.path == str(COCO / "val2014" / "COCO_val2014_000000173350.jpg")
    assert rec.pos == [16] and rec.neg == []  # category 18 = dog
    assert rec.meta == {"width": 640, "height": 480,
                        "boxes": [{"class": 16, "bbox": [266.67, 0.0, 266.67 + 201.69, 269.58], "iscrowd": 0}]}
    assert plan.counts["train"] == {"listed": 100, "skipped": {"no_annotations": 100}, "annotations_unknown_image": 100}
    assert plan.counts["test"] == {"listed": 100, "skipped": {"no_annotations": 99}, "annotations_unknown_image": 99}


def test_fixture_segmentations_are_dropped_while_parsing():
    d = coco.load_instances(COCO / "annotations" / "instances_val2014.json")
    assert "segmentation" not in d["annotations"][0] and "coco_url" not in d["images"][0]
    assert set(d["annotations"][0]) == {"area", "iscrowd", "image_id", "bbox", "category_id", "id"}


def test_generated_tree_exact_records(tree: Path):
    plan = coco.plan(tree)
    train = plan.splits["train"]
    # string order of the ids: "100" < "1000" < "25" < "9"; image 7 (no annotation) dropped
    assert [r.source_id for r in train] == ["100", "1000", "25", "9"]
    assert [r.pos for r in train] == [[79], [2], [11], [0, 16]]
    assert all(r.neg == [] for r in train)
    r9 = train[3]
    assert r9.rel_path == "train2014/COCO_train2014_000000000009.jpg"
    assert r9.path == str(tree / "train2014" / "COCO_train2014_000000000009.jpg")
    # boxes in annotation-id order (500, 501, 502), [x, y, w, h] -> [x, y, x + w, y + h]
    assert r9.meta == {"width": 40, "height": 30, "boxes": [
        {"class": 0, "bbox": [0.0, 0.0, 5.0, 5.0], "iscrowd": 0},
        {"class": 16, "bbox": [1.5, 2.0, 11.5, 6.25], "iscrowd": 0},
        {"class": 16, "bbox": [3.0, 3.0, 4.0, 4.0], "iscrowd": 0},
    ]}
    assert train[2].meta["boxes"] == [{"class": 11, "bbox": [2.0, 4.0, 10.0, 12.0], "iscrowd": 1}]
    assert plan.counts["train"] == {"listed": 5, "skipped": {"no_annotations": 1}}

    (r73,) = plan.splits["test"]  # val2014 -> test; 42 has no annotation
    assert (r73.source_id, r73.pos, r73.rel_path) == ("73", [0, 2], "val2014/COCO_val2014_000000000073.jpg")
    assert plan.counts["test"] == {"listed": 2, "skipped": {"no_annotations": 1}}
    assert plan.source["files"] == [str(tree / "annotations" / "instances_train2014.json"),
                                    str(tree / "annotations" / "instances_val2014.json")]


def test_keep_empty(tree: Path):
    plan = coco.plan(tree, keep_empty=True)
    train = plan.splits["train"]
    assert [r.source_id for r in train] == ["100", "1000", "25", "7", "9"]
    assert train[3].pos == [] and train[3].meta == {"width": 32, "height": 24, "boxes": []}
    assert [r.source_id for r in plan.splits["test"]] == ["42", "73"]
    assert plan.counts["train"] == {"listed": 5, "skipped": {"no_annotations": 0}}


def test_unknown_category_is_an_error(tmp_path: Path):
    root = make_tree(tmp_path, [image(1, "train2014")], [ann(5, 1, 12, [0, 0, 1, 1])], [image(2, "val2014")], [])
    with pytest.raises(IngestError, match=r"instances_train2014\.json: annotations\[0\] \(id 5\) has category_id 12"):
        coco.plan(root)


def test_annotation_of_unlisted_image_skipped_or_fatal_under_strict(tmp_path: Path):
    root = make_tree(tmp_path, [image(1, "train2014")], [ann(5, 1, 1, [0, 0, 1, 1]), ann(6, 99, 3, [0, 0, 1, 1])],
                     [image(2, "val2014")], [ann(7, 2, 1, [0, 0, 1, 1])])
    plan = coco.plan(root)
    assert [(r.source_id, r.pos) for r in plan.splits["train"]] == [("1", [0])]
    assert plan.counts["train"] == {"listed": 1, "skipped": {"no_annotations": 0}, "annotations_unknown_image": 1}
    with pytest.raises(IngestError, match=r"annotations\[1\] \(id 6\) refers to image_id 99"):
        coco.plan(root, strict=True)


def test_category_lists_must_agree(tmp_path: Path):
    root = make_tree(tmp_path, [image(1, "train2014")], [], [image(2, "val2014")], [])
    val = root / "annotations" / "instances_val2014.json"
    d = json.loads(val.read_text())
    d["categories"] = d["categories"][1:] + d["categories"][:1]
    val.write_text(json.dumps(d))
    with pytest.raises(IngestError, match="instances_val2014.json: 'categories' differ"):
        coco.plan(root)


@pytest.mark.parametrize("file_name, reason", [
    ("../../secret.jpg", "leaves the image folder"),
    ("/etc/secret.jpg", "leaves the image folder"),
    ("a/../../b.jpg", "leaves the image folder"),
    ("x\x00.jpg", "is not a file name (NUL byte)"),
])
def test_file_name_that_leaves_the_image_folder_is_refused(tmp_path: Path, file_name: str, reason: str):
    root = make_tree(tmp_path / "coco", [image(9, "train2014")], [ann(1, 9, 1, [0.0, 0.0, 2.0, 2.0])], [], [])
    path = root / "annotations" / "instances_train2014.json"
    d = json.loads(path.read_text())
    d["images"][0]["file_name"] = file_name
    path.write_text(json.dumps(d))
    with pytest.raises(IngestError, match=rf"^{path}: images\[0\] \(id 9\): image path {re.escape(repr(file_name))} "
                                          rf"{re.escape(reason)}"):
        coco.plan(root)


def test_missing_json_and_bad_json(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"instances_train2014\.json: not found"):
        coco.plan(tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2014.json").write_text('{"images": [\n{"id": 1,}')
    with pytest.raises(IngestError, match=r"instances_train2014\.json:2:\d+: invalid JSON"):
        coco.plan(tmp_path)


def test_write_dataset_end_to_end(tree: Path, tmp_path: Path):
    import pyarrow.ipc as ipc

    from largeloss.shards.writer import write_dataset

    plan = coco.plan(tree)
    manifest = write_dataset(tmp_path / "out", plan, shard_size=3, progress=False)
    with ipc.open_file(tmp_path / "out" / "train" / "labels.arrow") as f:
        table = f.read_all()
    assert table.schema.metadata[b"unlisted"] == b"negative"
    assert table.column("pos").to_pylist() == [[79], [2], [11], [0, 16]]
    assert table.column("neg").to_pylist() == [[], [], [], []]
    c = manifest.counts["train"]
    assert (c["listed"], c["written"], c["missing"], c["corrupt"], c["skipped"]) == (5, 4, 0, 0, {"no_annotations": 1})
    assert manifest.splits["test"].num_samples == 1
    assert [x["id"] for x in manifest.classes][:3] == [1, 2, 3] and manifest.num_classes == 80
