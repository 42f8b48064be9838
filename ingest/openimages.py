"""``ingest openimages``: OpenImages V3 (release 2017_11) human-verified image labels, 5,000 classes.

Conventions
===========

- **Classes**: the 5,000 MIDs of ``classes-trainable.txt`` in file order; ``id`` is the MID
  (``/m/010dmf``), ``name`` its display name from ``class-descriptions.csv`` (``MID,Display name``, no
  header, standard CSV quoting: names hold commas and doubled quotes; mixed CRLF/LF; UTF-8).
- **Labels** come from ``<split>/annotations-human.csv`` (``ImageID,Source,LabelName,Confidence``):
  ``Confidence`` 1 is a verified positive, 0 a verified NEGATIVE; every pair without a row is unknown
  (``unlisted = unknown``). ``annotations-machine.csv`` is never read (its labels are not truth).
  Rows whose LabelName is not trainable are ignored and counted (``non_trainable_rows``).
- **Repeated pairs**: the same (image, class) in several rows with the same value is one label. Every
  row after the first of its pair is counted (``duplicate_rows``, whatever its value). With
  *conflicting* values (human verifiers disagreed) the pair becomes unknown and is counted
  (``conflicting_pairs``). Rationale: observed labels are
  treated as clean downstream (an observed negative is never modified by the large-loss schemes, an
  observed positive is a training target), so neither value can be trusted; unknown is exactly the
  state that the method is designed to handle. Choosing either side would inject label noise that
  the pipeline cannot see.
- **Images**: those of the CSV with at least one trainable, non-conflicting label; an image whose rows
  are all non-trainable (or all conflicting) is counted as skipped ``no_trainable_label``. ImageIDs are
  opaque strings (16 hex digits): they are never parsed as numbers, but they name files, so one
  holding '/' or a NUL byte is an error naming its line. Records come in sorted ImageID order
  (byte-wise string order).
- **Files on disk**: ``<images>/<split>/<ImageID>.jpg`` (default ``<images>`` = ``--root``), or a flat
  ``<images>/<ImageID>.jpg`` when ``--images`` has no split folders (detected). Many images of the
  release cannot be downloaded any more (the paper trains on ~3.4M of 9M): each image folder is
  listed once (``os.scandir``) and the annotated images that are not there are counted here as
  ``skipped.not_on_disk``, without creating a record (the writer's own ``missing`` then only counts
  files that vanish between the listing and the read; it does not accept an adapter's count under
  that name). Files on disk that the CSV does not list are ignored.
- **Counts** per split: ``listed`` = distinct images of the CSV = ``written + missing + corrupt +
  skipped.no_trainable_label + skipped.not_on_disk``; row counts ``rows``, ``non_trainable_rows``,
  ``duplicate_rows`` and ``malformed_rows`` (wrong field count: skipped with a warning, fatal under
  ``--strict``), and ``conflicting_pairs``.
- **Splits**: ``train``, ``validation`` and ``test`` as released. The trainer may validate on the
  official ``validation`` split or on the 80/20 cut of ``train``; both are possible from these shards.
- Per-class known-label counts of ``train`` (for the G1..G5 groups) are computed by the writer from
  the written ``pos``/``neg`` lists.

Streaming
=========

The train CSV has 20.9M rows over 9M images. It is read in 4 MiB record batches
(``pyarrow.csv.open_csv``, only ``ImageID``, ``LabelName`` and ``Confidence``, ImageID typed as a
string so that ``00000000000e1234`` is never read as a number): per batch, ``LabelName`` is
dictionary-encoded and mapped to a class index through a hash lookup of its (small) dictionary
against the trainable MIDs, and ``ImageID`` is dictionary-encoded into batch-local codes. What is
kept per trainable row is 7 bytes (a uint32 image code, a uint16 class, a uint8 value) plus each
batch's distinct ImageIDs. After the last batch, the batch dictionaries are unified by sorting them
once (rank of each distinct ImageID), and the rows are sorted in place as one uint64 key
``(image rank << 17) | (class << 1) | value``: a repeated pair is a run of equal ``key >> 1``, whose
first and last rows give its smallest and largest value (a conflict when they differ). The result
is CSR (per-image offsets into uint16 class arrays); records are built from it lazily, one Python
step per image. ``tests/bench/ingest.py --part openimages`` measures it on a generated CSV of the real
size (the README's benchmark table; target: <= 2 GB, <= 3 minutes), against a polars version of the same
parse (lazy ``scan_csv``, LabelName joined to the trainable MIDs, batch dictionaries unified by one sort):
polars was slower at about the same memory, so the parse stays on pyarrow.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..shards.format import MAX_CLASSES, UNLISTED_UNKNOWN, IngestError, IngestPlan, Record

NAME = "openimages"
HELP = "OpenImages V3 (2017_11) human-verified labels over the 5,000 trainable classes"
DESCRIPTION = """\
Ingest OpenImages V3 (release 2017_11) for multi-label classification over the 5,000 trainable classes.

