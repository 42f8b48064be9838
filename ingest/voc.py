"""``ingest voc``: Pascal VOC (2012 by default, or any dataset kept in VOC layout) -> multi-label records.

Conventions
===========

- **Classes**: the 20 VOC classes in devkit order (``VOC_CLASSES``), or the names of ``--classes FILE``
  (one per line, in class-index order). ``id`` and ``name`` of a class are both its VOC name.
- **Labels** come from the classification lists ``ImageSets/Main/<class>_<list>.txt``, one row
  ``<image id> <-1|0|1>`` per image (VOC writes ``"%s %2d"``, so positives have two spaces). ``1`` is
  positive; ``0`` (only *difficult* instances of the class) and ``-1`` are negative, as in Cole et al.'s
  formatting script. ``unlisted = negative``: VOC annotates every class of every listed image.
- **Splits**: ``train`` from the ``train`` lists, ``test`` from the ``val`` lists (the 80/20 train/val cut
  is made later from ``train``); ``--split-lists`` maps other lists, e.g. ``train=trainval,test=test``
  for VOC 2007's official protocol. An image in two of the chosen splits is an error.
- **Which images**: those with at least one positive, in sorted id order. Images whose rows are all
  ``-1``/``0`` are counted per split as ``skipped.no_positive``; ``listed`` is the number of distinct
  ids in the lists, so ``listed = written + missing + corrupt + skipped.no_positive``.
- **Consistency rule**: every class list of a split must name the same set of images. An image in some
  lists but not in others is an error that names both files (a partial download or a hand-edited list
  would otherwise give it silent negatives). Rows may end in CRLF or LF; blank lines are ignored; a
  row that is not ``<id> <-1|0|1>``, an id listed twice in one file, or an id that would leave
  ``JPEGImages`` (absolute, or a ``..`` component: ``shards.format.source_path``) is an error naming
  file and line.
- **Boxes**: ``Annotations/<id>.xml`` (parsed with defusedxml). Only direct ``object/name`` children are
  classes: the ``part/name`` elements nested in person objects (head, hand, foot) are not. Every
  object whose class is known becomes ``{"class": i, "bbox": [xmin, ymin, xmax, ymax], "difficult":
  0|1}`` in XML order, coordinates as floats (some VOC 2012 files have fractional ones). Objects of
  classes outside the class list are left out and counted (``unknown_box_classes``). A box must hold
  ``0 <= xmin <= xmax <= width`` and ``0 <= ymin <= ymax <= height`` (VOC's 1-based inclusive pixel
  coordinates; the size from the XML's ``<size>``, else 65535, the largest JPEG side): an inverted,
  negative or oversized box is dropped (the image and its labels stay: labels come from the lists),
  counted (``invalid_boxes``) and logged with its file and object, or is an error under ``--strict``.
  A missing XML is not an error: the sample has no ``boxes`` key and is counted
  (``missing_annotations``); an XML path that is a folder is an error naming it.
- Images are not opened here: ``path`` names ``JPEGImages/<id>.jpg`` and the writer counts missing
  and corrupt ones.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import defusedxml
import defusedxml.ElementTree as ET

from ..shards.format import UNLISTED_NEGATIVE, IngestError, IngestPlan, Record, source_path

NAME = "voc"
HELP = "Pascal VOC (or any VOC-layout dataset) classification lists -> multi-label shards, boxes kept"
DESCRIPTION = """\
Ingest Pascal VOC (2012 by default) for multi-label classification.

Expected layout under --root (the VOCdevkit folder of the official tar):

  ROOT/VOC2012/ImageSets/Main/<class>_train.txt   rows "<image id> <-1|0|1>", one list per class
  ROOT/VOC2012/ImageSets/Main/<class>_val.txt
  ROOT/VOC2012/JPEGImages/<image id>.jpg
  ROOT/VOC2012/Annotations/<image id>.xml          boxes (optional per image)

The train lists become split "train", the val lists split "test" (--split-lists changes this). Label 1
is positive, 0 (difficult only) and -1 negative; only images with at least one positive are kept, in
sorted id order. Every class list of a split must name the same images. --classes FILE replaces the 20
VOC classes (one name per line) for other datasets kept in VOC layout; --year or --folder then only
picks the folder under ROOT.
"""

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LIST_NAMES = ("train", "val", "trainval", "test")
DEFAULT_SPLIT_LISTS = {"train": "train", "test": "val"}
_LABELS = {"-1": -1, "0": 0, "1": 1}
#: the box bound when an XML gives no <size>: the largest side a JPEG can have
_MAX_SIDE = 65535

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- parsing

def read_class_file(path: Path) -> list[str]:
    """Class names, one per line in class-index order; blank lines ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise IngestError(f"{path}: class file not found (--classes expects one class name per line)") from None
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not UTF-8 text ({e})") from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), 1):
        name = line.strip()
        if not name:
            continue
        if any(c.isspace() for c in name) or "/" in name:
            raise IngestError(f"{path}:{lineno}: class name {name!r} has a space or '/'; it names the list "
                              "files <class>_<list>.txt, so it must be one plain word")
        if name in seen:
            raise IngestError(f"{path}:{lineno}: class {name!r} repeats line {seen[name]}")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise IngestError(f"{path}: no class names")
    return names


