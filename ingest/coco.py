"""``ingest coco``: MS COCO (2014 by default) instance annotations -> multi-label records.

Conventions
===========

- **Classes**: the order of ``categories`` in ``instances_train<year>.json`` (COCO 2014: 80 categories
  with ids 1..90 and gaps) gives the dense indices 0..79; ``id`` is the COCO category id, ``name`` the
  category name. ``instances_val<year>.json`` must list the same categories in the same order.
- **Labels**: an image is positive for a class if any of its annotations has that category, crowd
  annotations (``iscrowd: 1``, RLE segmentation) included; every other class is negative
  (``unlisted = negative``: COCO annotates all 80 categories exhaustively).
- **Images without annotations** are dropped, as in the protocol of Cole et al., and counted per split
  as ``skipped.no_annotations``; ``--keep-empty`` keeps them as all-negative samples. ``listed`` is the
  number of images in the json, so ``listed = written + missing + corrupt + skipped.no_annotations``.
  Annotations of image ids that ``images`` does not list (only seen in truncated copies) are skipped
  and counted as ``annotations_unknown_image``; fatal under ``--strict``.
- **Splits**: ``train<year>`` -> ``train``, ``val<year>`` -> ``test`` (the 80/20 train/val cut is made
  later from ``train``).
- **Order**: images sorted by image id *compared as decimal strings* ("100" < "25"), which is the order
  of Cole et al.'s ``format_coco.py`` (it sorts ``str(image_id)``); keeping it means that the 80/20 cut
  with ``RandomState(1200)`` over sample ids selects the same images as the reference code.
- **Metadata** per image: ``width``/``height`` from the json, and ``boxes`` in annotation-id order as
  ``{"class", "bbox": [x, y, x + w, y + h], "iscrowd"}`` (COCO's ``bbox`` is ``[x, y, w, h]`` in
  absolute float pixels; the sum is plain float arithmetic, no rounding).
- Images are not opened here: ``path`` names the file and the writer counts missing/corrupt ones. A
  ``file_name`` that would leave the image folder (absolute, ``..``) is an error naming the json and
  the entry (``shards.format.source_path``).

Memory
======

``instances_train2014.json`` is about 450 MB of text (82,783 images, 604,907 annotations); a plain
``json.load`` turns it into several GB of Python objects, mostly the polygon lists of ``segmentation``.
The loader drops ``segmentation`` and the unused image fields while the parser builds each object
(``object_pairs_hook``), so each polygon is freed right after it is parsed, and then packs what is
left into numpy arrays before the next file is read. Peak memory is the text of one file plus the
slimmed objects of that file. ``tests/bench/ingest.py --part coco`` measures it on a generated json of
the real size (the README's benchmark table).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..shards.format import UNLISTED_NEGATIVE, IngestError, IngestPlan, Record, source_path

NAME = "coco"
HELP = "MS COCO 2014 instances json -> 80-class multi-label shards (boxes kept in the sample json)"
DESCRIPTION = """\
Ingest MS COCO (2014 by default) for multi-label classification.

Expected layout under --root (the official zips extracted side by side):

  ROOT/annotations/instances_train2014.json
  ROOT/annotations/instances_val2014.json
  ROOT/train2014/COCO_train2014_000000000009.jpg ...
  ROOT/val2014/COCO_val2014_000000000042.jpg ...

train2014 becomes split "train", val2014 split "test". Classes follow the order of "categories"
(80 classes, COCO ids 1..90 with gaps). An image is positive for every category it has an annotation
of (crowd annotations included); all other classes are negative. Images without any annotation are
dropped and counted (--keep-empty keeps them). Samples are in image-id order compared as strings, the
order of Cole et al.'s format_coco.py. Boxes go to each sample's json as [xmin, ymin, xmax, ymax].
"""

log = logging.getLogger(__name__)

#: image fields that are not needed, dropped while parsing (with ``segmentation`` of annotations)
_DROP_KEYS = frozenset({"segmentation", "coco_url", "flickr_url", "date_captured", "license"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, metavar="DIR",
                        help="folder holding annotations/ and the <split><year>/ image folders")
    parser.add_argument("--year", default="2014", metavar="YEAR",
                        help="release year in the file and folder names (default 2014)")
    parser.add_argument("--keep-empty", action="store_true",
                        help="keep images without any annotation as all-negative samples "
                             "(default: drop them, as the protocol does, and count them)")


def _slim_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in pairs if k not in _DROP_KEYS}


def load_instances(path: Path) -> dict[str, Any]:
    """Parse an ``instances_*.json`` without keeping segmentations or unused image fields."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_slim_object)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: not found; --root must hold annotations/instances_<split><year>.json "
            f"(unzip annotations_trainval<year>.zip there)") from None
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); the file is damaged or "
                          f"truncated, download and extract it again") from e