Expected layout under --root (default: the current folder). The class and annotation files may sit
directly under ROOT or under ROOT/2017_11/ (as the V3 annotation tarball extracts):

  ROOT/[2017_11/]classes-trainable.txt                 5,000 MIDs, one a line: the class order
  ROOT/[2017_11/]class-descriptions.csv                MID,Display name (no header)
  ROOT/[2017_11/]train/annotations-human.csv           ImageID,Source,LabelName,Confidence
  ROOT/[2017_11/]validation/annotations-human.csv
  ROOT/[2017_11/]test/annotations-human.csv
  ROOT/train/<ImageID>.jpg ...                         the downloaded images, one folder per split

Images may live elsewhere: --images DIR, holding either DIR/<split>/<ImageID>.jpg or a flat
DIR/<ImageID>.jpg (detected). Confidence 1 = positive, 0 = verified negative, no row = unknown.
Rows of non-trainable classes are ignored and counted; a pair with conflicting rows becomes unknown
(counted). Annotated images that are not on disk are counted (skipped.not_on_disk). Splits: train,
validation, test (choose with --splits). Samples are in sorted ImageID order.
"""

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
RELEASE_DIR = "2017_11"
ANNOTATIONS = "annotations-human.csv"
_BLOCK = 1 << 22  # CSV bytes per record batch: 4 MiB keeps the reader's read-ahead small (16 MiB: +0.4 GB)
_CLASS_BITS = 16  # classes fit uint16 (MAX_CLASSES); the sort key is (image rank << 17) | (class << 1) | value
_YIELD_CHUNK = 1 << 15  # images converted to Python objects at a time while yielding records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path("."), metavar="DIR",
                        help="folder holding the class files and <split>/annotations-human.csv, directly or "
                             "under 2017_11/ (default: the current folder)")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="image folder: DIR/<split>/<ImageID>.jpg or flat DIR/<ImageID>.jpg "
                             "(default: ROOT/<split>/)")
    parser.add_argument("--splits", default=",".join(SPLITS), metavar="LIST",
                        help="comma-separated splits to ingest (default train,validation,test)")


# ------------------------------------------------------------------------------------------ class files

def find_file(root: Path, *parts: str) -> Path:
    """``root/<parts>`` or ``root/2017_11/<parts>``, whichever exists."""
    candidates = [root.joinpath(*parts), root.joinpath(RELEASE_DIR, *parts)]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{'/'.join(parts)} not found (tried {', '.join(map(str, candidates))}); pass --root, "
                            f"the folder where the OpenImages V3 annotation tarballs were extracted")


def read_trainable(path: Path) -> list[str]:
    mids: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", newline=None) as f:  # universal newlines: CRLF or LF
        for n, line in enumerate(f, 1):
            mid = line.strip()
            if not mid:
                continue
            if "," in mid or len(mid.split()) != 1:
                raise IngestError(f"{path}:{n}: expected one MID per line, got {line.rstrip()!r}")
            if mid in seen:
                raise IngestError(f"{path}:{n}: MID {mid} repeats line {seen[mid]}")
            seen[mid] = n
            mids.append(mid)
    if not mids:
        raise IngestError(f"{path}: no MIDs")
    if len(mids) > MAX_CLASSES:
        raise IngestError(f"{path}: {len(mids)} classes, at most {MAX_CLASSES} fit the uint16 label lists")
    return mids


def read_descriptions(path: Path) -> dict[str, str]:
    """MID -> display name. Real CSV (quoted commas, doubled quotes, embedded CRLF/LF mix), UTF-8."""
    names: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:  # newline="" lets csv handle quoting and line ends
        reader = csv.reader(f)
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != 2:
                    raise IngestError(f"{path}:{reader.line_num}: expected 'MID,Display name', got {row!r}")
                names.setdefault(row[0], row[1])
        except csv.Error as e:
            raise IngestError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise IngestError(f"{path}: not valid UTF-8 near line {reader.line_num} ({e.reason})") from None
    return names


def read_classes(root: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    trainable_path = find_file(root, "classes-trainable.txt")
    desc_path = find_file(root, "class-descriptions.csv")
    mids = read_trainable(trainable_path)
    names = read_descriptions(desc_path)
    missing = [m for m in mids if m not in names]
    if missing:
        raise IngestError(f"{desc_path}: no display name for {len(missing)} trainable MIDs of {trainable_path} "
                          f"(first: {missing[0]}); use the class-descriptions.csv of the same release")
    return [{"index": i, "id": m, "name": names[m]} for i, m in enumerate(mids)], [trainable_path, desc_path]


# ------------------------------------------------------------------------------------- annotations

@dataclass
class ParsedSplit:
    """One split's labels in CSR form, images in sorted ImageID order."""

    image_ids: pa.Array  # string, sorted, distinct: every image of the CSV (with or without a kept label)
    pos_offsets: np.ndarray  # int64 [n_images + 1]: pos classes of image i are pos_classes[o[i]:o[i+1]]
    pos_classes: np.ndarray  # uint16, ascending within an image
    neg_offsets: np.ndarray
    neg_classes: np.ndarray
    rows: int = 0  # data rows read (malformed ones excluded)
    counts: dict[str, int] = field(default_factory=dict)  # row-level counts (see the module docstring)

    @property
    def num_labels(self) -> np.ndarray:
        return np.diff(self.pos_offsets) + np.diff(self.neg_offsets)