def parse_list_file(path: Path) -> dict[str, tuple[int, int]]:
    """``<id> <-1|0|1>`` rows of one classification list -> {image id: (label, line number)}."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: not UTF-8 text ({e})") from None
    rows: dict[str, tuple[int, int]] = {}
    # split on "\n" (not splitlines) so that line numbers match what an editor shows for CRLF and LF files
    for lineno, line in enumerate(text.split("\n"), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in _LABELS:
            raise IngestError(f"{path}:{lineno}: malformed row {line.rstrip()!r}; expected '<image id> <-1|0|1>'")
        image_id, label = fields
        if image_id in rows:
            raise IngestError(f"{path}:{lineno}: image {image_id} is listed again (first on line {rows[image_id][1]})")
        rows[image_id] = (_LABELS[label], lineno)
    return rows


def read_split_lists(voc_root: Path, classes: list[str], list_name: str) -> tuple[list[str], list[list[int]]]:
    """Parse ``<class>_<list_name>.txt`` for every class: (sorted image ids, positive class indices per id)."""
    main = voc_root / "ImageSets" / "Main"
    tables = []
    for name in classes:
        path = main / f"{name}_{list_name}.txt"
        if not path.is_file():
            raise IngestError(f"{path}: list for class {name!r} not found; ImageSets/Main must hold "
                              f"<class>_{list_name}.txt for each of the {len(classes)} classes")
        tables.append((path, parse_list_file(path)))
    ref_path, ref = tables[0]
    for image_id, (_, lineno) in ref.items():  # every list must name the same ids (checked below)
        source_path(voc_root / "JPEGImages", image_id, f"{ref_path}:{lineno}", what="image id")
    for path, rows in tables[1:]:
        if rows.keys() != ref.keys():
            extra = sorted(rows.keys() - ref.keys())
            if extra:
                raise IngestError(f"{path}:{rows[extra[0]][1]}: image {extra[0]} is not in {ref_path.name}; every "
                                  "class list of a split must name the same images (fix or re-extract the lists)")
            lacking = sorted(ref.keys() - rows.keys())[0]
            raise IngestError(f"{path}: image {lacking} (line {ref[lacking][1]} of {ref_path.name}) is missing; every "
                              "class list of a split must name the same images (fix or re-extract the lists)")
    ids = sorted(ref)
    positives = [[c for c, (_, rows) in enumerate(tables) if rows[i][0] == 1] for i in ids]
    return ids, positives


def _box_problem(bbox: list[float], width: float, height: float) -> str | None:
    """Why a [xmin, ymin, xmax, ymax] box cannot be in an image of ``width`` x ``height``, or None."""
    for lo, hi, (a, b), side, side_name in ((bbox[0], bbox[2], ("xmin", "xmax"), width, "width"),
                                             (bbox[1], bbox[3], ("ymin", "ymax"), height, "height")):
        if lo < 0:
            return f"{a} {lo:g} < 0"
        if hi < lo:
            return f"{b} {hi:g} < {a} {lo:g}"
        if hi > side:
            return f"{b} {hi:g} > {side_name} {side:g}"
    return None


def _image_size(root, xml_path: Path) -> tuple[float, float]:
    """(width, height) from the XML's <size>, or the largest JPEG side for each when it gives none."""
    try:
        w, h = float(root.findtext("size/width")), float(root.findtext("size/height"))
    except (TypeError, ValueError):
        return _MAX_SIDE, _MAX_SIDE
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise IngestError(f"{xml_path}: <size> gives {w:g} x {h:g}, not an image size")
    return w, h


