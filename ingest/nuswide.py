"""``ingest nuswide``: NUS-WIDE (81 concepts) from the official lists, or from Cole et al.'s re-crawl.

Conventions
===========

- **Classes**: the 81 concepts in the order of ``Concepts81.txt`` (alphabetical in the official
  release); ``id`` and ``name`` are both the concept name.
- **Official source** (``--root``): ``ImageList/{Train,Test}Imagelist.txt`` hold Windows paths
  relative to ``Flickr/`` (``actor\\0001_2124494179.jpg``); ``\\`` becomes ``/``. The label of concept c
  for the image on line i of a list is line i of ``Groundtruth/TrainTestLabels/Labels_<c>_<Train|Test>.txt``
  (one ``0``/``1`` per line). ``Train`` -> split ``train``, ``Test`` -> split ``test``.
- **Cole et al.'s re-crawl** (``--from-npy DIR``): ``formatted_{train,val}_images.npy`` (relative image
  paths) and ``formatted_{train,val}_labels.npy`` (N x 81 matrix of 0/1); ``train`` -> ``train``,
  ``val`` -> ``test``. The manifest's ``source.labels_from`` records which source was used
  (``official-lists`` or ``cole-npy``): the two give different image sets and numbers.
- **Labels** are complete: ``1`` is positive, every other concept negative (``unlisted = negative``).
- **Images without any positive** are kept by default, as Cole et al.'s formatted files keep them
  (33,410 of their 150,000 training and 13,412 of their 60,260 test rows, about 22 %; their
  repository's issue 7): a training row without a positive gets no observed label under
  ``single_positive`` (Naive AN treats it as all negative), the seed-1200 80/20 cut runs over every
  row, and the test split scores them. ``counts[split].no_positive`` says how many rows have no
  positive. ``--drop-no-positive`` (not Cole et al.'s protocol) drops them and counts them as
  ``skipped.no_positive`` (``listed`` = the lines of the list, so ``listed = written + missing +
  corrupt + skipped.no_positive``).
- **Order**: the order of the image list (or of the npy rows). ``meta`` keeps the 1-based line of the
  image list (``list_line``) or the 0-based npy row (``npy_row``) so that a sample can be traced back.
- Images are looked up under ``ROOT/Flickr`` (official; ``DIR/Flickr`` for the npy source) or
  ``--images``. Many Flickr images are gone: the writer counts those as missing. A list path that
  would leave that folder (absolute, ``..``) is an error naming the list and line (npy: entry).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..shards.format import UNLISTED_NEGATIVE, IngestError, IngestPlan, Record, source_path

NAME = "nuswide"
HELP = "NUS-WIDE 81 concepts (official image lists + TrainTestLabels, or Cole et al.'s npy files)"
DESCRIPTION = """\
Ingest NUS-WIDE for multi-label classification over the 81 concepts.

Official release (--root ROOT):

  ROOT/ConceptsList/Concepts81.txt          (or ROOT/Concepts81.txt) the 81 names, in class order
  ROOT/ImageList/TrainImagelist.txt          Windows paths relative to Flickr/: actor\\0001_2124494179.jpg
  ROOT/ImageList/TestImagelist.txt
  ROOT/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt   one 0/1 per line, aligned with the list
  ROOT/Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt
  ROOT/Flickr/<folder>/<file>.jpg            (or --images DIR)

Cole et al.'s re-crawl (--from-npy DIR): DIR/formatted_{train,val}_{images,labels}.npy, images under
DIR/Flickr (or --images); Concepts81.txt is looked for in DIR and in --root.