def parse_annotations(path: Path, mids: list[str], *, strict: bool = False) -> ParsedSplit:
    """Stream ``annotations-human.csv`` into a ``ParsedSplit`` (vectorised per batch, no per-row Python)."""
    value_set = pa.array(mids, pa.string())
    invalid: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row)
        return "skip"

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=_BLOCK, use_threads=True),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                include_columns=["ImageID", "LabelName", "Confidence"],
                column_types={"ImageID": pa.string(), "LabelName": pa.dictionary(pa.int32(), pa.string()),
                              "Confidence": pa.float32()},
                strings_can_be_null=True),
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; each split needs <split>/{ANNOTATIONS} from the V3 "
                                f"human-annotations tarball (or leave the split out with --splits)") from None
    except pa.ArrowKeyError as e:  # a column of include_columns is not in the header
        raise IngestError(f"{path}:1: header must name ImageID, LabelName and Confidence "
                          f"(ImageID,Source,LabelName,Confidence) ({e})") from None
    except pa.ArrowInvalid as e:  # the first block is converted while opening
        raise _conversion_error(path, e, 0) from None

    # Per batch: its distinct ImageIDs (of all rows, so that images with only non-trainable rows are
    # still counted), and for its trainable rows: the ImageID's code into the concatenation of the
    # batch dictionaries, the class index and the value.
    batch_dicts: list[pa.Array] = []
    pre_codes: list[np.ndarray | None] = []
    classes: list[np.ndarray | None] = []
    values: list[np.ndarray | None] = []
    dict_offset = 0
    rows = non_trainable = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as e:
            raise _conversion_error(path, e, rows) from None
        n = batch.num_rows
        if n == 0:
            continue
        ids, labels, conf = batch.column(0), batch.column(1), batch.column(2)
        if ids.null_count or labels.null_count or conf.null_count:
            nulls = pc.or_(pc.or_(pc.is_null(ids), pc.is_null(labels)), pc.is_null(conf))
            k = rows + int(np.argmax(nulls.to_numpy(zero_copy_only=False)))
            raise IngestError(f"{path}:{_physical_line(path, k)}: empty ImageID, LabelName or Confidence")
        c = conf.to_numpy()
        bad = (c != 0) & (c != 1)
        if bad.any():
            k = rows + int(np.argmax(bad))
            raise IngestError(f"{path}:{_physical_line(path, k)}: Confidence {c[bad][0]:g} is neither 1 (positive) "
                              f"nor 0 (verified negative); is this annotations-machine.csv?")
        # LabelName -> class index: look the batch's few distinct MIDs up in the trainable set
        dict_cls = pc.index_in(labels.dictionary, value_set=value_set)
        dict_cls = dict_cls.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
        cls = dict_cls[labels.indices.to_numpy(zero_copy_only=False)]
        trainable = cls >= 0
        enc = pc.dictionary_encode(ids)
        _check_image_ids(path, enc.dictionary, ids, rows)
        batch_dicts.append(enc.dictionary)
        code = enc.indices.to_numpy(zero_copy_only=False)[trainable].astype(np.uint32)
        code += np.uint32(dict_offset)
        pre_codes.append(code)
        dict_offset += len(enc.dictionary)
        classes.append(cls[trainable].astype(np.uint16))
        values.append(c[trainable].astype(np.uint8))
        rows += n
        non_trainable += n - len(code)

    # Arrow's allocator keeps freed pages for reuse; hand back the reader's buffers before grouping
    pa.default_memory_pool().release_unused()
    malformed = len(invalid)
    if invalid:
        first = invalid[0]
        if strict:
            raise IngestError(f"{path}:{_find_text_line(path, first.text)}: expected 4 fields, got "
                              f"{first.actual_columns}: {first.text!r} ({malformed} such rows; drop --strict to "
                              f"skip them)")
        log.warning("%s: %d rows with a wrong field count skipped (first: %r)", path, malformed, first.text)

    return _group(path, batch_dicts, pre_codes, classes, values, rows, non_trainable, malformed)