def parse_annotation(xml_path: Path, class_index: dict[str, int], strict: bool = False
                     ) -> tuple[list[dict[str, Any]], int, int] | None:
    """Boxes of one ``Annotations/<id>.xml``, the number of objects of unknown classes and the number of
    invalid boxes dropped (an error under ``strict``); None if the file is absent."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise IngestError(f"{xml_path}: is a folder, not an XML file; remove it or replace it with the image's "
                          "annotation") from None
    except ET.ParseError as e:
        raise IngestError(f"{xml_path}:{e.position[0]}: malformed XML ({e})") from None
    except defusedxml.DefusedXmlException as e:
        raise IngestError(f"{xml_path}: refused to parse ({e!r}); VOC annotations need no DTD or entities") from None
    width, height = _image_size(root, xml_path)
    boxes: list[dict[str, Any]] = []
    unknown = invalid = 0
    for j, obj in enumerate(root.findall("object")):  # direct children only: part/name is not a class
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise IngestError(f"{xml_path}: object {j} has no <name>")
        c = class_index.get(name)
        if c is None:
            unknown += 1
            continue
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise IngestError(f"{xml_path}: object {j} ({name}) has no <bndbox>")
        bbox = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = bndbox.findtext(tag)
            try:
                v = float(text)
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                raise IngestError(f"{xml_path}: object {j} ({name}) bndbox/{tag} is {text!r}, not a finite number")
            bbox.append(v)
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise IngestError(
                f"{xml_path}: object {j} ({name}) has <difficult>{difficult}</difficult>; expected 0 or 1")
        problem = _box_problem(bbox, width, height)
        if problem is not None:
            if strict:
                raise IngestError(f"{xml_path}: object {j} ({name}): invalid box: {problem}; fix the XML, or run "
                                  "without --strict to drop and count such boxes")
            log.warning("%s: object %d (%s): box dropped: %s", xml_path, j, name, problem)
            invalid += 1
            continue
        boxes.append({"class": c, "bbox": bbox, "difficult": int(difficult)})
    return boxes, unknown, invalid


class _SplitRecords:
    """The records of one split: sized and re-iterable; each image's XML is parsed as it is reached."""

    def __init__(self, voc_root: Path, ids: list[str], positives: list[list[int]], classes: list[str],
                 counts: dict[str, Any], strict: bool):
        self.voc_root = voc_root
        self.strict = strict
        self.ids = ids
        self.positives = positives
        self.class_index = {name: c for c, name in enumerate(classes)}
        self.counts = counts  # the plan's counts for this split: filled when an iteration completes

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[Record]:
        missing_xml = unknown_classes = invalid_boxes = 0
        for image_id, pos in zip(self.ids, self.positives):
            rel = f"JPEGImages/{image_id}.jpg"
            parsed = parse_annotation(self.voc_root / "Annotations" / f"{image_id}.xml", self.class_index,
                                      self.strict)
            if parsed is None:
                missing_xml += 1
                meta: dict[str, Any] = {}
            else:
                meta = {"boxes": parsed[0]}
                unknown_classes += parsed[1]
                invalid_boxes += parsed[2]
            yield Record(source_id=image_id, rel_path=rel, pos=pos, path=str(self.voc_root / rel), meta=meta)
        self.counts["missing_annotations"] = missing_xml
        self.counts["unknown_box_classes"] = unknown_classes
        self.counts["invalid_boxes"] = invalid_boxes


def plan_from_devkit(voc_root: Path, classes: list[str], dataset: str, source: dict[str, Any],
                     split_lists: dict[str, str] | None = None, strict: bool = False) -> IngestPlan:
    """The plan for one VOC-layout folder (``VOCdevkit/VOC<year>``: ImageSets/Main, JPEGImages, Annotations).

    ``split_lists`` maps output split -> VOC list name (default ``{"train": "train", "test": "val"}``).
    Reads and checks every list now; the XML files are parsed while the writer iterates the records.
    ``strict``: an invalid box is an error instead of a dropped, counted one.
    """
    voc_root = Path(voc_root).resolve()
    split_lists = dict(DEFAULT_SPLIT_LISTS if split_lists is None else split_lists)
    if not voc_root.is_dir():
        raise IngestError(f"{voc_root}: VOC folder not found; expected a folder holding ImageSets/Main, "
                          "JPEGImages and Annotations (VOCdevkit/VOC2012 in the official tar)")
    for sub in ("ImageSets/Main", "JPEGImages"):
        if not (voc_root / sub).is_dir():
            raise IngestError(f"{voc_root / sub}: not found; {voc_root} is not a VOC-layout folder")
    if not classes or len(set(classes)) != len(classes):
        raise IngestError(f"class names must be non-empty and unique, got {classes!r}")
    for split, list_name in split_lists.items():
        if list_name not in LIST_NAMES:
            raise IngestError(f"split {split!r} names list {list_name!r}; VOC lists are {', '.join(LIST_NAMES)}")

    splits: dict[str, _SplitRecords] = {}
    counts: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}  # image id -> split, to refuse an image in two splits
    for split, list_name in split_lists.items():
        ids, positives = read_split_lists(voc_root, classes, list_name)
        for image_id in ids:
            other = seen.setdefault(image_id, split)
            if other != split:
                raise IngestError(
                    f"{voc_root / 'ImageSets/Main'}: image {image_id} is in split {other!r} (list "
                    f"{split_lists[other]!r}) and in split {split!r} (list {list_name!r}); "
                    "choose lists that do not overlap")
        keep = [j for j, pos in enumerate(positives) if pos]
        counts[split] = {
            "listed": len(ids),
            "skipped": {"no_positive": len(ids) - len(keep)},
            "missing_annotations": 0,
            "unknown_box_classes": 0,
            "invalid_boxes": 0,
        }
        splits[split] = _SplitRecords(voc_root, [ids[j] for j in keep], [positives[j] for j in keep], classes,
                                      counts[split], strict)
    return IngestPlan(
        dataset=dataset,
        classes=[{"index": i, "id": name, "name": name} for i, name in enumerate(classes)],
        splits=splits,
        unlisted=UNLISTED_NEGATIVE,
        source={**source, "voc_root": str(voc_root), "split_lists": split_lists},
        counts=counts,
    )


