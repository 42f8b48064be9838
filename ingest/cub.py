"""``ingest cub``: CUB-200-2011 as a 312-attribute multi-label dataset (Cole et al.'s protocol).

Conventions
===========

- **Classes**: the attributes of ``attributes.txt`` (``<id> <name>``, ids 1..312, 1-based) in id
  order: class index = attribute id - 1, ``id`` = the attribute id, ``name`` e.g.
  ``has_bill_shape::dagger``. The file sits at the archive root, inside ``CUB_200_2011/`` or in
  ``CUB_200_2011/attributes/`` depending on the copy: all three are looked at, in that order.
- **Labels**: ``attributes/image_attribute_labels.txt`` rows
  ``<image_id> <attribute_id> <is_present> <certainty_id> <time>`` (1-based ids). The label is
  ``is_present``: 1 positive, 0 negative. An (image, attribute) pair without a row is negative as well
  (``unlisted = negative``) and counted per split as ``pairs_without_row``.
- **Certainty** (1 not visible, 2 guessing, 3 probably, 4 definitely) is not used by the protocol but
  kept: ``meta["certainty"]`` is a list of 312 ints in class order, ``0`` where the pair has no row.
  A dense list (not a dict of the positives) because the certainty of an *absent* attribute matters
  as much (``not visible`` vs ``definitely absent``), and 312 small ints are ~1 KB of json.
- **Malformed rows**: the labels file is known to hold a few lines with extra fields. A line with the
  wrong number of fields is reported with its line number (a warning), skipped and counted
  (``malformed_lines`` in the counts of the split of its image when the first field names one; all
  of them, with the first line numbers, in ``source``); under ``--strict`` it is fatal. Its pair then
  has no row (negative, certainty 0). Blank lines, doubled and trailing blanks are accepted. A
  repeated (image, attribute) pair keeps its first row and is counted (``duplicate_rows``); a row for
  an image that ``images.txt`` does not list is skipped and counted in ``source.rows_unknown_image``
  (it belongs to no split); both are fatal under ``--strict``. Any other bad value (an id out of
  range, ``is_present`` not 0/1, ``certainty_id`` not 1..4, a non-integer) is always fatal.
- **Counts**: every image of ``images.txt`` becomes a sample (``listed = written + missing +
  corrupt``); the counts above are of rows, not images.
- **Splits**: ``train_test_split.txt`` (``<image_id> 1`` = train, ``0`` = test) -> ``train`` / ``test``.
- **Order**: image id order (the order of ``images.txt`` in the release).
- **Paths**: ``images.txt`` paths are used verbatim (folder and file-name case differ:
  ``001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``), under ``CUB_200_2011/images/``;
  one that would leave that folder (absolute, ``..``) is an error naming the line.
  Some JPEGs are grayscale; the loader converts to RGB. Images are not opened here.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ..shards.format import UNLISTED_NEGATIVE, IngestError, IngestPlan, Record, source_path

NAME = "cub"
HELP = "CUB-200-2011 birds as 312 binary attributes (image_attribute_labels.txt)"
DESCRIPTION = """\
Ingest CUB-200-2011 for multi-label classification over its 312 attributes.

Expected layout (the CUB_200_2011.tgz archive extracted into --root; --root may also be the
CUB_200_2011 folder itself):

  ROOT/attributes.txt                            (or CUB_200_2011/attributes.txt, or
                                                  CUB_200_2011/attributes/attributes.txt)
  ROOT/CUB_200_2011/images.txt                   <image_id> <path under images/>
  ROOT/CUB_200_2011/train_test_split.txt         <image_id> <1 = train, 0 = test>
  ROOT/CUB_200_2011/attributes/image_attribute_labels.txt
                                                 <image_id> <attribute_id> <is_present> <certainty_id> <time>
  ROOT/CUB_200_2011/images/<class folder>/<file>.jpg