def _check_image_ids(path: Path, distinct: pa.Array, ids: pa.Array, rows: int) -> None:
    """ImageIDs name files (``<images>/<ImageID>.jpg``): one holding '/' or a NUL byte is an error naming its
    line (``distinct``: the batch's distinct ids; ``rows``: data rows before the batch)."""
    bad = pc.match_substring_regex(distinct, r"[/\x00]")
    if not pc.any(bad).as_py():
        return
    image_id = distinct.filter(bad)[0].as_py()
    k = rows + int(np.argmax(pc.equal(ids, image_id).to_numpy(zero_copy_only=False)))
    raise IngestError(f"{path}:{_physical_line(path, k)}: ImageID {image_id!r} is not a plain file name (it names "
                      "<images>/<ImageID>.jpg); fix or remove the row")


def _group(path: Path, batch_dicts: list[pa.Array], pre_codes: list[np.ndarray | None],
           classes: list[np.ndarray | None], values: list[np.ndarray | None], rows: int, non_trainable: int,
           malformed: int) -> ParsedSplit:
    """Batches -> CSR. Big arrays are freed as soon as they are used; the comments give their size for
    the real train CSV (R = 17.7M trainable rows, D = ~9M dictionary entries, I = 9M images)."""
    # Unify the batch dictionaries by sorting them once (measured on 9M ImageIDs: 6 s and 0.4 GB of
    # Arrow memory, against 15 s and 1.0 GB for a global hash pass): sorted position -> rank of the
    # distinct ImageID, hence pre-code -> rank in sorted ImageID order.
    if batch_dicts:
        all_ids = pa.concat_arrays(batch_dicts)  # one array: ``take`` then yields one array, no extra copy
        del batch_dicts[:]
        order = pc.sort_indices(all_ids)
        sorted_ids = all_ids.take(order)
        del all_ids
        order = order.to_numpy(zero_copy_only=False)  # int64 [D]
        first = np.ones(len(sorted_ids), bool)  # first occurrence of each distinct ImageID in sorted order
        if len(sorted_ids) > 1:
            first[1:] = pc.not_equal(sorted_ids.slice(1), sorted_ids.slice(0, len(sorted_ids) - 1)).to_numpy(
                zero_copy_only=False)
        image_ids = sorted_ids.filter(pa.array(first))  # strings [I]
        del sorted_ids
        code_to_rank = np.empty(len(order), np.uint64)  # [D]
        code_to_rank[order] = np.cumsum(first, dtype=np.uint64) - np.uint64(1)
        del order, first
        pa.default_memory_pool().release_unused()
    else:
        image_ids = pa.array([], pa.string())
        code_to_rank = np.zeros(0, np.uint64)
    return _csr(path, image_ids, code_to_rank, pre_codes, classes, values, rows, non_trainable, malformed)