# ----------------------------------------------------------------------------------------- CLI adapter

def parse_split_lists(text: str) -> dict[str, str]:
    """``"train=train,test=val"`` -> {"train": "train", "test": "val"} (argparse type)."""
    out: dict[str, str] = {}
    for part in text.split(","):
        split, eq, list_name = part.strip().partition("=")
        if not eq or not split or list_name not in LIST_NAMES:
            raise argparse.ArgumentTypeError(
                f"expected SPLIT=LIST[,SPLIT=LIST...] with LIST one of {', '.join(LIST_NAMES)}, got {part!r}")
        if split in out:
            raise argparse.ArgumentTypeError(f"split {split!r} is given twice")
        out[split] = list_name
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, metavar="VOCDEVKIT",
                        help="the VOCdevkit folder (holding VOC<year>/)")
    parser.add_argument("--year", type=int, default=2012, choices=range(2007, 2013), metavar="YEAR",
                        help="picks the folder VOC<YEAR> under --root (2007..2012; default 2012)")
    parser.add_argument("--folder", metavar="NAME", help="the folder under --root instead of VOC<YEAR>")
    parser.add_argument("--classes", dest="classes_file", type=Path, metavar="FILE",
                        help="class names, one per line, replacing the 20 VOC classes")
    parser.add_argument("--split-lists", type=parse_split_lists, default=dict(DEFAULT_SPLIT_LISTS),
                        metavar="SPLIT=LIST,...",
                        help="which VOC lists make which split (default train=train,test=val; "
                             "VOC 2007 official: train=trainval,test=test)")
    parser.add_argument("--dataset", metavar="NAME",
                        help="dataset name in the manifest (default voc<YEAR>, or the folder name in lower case "
                             "with --folder or --classes)")


def plan(root: Path, *, year: int = 2012, folder: str | None = None, classes_file: Path | None = None,
         split_lists: dict[str, str] | None = None, dataset: str | None = None, strict: bool = False) -> IngestPlan:
    """The plan for ``root/<folder>`` (default ``VOC<year>``) of a VOCdevkit folder ``root``.

    ``classes_file`` replaces the 20 VOC classes (one name per line); ``split_lists`` maps output split ->
    VOC list (default ``{"train": "train", "test": "val"}``); ``dataset`` names the manifest's dataset
    (default ``voc<year>``, or the folder name in lower case with ``folder`` or ``classes_file``); ``strict``
    makes an invalid box an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"{root}: --root folder not found; pass the VOCdevkit folder that holds VOC{year}/")
    name = folder or f"VOC{year}"
    voc_root = root / name
    if not voc_root.is_dir():
        raise IngestError(f"{voc_root}: not found; --root must be the VOCdevkit folder that holds {name}/ "
                          "(use --year or --folder to pick another folder)")
    classes = read_class_file(classes_file) if classes_file else list(VOC_CLASSES)
    custom = folder is not None or classes_file is not None
    dataset = dataset or (name.lower() if custom else f"voc{year}")
    source = {
        "adapter": NAME,
        "root": str(root.resolve()),
        "folder": name,
        "classes_file": str(Path(classes_file).resolve()) if classes_file else None,
    }
    return plan_from_devkit(voc_root, classes, dataset, source, split_lists, strict)