The label is is_present; the certainty of every attribute is kept in each sample's json. Lines of
image_attribute_labels.txt with a wrong field count are reported, skipped and counted (fatal under
--strict). Samples are in image-id order; paths from images.txt are used verbatim.
"""

log = logging.getLogger(__name__)

CUB_DIR = "CUB_200_2011"
MAX_CERTAINTY = 4
_MAX_LISTED = 100  # malformed line numbers kept in the manifest source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, metavar="DIR",
                        help="folder holding CUB_200_2011/ (the extracted archive), or CUB_200_2011/ itself")


def locate(root: Path) -> tuple[Path, Path]:
    """(the CUB_200_2011 folder, attributes.txt)."""
    if (root / CUB_DIR / "images.txt").is_file():
        cub, archive = root / CUB_DIR, root
    elif (root / "images.txt").is_file():
        cub, archive = root, root.parent
    else:
        raise FileNotFoundError(f"--root {root}: neither {root / CUB_DIR / 'images.txt'} nor {root / 'images.txt'} "
                                f"exists; pass the folder CUB_200_2011.tgz was extracted into")
    candidates = [archive / "attributes.txt", cub / "attributes.txt", cub / "attributes" / "attributes.txt"]
    for c in candidates:
        if c.is_file():
            return cub, c
    raise FileNotFoundError("attributes.txt not found (tried " + ", ".join(map(str, candidates)) + "); it ships "
                            "with CUB_200_2011.tgz (at the archive root, next to CUB_200_2011/)")


def _lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; is the CUB_200_2011 archive fully extracted?") from None
    try:
        return raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise IngestError(f"{path}:{line}: not valid UTF-8 ({e.reason}); re-extract the file") from None


def _id_value_file(path: Path, what: str) -> list[tuple[int, int, str]]:
    """``<int id> <value>`` lines as (line number, id, value); blank lines ignored; anything else fatal."""
    out = []
    for n, line in enumerate(_lines(path), 1):
        parts = line.split(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise IngestError(f"{path}:{n}: expected '<id> <{what}>', got {line!r}")
        out.append((n, int(parts[0]), parts[1].strip()))
    return out


def read_attributes(path: Path) -> list[dict[str, Any]]:
    classes = []
    for n, aid, name in _id_value_file(path, "attribute name"):
        if aid != len(classes) + 1 or not name or len(name.split()) != 1:
            raise IngestError(f"{path}:{n}: expected attribute id {len(classes) + 1} and one name, got {aid} {name!r}; "
                              f"attribute ids must run 1, 2, ... in order")
        classes.append({"index": aid - 1, "id": aid, "name": name})
    if not classes:
        raise IngestError(f"{path}: no attributes")
    return classes


def read_images(cub: Path) -> tuple[list[int], dict[int, str], dict[int, str]]:
    """(image ids in id order, id -> path under images/ (checked: ``source_path``), id -> split)."""
    images_path, split_path = cub / "images.txt", cub / "train_test_split.txt"
    paths: dict[int, str] = {}
    for n, iid, rel in _id_value_file(images_path, "relative path"):
        if iid in paths:
            raise IngestError(f"{images_path}:{n}: image id {iid} repeats")
        source_path(cub / "images", rel, f"{images_path}:{n}")
        paths[iid] = rel
    split: dict[int, str] = {}
    for n, iid, flag in _id_value_file(split_path, "0 or 1"):
        if flag not in ("0", "1"):
            raise IngestError(f"{split_path}:{n}: is_training_image must be 0 or 1, got {flag!r}")
        if iid not in paths:
            raise IngestError(f"{split_path}:{n}: image id {iid} is not in {images_path}")
        if iid in split:
            raise IngestError(f"{split_path}:{n}: image id {iid} repeats")
        split[iid] = "train" if flag == "1" else "test"
    if not paths:
        raise IngestError(f"{images_path}: lists no image; is the CUB_200_2011 archive fully extracted?")
    unsplit = [i for i in paths if i not in split]
    if unsplit:
        raise IngestError(f"{split_path}: {len(unsplit)} images of images.txt have no split (first: id {unsplit[0]}); "
                          f"the two files must come from the same archive")
    return sorted(paths), paths, split


class _AttributeRows:
    """The parsed rows of image_attribute_labels.txt in file order, each with its physical line number."""

    def __init__(self, line: np.ndarray, image: np.ndarray, attr: np.ndarray, present: np.ndarray,
                 certainty: np.ndarray, malformed: list[tuple[int, str]]):
        self.line, self.image, self.attr, self.present, self.certainty = line, image, attr, present, certainty
        self.malformed = malformed  # (line number, text) of lines with a wrong field count


_COLS = ("image_id", "attribute_id", "is_present", "certainty_id", "time")


def parse_attribute_labels(path: Path) -> _AttributeRows:
    """Vectorised parse (pyarrow) that keeps exact physical line numbers for every row and report."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the attribute labels ship in CUB_200_2011.tgz under "
                                f"CUB_200_2011/attributes/")
    invalid: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        # single-threaded with ignore_empty_lines=False: ``number`` is the physical 1-based line
        invalid.append((row.number, row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=list(_COLS), use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=" ", quote_char=False, ignore_empty_lines=False,
                                             invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={"image_id": pa.int32(), "attribute_id": pa.int32(), "is_present": pa.int8(),
                              "certainty_id": pa.int8()},
                include_columns=list(_COLS[:4])),
        )
    except pa.ArrowInvalid as e:
        # a non-integer field: find its line with a plain scan (error path only)
        n, line = _first_non_integer_line(path)
        raise IngestError(f"{path}:{n}: expected 5 space-separated fields with integer ids, is_present and "
                          f"certainty_id, got {line!r} ({e})") from None
    cols = [table.column(c).to_numpy(zero_copy_only=False) for c in _COLS[:4]]
    valid = table.column("image_id").is_valid().to_numpy(zero_copy_only=False)
    for c in _COLS[1:4]:
        valid &= table.column(c).is_valid().to_numpy(zero_copy_only=False)
    inv_lines = np.array(sorted(n for n, _ in invalid), np.int64)
    # Row r of the table is the physical line r + 1 + (invalid lines before it): ``before[k]`` is the
    # number of table rows that precede the k-th invalid line.
    before = inv_lines - 1 - np.arange(len(inv_lines))
    rows = np.arange(table.num_rows)
    line = rows + 1 + np.searchsorted(before, rows, side="right")
    # A row with a null is a blank line (ignore_empty_lines=False keeps them, so that the line
    # numbers stay physical) or a line with an empty field, i.e. a wrong field count in effect.
    malformed: list[tuple[int, str]] = []
    nulls = np.flatnonzero(~valid)
    if len(nulls):
        text = _lines(path)
        for i in nulls.tolist():
            t = text[line[i] - 1]
            if t.strip():
                malformed.append((int(line[i]), t))
    keep = valid
    line = line[keep]
    img, att, pres, cert = (np.asarray(c)[keep].astype(np.int64) for c in cols)

    # Lines that the tokenizer rejected: 5 fields after collapsing blanks (trailing or doubled
    # spaces) are real rows; anything else has a wrong field count.
    extra_line, extra_vals = [], []
    for n, t in invalid:
        f = t.split()
        if len(f) == 5 and all(_is_int(x) for x in f[:4]):
            extra_line.append(n)
            extra_vals.append([int(x) for x in f[:4]])
        else:
            malformed.append((n, t))
    if extra_line:
        ev = np.array(extra_vals, np.int64)
        line = np.concatenate([line, np.array(extra_line, np.int64)])
        img, att, pres, cert = (np.concatenate([a, ev[:, j]]) for j, a in enumerate((img, att, pres, cert)))
        order = np.argsort(line, kind="stable")
        line, img, att, pres, cert = line[order], img[order], att[order], pres[order], cert[order]
    malformed.sort()
    return _AttributeRows(line, img, att, pres, cert, malformed)