def _csr(path: Path, image_ids: pa.Array, code_to_rank: np.ndarray, pre_codes: list[np.ndarray | None],
         classes: list[np.ndarray | None], values: list[np.ndarray | None], rows: int, non_trainable: int,
         malformed: int) -> ParsedSplit:
    """Trainable rows (batch codes, classes, values) -> CSR, given each batch code's rank in sorted ImageID
    order (``image_ids``: the distinct ImageIDs in that order). Shared with the polars parse that
    tests/bench/ingest.py measures against this one."""
    n_images = len(image_ids)

    # One uint64 per trainable row: (image rank << 17) | (class << 1) | value, filled batch by batch
    # (each batch's arrays are dropped as soon as they are copied). Sorting it in place groups the
    # rows by image, then class, and puts a pair's 0 rows before its 1 rows.
    n_rows = sum(len(c) for c in pre_codes if c is not None)
    key = np.empty(n_rows, np.uint64)  # [R]
    o = 0
    for b in range(len(pre_codes)):
        code, cls, val = pre_codes[b], classes[b], values[b]
        pre_codes[b] = classes[b] = values[b] = None
        assert code is not None and cls is not None and val is not None
        part = key[o: o + len(code)]
        np.take(code_to_rank, code, out=part)
        part <<= np.uint64(_CLASS_BITS + 1)
        part |= cls.astype(np.uint64) << np.uint64(1)
        part |= val.astype(np.uint64)
        o += len(code)
    assert o == n_rows
    del code_to_rank
    key.sort()

    # the value bit without a uint64 temporary: the lowest byte of each key
    val = key.view(np.uint8).reshape(-1, 8)[:, 0 if sys.byteorder == "little" else 7] & np.uint8(1)  # [R]
    key >>= np.uint64(1)  # now (image rank << 16) | class: the pair
    new = np.ones(n_rows, bool)  # first row of each pair
    np.not_equal(key[1:], key[:-1], out=new[1:])
    last = np.ones(n_rows, bool)  # last row of each pair
    last[:-1] = new[1:]
    low, high = val[new], val[last]  # a pair's rows are sorted by value: low = min, high = max
    del val, last
    conflict = low != high
    conflicting_pairs = int(np.count_nonzero(conflict))
    duplicate_rows = n_rows - len(conflict)  # rows that repeat an earlier row's pair, whatever their value
    new[new] = ~conflict  # now: first row of each pair that is kept
    pair_key = key[new]
    is_pos = high[~conflict] == 1
    del key, new, low, high, conflict

    # CSR: the pairs are sorted by image rank, so the offsets are binary searches of rank << 16
    bounds = np.arange(n_images + 1, dtype=np.uint64) << np.uint64(_CLASS_BITS)
    class_mask = np.uint64((1 << _CLASS_BITS) - 1)
    pos_keys = pair_key[is_pos]
    pos_offsets, pos_classes = np.searchsorted(pos_keys, bounds), (pos_keys & class_mask).astype(np.uint16)
    del pos_keys
    neg_keys = pair_key[~is_pos]
    del pair_key, is_pos
    neg_offsets, neg_classes = np.searchsorted(neg_keys, bounds), (neg_keys & class_mask).astype(np.uint16)
    del neg_keys, bounds
    parsed = ParsedSplit(
        image_ids=image_ids,
        pos_offsets=pos_offsets,
        pos_classes=pos_classes,
        neg_offsets=neg_offsets,
        neg_classes=neg_classes,
        rows=rows,
        counts={"non_trainable_rows": non_trainable, "duplicate_rows": duplicate_rows,
                "conflicting_pairs": conflicting_pairs, "malformed_rows": malformed},
    )
    log.info("%s: %d rows, %d images, %d positive and %d negative labels", path, rows, n_images,
             len(pos_classes), len(neg_classes))
    return parsed