def parse_categories(cats: Any, where: Path) -> list[dict[str, Any]]:
    if not isinstance(cats, list) or not cats:
        raise IngestError(f"{where}: 'categories' must be a non-empty list; is this an instances_*.json?")
    classes = []
    seen_ids: set[int] = set()
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise IngestError(f"{where}: categories[{i}] must have an integer 'id' and a string 'name', got {c!r}")
        if c["id"] in seen_ids:
            raise IngestError(f"{where}: categories[{i}] repeats category id {c['id']}")
        seen_ids.add(c["id"])
        classes.append({"index": i, "id": c["id"], "name": c["name"]})
    return classes


def _image_order_key(image_id: int) -> str:
    # Cole et al. sort str(image_id): "100" < "25". See the module docstring.
    return str(image_id)


def split_records(data: dict[str, Any], where: Path, image_dir: Path, rel_dir: str,
                  cat_index: dict[int, int], *, keep_empty: bool, strict: bool
                  ) -> tuple[list[Record], dict[str, Any]]:
    """Records of one instances json (in the documented order) and the split's counts."""
    images = data.get("images")
    anns = data.get("annotations")
    if not isinstance(images, list) or not isinstance(anns, list):
        raise IngestError(f"{where}: 'images' and 'annotations' must be lists; is this an instances_*.json?")

    by_id: dict[int, tuple[str, str, int, int]] = {}
    for i, im in enumerate(images):
        try:
            iid, fname, w, h = im["id"], im["file_name"], im["width"], im["height"]
        except (KeyError, TypeError):
            raise IngestError(f"{where}: images[{i}] needs id, file_name, width and height, got {im!r}") from None
        if iid in by_id:
            raise IngestError(f"{where}: images[{i}] repeats image id {iid}")
        if not isinstance(fname, str):
            raise IngestError(f"{where}: images[{i}] (id {iid}): file_name must be a string, got {fname!r}")
        by_id[iid] = (fname, source_path(image_dir, fname, f"{where}: images[{i}] (id {iid})"), int(w), int(h))

    # Annotations packed into arrays: (image id, class index, annotation id, iscrowd, bbox)
    n = len(anns)
    a_img = np.empty(n, np.int64)
    a_cls = np.empty(n, np.int32)
    a_id = np.empty(n, np.int64)
    a_crowd = np.empty(n, np.int8)
    a_box = np.empty((n, 4), np.float64)
    unknown_image = 0
    k = 0
    for i, a in enumerate(anns):
        try:
            iid, cid, aid, box = a["image_id"], a["category_id"], a["id"], a["bbox"]
        except (KeyError, TypeError):
            keys = sorted(a) if isinstance(a, dict) else type(a).__name__
            raise IngestError(f"{where}: annotations[{i}] needs image_id, category_id, id and bbox; it has "
                              f"{keys}") from None
        if cid not in cat_index:
            raise IngestError(f"{where}: annotations[{i}] (id {aid}) has category_id {cid}, which is not in "
                              f"'categories'; the annotation file is inconsistent")
        if iid not in by_id:
            # Happens in truncated copies (e.g. the first-100-entries samples); real files always join.
            if strict:
                raise IngestError(f"{where}: annotations[{i}] (id {aid}) refers to image_id {iid}, which is not "
                                  f"in 'images'; re-extract the file, or drop --strict to skip such annotations")
            unknown_image += 1
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise IngestError(f"{where}: annotations[{i}] (id {aid}) bbox must be [x, y, w, h], got {box!r}")
        a_img[k], a_cls[k], a_id[k] = iid, cat_index[cid], aid
        a_crowd[k] = 1 if a.get("iscrowd", 0) else 0
        a_box[k] = box
        k += 1
    a_img, a_cls, a_id, a_crowd, a_box = a_img[:k], a_cls[:k], a_id[:k], a_crowd[:k], a_box[:k]
    # group by image, annotations of an image in annotation-id order
    order = np.lexsort((a_id, a_img))
    a_img, a_cls, a_crowd, a_box = a_img[order], a_cls[order], a_crowd[order], a_box[order]
    starts = np.flatnonzero(np.r_[True, a_img[1:] != a_img[:-1]]) if k else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], k]
    span = {int(a_img[s]): (int(s), int(e)) for s, e in zip(starts, ends)}
    xyxy = np.concatenate([a_box[:, :2], a_box[:, :2] + a_box[:, 2:]], axis=1).tolist()
    cls_list, crowd_list = a_cls.tolist(), a_crowd.tolist()

    records: list[Record] = []
    no_annotations = 0
    for iid in sorted(by_id, key=_image_order_key):
        fname, path, w, h = by_id[iid]
        s, e = span.get(iid, (0, 0))
        if s == e and not keep_empty:
            no_annotations += 1
            continue
        boxes = [{"class": cls_list[j], "bbox": xyxy[j], "iscrowd": crowd_list[j]} for j in range(s, e)]
        records.append(Record(
            source_id=str(iid),
            rel_path=f"{rel_dir}/{fname}",
            pos=sorted(set(cls_list[s:e])),
            path=path,
            meta={"width": w, "height": h, "boxes": boxes},
        ))
    # listed = written + missing + corrupt + skipped.no_annotations (the writer adds the middle three)
    counts: dict[str, Any] = {"listed": len(by_id), "skipped": {"no_annotations": no_annotations}}
    if unknown_image:
        log.warning("%s: %d annotations refer to image ids that are not in 'images'; skipped", where, unknown_image)
        counts["annotations_unknown_image"] = unknown_image
    return records, counts