Train -> split "train", Test (npy: val) -> split "test". Images without any positive label are kept, as
in Cole et al.'s formatted files (--drop-no-positive drops them). Images missing on disk are counted by
the writer.
"""

LIST_FILES = {"train": "TrainImagelist.txt", "test": "TestImagelist.txt"}
LABEL_SUFFIX = {"train": "Train", "test": "Test"}
NPY_PREFIX = {"train": "formatted_train", "test": "formatted_val"}  # Cole et al.'s names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None, metavar="DIR",
                        help="the official NUS-WIDE folder (ConceptsList/, ImageList/, Groundtruth/, Flickr/)")
    parser.add_argument("--from-npy", type=Path, default=None, metavar="DIR",
                        help="use Cole et al.'s formatted_{train,val}_{images,labels}.npy from DIR instead of "
                             "the official lists")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="folder the image paths are relative to (default ROOT/Flickr, or DIR/Flickr "
                             "with --from-npy)")
    parser.add_argument("--drop-no-positive", action="store_true",
                        help="drop images without any positive label and count them (not Cole et al.'s protocol, "
                             "which keeps them: the default)")


def _read_lines(path: Path, what: str) -> list[str]:
    """The lines of a text file (CRLF or LF, UTF-8), stripped, trailing blank lines removed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise IngestError(f"{path}:{line}: not valid UTF-8 ({e.reason}); re-extract the file") from None
    lines = [s.strip() for s in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def find_concepts(*folders: Path | None) -> Path:
    tried = []
    for folder in folders:
        if folder is None:
            continue
        for cand in (folder / "ConceptsList" / "Concepts81.txt", folder / "Concepts81.txt"):
            if cand.is_file():
                return cand
            tried.append(os.fspath(cand))
    raise FileNotFoundError("Concepts81.txt not found (tried " + ", ".join(tried) + "); it ships in the official "
                            "NUS-WIDE ConceptsList.zip; put it at ROOT/ConceptsList/Concepts81.txt or pass --root")


def read_concepts(path: Path) -> list[dict[str, Any]]:
    names = _read_lines(path, "concept list")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            raise IngestError(f"{path}:{i + 1}: empty concept name; remove the blank line")
        if name in seen:
            raise IngestError(f"{path}:{i + 1}: concept {name!r} repeats line {seen[name] + 1}")
        seen[name] = i
    if not names:
        raise IngestError(f"{path}: no concept names")
    return [{"index": i, "id": n, "name": n} for i, n in enumerate(names)]


def read_image_list(path: Path) -> list[str]:
    """Image paths relative to Flickr/, with ``/`` separators."""
    entries = _read_lines(path, "image list")
    for i, e in enumerate(entries):
        if not e:
            raise IngestError(f"{path}:{i + 1}: blank line inside the image list; the lists and the label "
                              f"files are aligned by line, so the file is damaged")
    return [e.replace("\\", "/") for e in entries]


def read_label_column(path: Path, n: int) -> np.ndarray:
    """One concept's 0/1 column for the ``n`` images of a list, as bool."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: label file not found; Groundtruth/TrainTestLabels must hold "
                                f"Labels_<concept>_{{Train,Test}}.txt for every concept of Concepts81.txt") from None
    # split() drops the line ends (CRLF or LF) and surrounding blanks; bad values are located by line below
    vals = np.array(raw.split(), dtype=bytes)
    if len(vals) != n:
        raise IngestError(f"{path}: {len(vals)} labels but the image list has {n} lines; the label files must "
                          f"be aligned line by line with the list (same release)")
    pos = vals == b"1"
    bad = ~(pos | (vals == b"0"))
    if bad.any():
        k = int(np.argmax(bad))
        line = _line_of_token(raw, k)
        raise IngestError(f"{path}:{line}: label {vals[k].decode(errors='replace')!r} is not 0 or 1")
    return pos.astype(bool)


def _line_of_token(raw: bytes, k: int) -> int:
    """1-based line number of the k-th whitespace-separated token (error path only)."""
    seen = 0
    for i, line in enumerate(raw.splitlines()):
        toks = len(line.split())
        if seen + toks > k:
            return i + 1
        seen += toks
    return len(raw.splitlines())


def _records(entries: list[str], labels: np.ndarray, image_dir: Path, where_key: str, source: Path, *,
             drop_no_positive: bool) -> tuple[list[Record], dict[str, Any]]:
    """Records in list order from a bool matrix (n x K), and the split's counts (see the module docstring).
    ``source`` is the file the entries come from (for messages)."""
    rows, cols = np.nonzero(labels)  # row-major: columns ascending within a row
    offsets = np.searchsorted(rows, np.arange(len(entries) + 1))
    cols_list = cols.tolist()
    records = []
    no_positive = 0
    for i, entry in enumerate(entries):
        a, b = int(offsets[i]), int(offsets[i + 1])
        if a == b:
            no_positive += 1
            if drop_no_positive:
                continue
        meta = {"list_line": i + 1} if where_key == "list_line" else {"npy_row": i}
        where = f"{source}:{i + 1}" if where_key == "list_line" else f"{source}: entry {i} (0-based)"
        records.append(Record(source_id=entry, rel_path=entry, pos=cols_list[a:b],
                              path=source_path(image_dir, entry, where), meta=meta))
    skipped = {"no_positive": no_positive} if drop_no_positive else {}
    return records, {"listed": len(entries), "no_positive": no_positive, "skipped": skipped}


def _official(root: Path, image_dir: Path, drop_no_positive: bool
              ) -> tuple[list[dict[str, Any]], dict[str, list[Record]], dict[str, dict[str, Any]], dict[str, Any]]:
    concepts_path = find_concepts(root)
    classes = read_concepts(concepts_path)
    splits: dict[str, list[Record]] = {}
    counts: dict[str, dict[str, Any]] = {}
    for split, list_name in LIST_FILES.items():
        list_path = root / "ImageList" / list_name
        entries = read_image_list(list_path)
        labels = np.zeros((len(entries), len(classes)), bool)
        for c in classes:
            path = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c['name']}_{LABEL_SUFFIX[split]}.txt"
            labels[:, c["index"]] = read_label_column(path, len(entries))
        splits[split], counts[split] = _records(entries, labels, image_dir, "list_line", list_path,
                                                drop_no_positive=drop_no_positive)
    source = {"labels_from": "official-lists", "concepts": os.fspath(concepts_path),
              "lists": [os.fspath(root / "ImageList" / n) for n in LIST_FILES.values()],
              "labels": os.fspath(root / "Groundtruth" / "TrainTestLabels")}
    return classes, splits, counts, source


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; --from-npy must hold Cole et al.'s "
                                f"formatted_{{train,val}}_{{images,labels}}.npy")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which is never enabled for downloaded files
        raise IngestError(f"{path}: cannot load without pickle ({e}); expected a plain string or number "
                          f"array") from None


def _from_npy(npy_dir: Path, root: Path | None, image_dir: Path, drop_no_positive: bool
              ) -> tuple[list[dict[str, Any]], dict[str, list[Record]], dict[str, dict[str, Any]], dict[str, Any]]:
    concepts_path = find_concepts(npy_dir, root)
    classes = read_concepts(concepts_path)
    k = len(classes)
    splits: dict[str, list[Record]] = {}
    counts: dict[str, dict[str, Any]] = {}
    files = []
    for split, prefix in NPY_PREFIX.items():
        img_path, lab_path = npy_dir / f"{prefix}_images.npy", npy_dir / f"{prefix}_labels.npy"
        images, labels = _load_npy(img_path), _load_npy(lab_path)
        if images.ndim != 1 or images.dtype.kind not in "US":
            raise IngestError(f"{img_path}: expected a 1-D array of path strings, got {images.dtype} {images.shape}")
        if labels.ndim != 2 or labels.dtype.kind not in "biuf" or labels.shape != (len(images), k):
            raise IngestError(f"{lab_path}: expected a {len(images)} x {k} matrix of 0/1 (one row per entry of "
                              f"{img_path.name}, one column per concept of {concepts_path}), got "
                              f"{labels.dtype} {labels.shape}")
        pos = labels == 1
        bad = ~(pos | (labels == 0))
        if bad.any():
            r, c = (int(x) for x in np.argwhere(bad)[0])
            raise IngestError(f"{lab_path}: row {r} (0-based), column {c} ({classes[c]['name']}) is {labels[r, c]!r}, "
                              f"not 0 or 1")
        entries = [(e.decode("utf-8") if isinstance(e, bytes) else str(e)).strip().replace("\\", "/")
                   for e in images.tolist()]
        for i, e in enumerate(entries):
            if not e:
                raise IngestError(f"{img_path}: entry {i} (0-based) is an empty path")
        splits[split], counts[split] = _records(entries, pos, image_dir, "npy_row", img_path,
                                                drop_no_positive=drop_no_positive)
        files += [os.fspath(img_path), os.fspath(lab_path)]
    source = {"labels_from": "cole-npy", "concepts": os.fspath(concepts_path), "files": files}
    return classes, splits, counts, source


def plan(root: Path | None = None, *, from_npy: Path | None = None, images: Path | None = None,
         drop_no_positive: bool = False) -> IngestPlan:
    """The plan for the official NUS-WIDE folder ``root``, or for Cole et al.'s npy files in ``from_npy``.

    ``images`` is the folder the image paths are relative to (default ``root/Flickr``, or
    ``from_npy/Flickr``). Every row is kept, as in Cole et al.'s files; ``drop_no_positive`` drops the rows
    without any positive label (not Cole et al.'s protocol).
    """
    drop = bool(drop_no_positive)
    root = Path(root) if root is not None else None
    if from_npy is not None:
        npy_dir = Path(from_npy)
        if not npy_dir.is_dir():
            raise FileNotFoundError(f"--from-npy {npy_dir}: not a folder")
        image_dir = Path(images) if images is not None else npy_dir / "Flickr"
        classes, splits, counts, source = _from_npy(npy_dir, root, image_dir, drop)
    elif root is not None:
        if not root.is_dir():
            raise FileNotFoundError(f"--root {root}: not a folder; pass the NUS-WIDE folder that holds ImageList/")
        image_dir = Path(images) if images is not None else root / "Flickr"
        classes, splits, counts, source = _official(root, image_dir, drop)
    else:
        raise SystemExit("ingest nuswide: pass --root DIR (official lists) or --from-npy DIR (Cole et al.'s files)")
    source.update({"adapter": NAME, "root": os.fspath(root.resolve()) if root else None,
                   "images": os.fspath(image_dir.resolve()), "drop_no_positive": drop})
    return IngestPlan(dataset="nuswide", classes=classes, splits=splits, unlisted=UNLISTED_NEGATIVE,
                      source=source, counts=counts)