def _data_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(physical line, fields by column name) of the data rows as pyarrow counts them: blank lines and
    rows with a wrong field count (which the reader skips) are left out."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for row in reader:
            if len(row) == len(header):
                yield reader.line_num, dict(zip(header, row))


def _physical_line(path: Path, k: int) -> int:
    """1-based line of the k-th (0-based) data row: a plain scan, used on the error path only."""
    for i, (line, _) in enumerate(_data_rows(path)):
        if i == k:
            return line
    return 0


def _conversion_error(path: Path, e: pa.ArrowInvalid, rows: int) -> IngestError:
    """The error for a value pyarrow could not convert (only Confidence is typed as a number)."""
    for line, row in _data_rows(path):
        value = row.get("Confidence", "")
        try:
            float(value)
        except ValueError:
            if value:  # an empty one is reported as such by the batch check
                return IngestError(f"{path}:{line}: Confidence {value!r} is not a number (1 = positive, "
                                   f"0 = verified negative)")
    return IngestError(f"{path}: after data row {rows}: {e}; the file is damaged, extract it again")


def _find_text_line(path: Path, text: str) -> int:
    with open(path, encoding="utf-8", newline=None) as f:
        for n, line in enumerate(f, 1):
            if line.rstrip("\n") == text:
                return n
    return 0


# ------------------------------------------------------------------------------------------- images

def list_jpegs(folder: Path) -> pa.Array:
    """Stems of the ``*.jpg`` files of a folder, listed once (``os.scandir``), as a string array."""
    chunks: list[pa.Array] = []
    names: list[str] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.endswith(".jpg"):
                    names.append(name[:-4])
                    if len(names) >= 1 << 20:  # bound the Python strings alive at a time
                        chunks.append(pa.array(names, pa.string()))
                        names = []
    except FileNotFoundError:
        log.warning("%s: image folder not found; every image of it is counted as not on disk", folder)
    chunks.append(pa.array(names, pa.string()))
    return pa.concat_arrays(chunks)


def image_layout(root: Path, images: Path | None, splits: list[str]) -> tuple[str, dict[str, Path]]:
    """("split-folders" | "flat", split -> folder holding that split's <ImageID>.jpg)."""
    base = Path(images) if images is not None else root
    if images is None or any((base / s).is_dir() for s in SPLITS):
        return "split-folders", {s: base / s for s in splits}
    return "flat", {s: base for s in splits}


# ------------------------------------------------------------------------------------------- records

class SplitRecords:
    """The records of one split, built lazily from the CSR arrays; iterable any number of times."""

    def __init__(self, parsed: ParsedSplit, keep: np.ndarray, folder: Path, rel_prefix: str):
        self.parsed = parsed
        self.index = np.flatnonzero(keep)  # image positions (sorted ImageID order) that become samples
        self.folder = os.fspath(folder)
        self.rel_prefix = rel_prefix

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[Record]:
        p = self.parsed
        folder, rel_prefix = self.folder, self.rel_prefix
        for c0 in range(0, len(self.index), _YIELD_CHUNK):
            sel = self.index[c0: c0 + _YIELD_CHUNK]
            ids = p.image_ids.take(pa.array(sel)).to_pylist()
            pa_, pb_ = p.pos_offsets[sel], p.pos_offsets[sel + 1]
            na_, nb_ = p.neg_offsets[sel], p.neg_offsets[sel + 1]
            p0, n0 = int(pa_[0]), int(na_[0])
            pos_all = p.pos_classes[p0: int(pb_[-1])].tolist()
            neg_all = p.neg_classes[n0: int(nb_[-1])].tolist()
            for iid, a, b, c, d in zip(ids, (pa_ - p0).tolist(), (pb_ - p0).tolist(), (na_ - n0).tolist(),
                                       (nb_ - n0).tolist()):
                yield Record(source_id=iid, rel_path=f"{rel_prefix}{iid}.jpg", pos=pos_all[a:b], neg=neg_all[c:d],
                             path=f"{folder}/{iid}.jpg")