def plan(root: Path, *, year: str = "2014", keep_empty: bool = False, strict: bool = False) -> IngestPlan:
    """The plan for the COCO folder ``root`` (annotations/ and the image folders) of release ``year``.

    ``keep_empty`` keeps images without annotations (as all-negative samples); ``strict`` makes an
    annotation of an image that ``images`` does not list an error instead of a skipped, counted row.
    """
    root = Path(root)
    year = str(year)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root}: not a folder; pass the folder that holds annotations/ and "
                                f"train{year}/ val{year}/")
    # (split name, COCO folder name)
    layout = [("train", f"train{year}"), ("test", f"val{year}")]
    classes: list[dict[str, Any]] | None = None
    cat_index: dict[int, int] = {}
    splits: dict[str, list[Record]] = {}
    counts: dict[str, dict[str, Any]] = {}
    files = []
    for split, folder in layout:
        path = root / "annotations" / f"instances_{folder}.json"
        data = load_instances(path)
        cls = parse_categories(data.get("categories"), path)
        if classes is None:
            classes = cls
            cat_index = {c["id"]: c["index"] for c in cls}
        elif cls != classes:
            raise IngestError(f"{path}: 'categories' differ from those of instances_train{year}.json; both files "
                              f"must come from the same release")
        image_dir = root / folder
        if not image_dir.is_dir():
            log.warning("%s: image folder not found; every image of split %r will be counted missing",
                        image_dir, split)
        splits[split], counts[split] = split_records(
            data, path, image_dir, folder, cat_index, keep_empty=keep_empty, strict=strict)
        del data  # free the parsed json before the next file is read
        files.append(os.fspath(path))
    assert classes is not None
    return IngestPlan(
        dataset=f"coco{year}",
        classes=classes,
        splits=splits,
        unlisted=UNLISTED_NEGATIVE,
        source={
            "adapter": NAME,
            "root": os.fspath(root.resolve()),
            "year": year,
            "files": files,
            "keep_empty": bool(keep_empty),
            "order": "image id compared as decimal strings (Cole et al. format_coco.py)",
        },
        counts=counts,
    )