def _is_int(s: str) -> bool:
    return s.lstrip("-").isdigit()


def _first_non_integer_line(path: Path) -> tuple[int, str]:
    for n, t in enumerate(_lines(path), 1):
        f = t.split()
        if f and not all(_is_int(x) for x in f[:4]):
            return n, t
    return 0, ""


def plan(root: Path, *, strict: bool = False) -> IngestPlan:
    """The plan for the extracted CUB_200_2011 archive under ``root`` (or that folder itself).

    ``strict`` makes malformed lines, repeated (image, attribute) rows and rows of unknown images of
    image_attribute_labels.txt errors instead of skipped, counted rows.
    """
    root = Path(root)
    cub, attributes_path = locate(root)
    classes = read_attributes(attributes_path)
    k = len(classes)
    ids, paths, split_of = read_images(cub)
    labels_path = cub / "attributes" / "image_attribute_labels.txt"
    rows = parse_attribute_labels(labels_path)

    def fatal(line: int, msg: str) -> IngestError:
        return IngestError(f"{labels_path}:{line}: {msg}")

    # --- malformed lines (wrong field count)
    if rows.malformed:
        n, t = rows.malformed[0]
        if strict:
            raise fatal(n, f"expected 5 fields '<image_id> <attribute_id> <is_present> <certainty_id> <time>', got "
                           f"{len(t.split())}: {t!r} ({len(rows.malformed)} such lines; drop --strict to skip them)")
        log.warning("%s: %d lines with a wrong field count skipped (first: line %d: %r)", labels_path,
                    len(rows.malformed), n, t)

    # --- values (always fatal: a bad value means the file is not what we think it is)
    for name, arr, lo, hi in (("attribute_id", rows.attr, 1, k), ("is_present", rows.present, 0, 1),
                              ("certainty_id", rows.certainty, 1, MAX_CERTAINTY)):
        bad = (arr < lo) | (arr > hi)
        if bad.any():
            j = int(np.argmax(bad))
            raise fatal(int(rows.line[j]), f"{name} {int(arr[j])} is outside {lo}..{hi}")

    # --- rows of images that images.txt does not list
    id_arr = np.array(ids, np.int64)
    pos_in_ids = np.searchsorted(id_arr, rows.image)
    known = (pos_in_ids < len(id_arr)) & (id_arr[np.minimum(pos_in_ids, len(id_arr) - 1)] == rows.image)
    if not known.all():
        j = int(np.argmax(~known))
        if strict:
            raise fatal(int(rows.line[j]), f"image_id {int(rows.image[j])} is not in {cub / 'images.txt'} "
                                           f"(drop --strict to skip such rows)")
        log.warning("%s: %d rows name images that images.txt does not list; skipped (first: line %d)",
                    labels_path, int((~known).sum()), int(rows.line[j]))
    r_img, r_att = pos_in_ids[known], rows.attr[known] - 1
    r_pres, r_cert, r_line = rows.present[known], rows.certainty[known], rows.line[known]

    # --- repeated (image, attribute) pairs: the first row (file order) wins
    key = r_img * k + r_att
    _, first = np.unique(key, return_index=True)
    n_dup = len(key) - len(first)
    if n_dup:
        is_first = np.zeros(len(key), bool)
        is_first[first] = True
        j = int(np.argmax(~is_first))
        if strict:
            raise fatal(int(r_line[j]), f"image {ids[r_img[j]]} attribute {r_att[j] + 1} repeats an earlier row "
                                        f"(drop --strict to keep the first row)")
        log.warning("%s: %d repeated (image, attribute) rows; the first one is kept (first repeat: line %d)",
                    labels_path, n_dup, int(r_line[j]))
    dup_img = np.delete(r_img, first)
    r_img, r_att, r_pres, r_cert = r_img[first], r_att[first], r_pres[first], r_cert[first]

    present = np.zeros((len(ids), k), bool)
    certainty = np.zeros((len(ids), k), np.int8)  # 0 = no row
    present[r_img, r_att] = r_pres == 1
    certainty[r_img, r_att] = r_cert
    has_row = np.zeros((len(ids), k), bool)
    has_row[r_img, r_att] = True
    rows_per_image = has_row.sum(axis=1)

    splits: dict[str, list[Record]] = {"train": [], "test": []}
    # Row-level counts per split (no image is ever skipped: every image of images.txt becomes a sample)
    counts: dict[str, dict[str, Any]] = {
        s: {"listed": 0, "skipped": {}, "malformed_lines": 0, "duplicate_rows": 0, "pairs_without_row": 0}
        for s in splits}
    for i, iid in enumerate(ids):
        s = split_of[iid]
        counts[s]["listed"] += 1
        counts[s]["pairs_without_row"] += k - int(rows_per_image[i])
        rel = paths[iid]
        splits[s].append(Record(
            source_id=str(iid),
            rel_path=f"{CUB_DIR}/images/{rel}",
            pos=np.flatnonzero(present[i]).tolist(),
            path=str(cub / "images" / rel),
            meta={"certainty": certainty[i].tolist()},
        ))
    for i in dup_img.tolist():
        counts[split_of[ids[i]]]["duplicate_rows"] += 1
    unattributed = 0
    for _, t in rows.malformed:
        f = t.split()
        if f and f[0].isdigit() and int(f[0]) in split_of:
            counts[split_of[int(f[0])]]["malformed_lines"] += 1
        else:
            unattributed += 1
    return IngestPlan(
        dataset="cub",
        classes=classes,
        splits=splits,
        unlisted=UNLISTED_NEGATIVE,
        source={
            "adapter": NAME,
            "root": os.fspath(root.resolve()),
            "attributes": os.fspath(attributes_path),
            "image_attribute_labels": os.fspath(labels_path),
            "malformed_lines": len(rows.malformed),
            "malformed_line_numbers": [n for n, _ in rows.malformed[:_MAX_LISTED]],
            # rows that name no image of images.txt belong to no split: counted here only
            "malformed_lines_without_known_image": unattributed,
            "rows_unknown_image": int((~known).sum()),
            "certainty": "meta.certainty: one int per attribute in class order, 1..4 (0 = no row)",
        },
        counts=counts,
    )