# --------------------------------------------------------------------------------------------- build

def parse_splits(value: str | Sequence[str]) -> list[str]:
    """``"train,test"`` (the command line's form) or a sequence of split names -> the checked list."""
    names = value.split(",") if isinstance(value, str) else value
    out = [s.strip() for s in names if s.strip()]
    bad = [s for s in out if s not in SPLITS]
    if not out or bad or len(set(out)) != len(out):
        raise SystemExit(f"ingest openimages: --splits must be a comma-separated subset of {','.join(SPLITS)}, "
                         f"got {value!r}")
    return out


def plan(root: Path, *, images: Path | None = None, splits: str | Sequence[str] = SPLITS,
         strict: bool = False) -> IngestPlan:
    """The plan for the OpenImages V3 annotation folder ``root``.

    ``images`` holds the images (``<split>/<ImageID>.jpg`` or flat; default ``root/<split>/``);
    ``splits`` picks splits (names, or the command line's comma-separated string); ``strict`` makes a
    row with a wrong field count an error instead of a skipped, counted row.
    """
    root = Path(root)
    splits = parse_splits(splits)
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root}: not a folder")
    classes, class_files = read_classes(root)
    mids = [c["id"] for c in classes]
    layout, folders = image_layout(root, images, splits)
    on_disk: dict[Path, pa.Array] = {}  # a flat folder is listed once for all splits

    plan_splits: dict[str, SplitRecords] = {}
    counts: dict[str, dict[str, Any]] = {}
    files = [os.fspath(p) for p in class_files]
    for split in splits:
        csv_path = find_file(root, split, ANNOTATIONS)
        files.append(os.fspath(csv_path))
        parsed = parse_annotations(csv_path, mids, strict=strict)
        folder = folders[split]
        if folder not in on_disk:
            on_disk[folder] = list_jpegs(folder)
        has_label = parsed.num_labels > 0
        present = pc.is_in(parsed.image_ids, value_set=on_disk[folder]).to_numpy(zero_copy_only=False)
        keep = has_label & present
        missing = int(np.count_nonzero(has_label & ~present))
        rel_prefix = f"{split}/" if layout == "split-folders" else ""
        plan_splits[split] = SplitRecords(parsed, keep, folder, rel_prefix)
        # listed = written + missing + corrupt + skipped.*: image counts; the other keys count rows
        counts[split] = {
            "listed": len(parsed.image_ids),
            "skipped": {"no_trainable_label": int(np.count_nonzero(~has_label)), "not_on_disk": missing},
            "rows": parsed.rows,
            **parsed.counts,
        }
        log.info("%s: %d annotated images, %d on disk, %d not on disk", split, int(has_label.sum()),
                 len(plan_splits[split]), missing)
    return IngestPlan(
        dataset="openimages_v3",
        classes=classes,
        splits=plan_splits,
        unlisted=UNLISTED_UNKNOWN,
        source={
            "adapter": NAME,
            "root": os.fspath(root.resolve()),
            "files": files,
            "images": {s: os.fspath(Path(f).resolve()) for s, f in folders.items()},
            "image_layout": layout,
            "labels": "annotations-human.csv: Confidence 1 positive, 0 verified negative, no row unknown",
            "conflict_rule": "an (image, class) pair with both 1 and 0 rows becomes unknown",
            "missing_rule": "annotated images without <ImageID>.jpg in the image folder (one os.scandir per "
                            "folder) are counted as skipped.not_on_disk; no record is made",
        },
        counts=counts,
    )
