"""``<split>/labels.arrow``: its schema, how the writer writes it, how it is read and verified.

The file is an Arrow IPC file, uncompressed, with one record batch and one row per sample in sample-id
order (``LABEL_SCHEMA``: ``sample`` uint32, ``key`` string, ``pos`` and ``neg`` list<uint16>; schema
metadata ``unlisted`` and ``format_version``). ``LabelsBuilder`` collects the rows while an ingest runs
and ``write_labels`` writes them; ``read_labels`` maps the file as sparse CSR label matrices;
``verify_labels`` checks every row against the manifest.

A label matrix has ``num_samples`` rows (sample ids 0..N-1) and ``num_classes`` columns (class indices
0..K-1, manifest order). Each row holds two sorted-by-the-writer lists of class indices, ``pos`` and
``neg``; a class in neither list means what ``unlisted`` says ("negative" for completely annotated
datasets, "unknown" for partially annotated ones). Dense encoding, where one is built (a batch only):
+1 positive, -1 negative, 0 unknown (``shards.format.POS/NEG/UNK``).

CSR convention used throughout ``shards``: row ``i`` of a list column is
``values[offsets[i]:offsets[i + 1]]``, ``offsets[0] == 0``, ``len(offsets) == num_samples + 1``.
Offsets are int32 when they are a view of the file (Arrow ``list<uint16>`` offsets) and int64 when they
had to be built; code here accepts either. Values are uint16 (``format.MAX_CLASSES``).
"""
from __future__ import annotations

import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from .format import (
    FORMAT_VERSION,
    KEY_DIGITS,
    MAX_CLASSES,
    NEG,
    POS,
    UNLISTED_NEGATIVE,
    UNLISTED_UNKNOWN,
    UNLISTED_VALUES,
    FormatError,
    SplitInfo,
    sample_key,
)

LABEL_SCHEMA = pa.schema(
    [
        pa.field("sample", pa.uint32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("pos", pa.list_(pa.uint16()), nullable=False),
        pa.field("neg", pa.list_(pa.uint16()), nullable=False),
    ]
)


def label_schema(unlisted: str) -> pa.Schema:
    if unlisted not in UNLISTED_VALUES:
        raise ValueError(f"unlisted must be {UNLISTED_NEGATIVE!r} or {UNLISTED_UNKNOWN!r}, got {unlisted!r}")
    return LABEL_SCHEMA.with_metadata({b"unlisted": unlisted.encode(), b"format_version": str(FORMAT_VERSION).encode()})


def check_label_schema(schema: pa.Schema, where: str) -> str:
    """Validate a labels.arrow schema; return its ``unlisted`` value."""
    for f in LABEL_SCHEMA:
        if schema.get_field_index(f.name) < 0 or not schema.field(f.name).type.equals(f.type):
            try:  # one line: str(schema) has several
                columns = ", ".join(f"{c.name}: {c.type}" for c in schema)
            except UnicodeDecodeError:  # a damaged column name
                columns = "not readable (a column name is not UTF-8)"
            raise FormatError(f"{where}: column {f.name!r} must be {f.type}, the columns are {columns}; re-run ingest")
    meta = schema.metadata or {}
    unlisted = meta.get(b"unlisted", b"").decode("utf-8", errors="replace")
    if unlisted not in UNLISTED_VALUES:
        raise FormatError(
            f"{where}: schema metadata 'unlisted' must be {UNLISTED_NEGATIVE}|{UNLISTED_UNKNOWN}, got {unlisted!r}"
        )
    return unlisted


@dataclass(frozen=True, eq=False)
class SparseLabels:
    """A three-state label matrix [num_samples, num_classes] as two CSR structures (positives, negatives).

    ``unlisted`` says what an entry in neither list is: ``"negative"`` or ``"unknown"``.
    ``source`` names where the labels came from, for error messages.
    """

    pos_offsets: np.ndarray
    pos_values: np.ndarray
    neg_offsets: np.ndarray
    neg_values: np.ndarray
    num_classes: int
    unlisted: str
    source: str = "<memory>"

    def __post_init__(self) -> None:
        assert self.unlisted in UNLISTED_VALUES, self.unlisted
        assert len(self.pos_offsets) == len(self.neg_offsets) >= 1
        assert int(self.pos_offsets[0]) == 0 and int(self.neg_offsets[0]) == 0
        assert int(self.pos_offsets[-1]) == len(self.pos_values) and int(self.neg_offsets[-1]) == len(self.neg_values)

    @property
    def num_samples(self) -> int:
        return len(self.pos_offsets) - 1

    def dense(self, sample_ids) -> np.ndarray:
        """int8 [B, K] rows for ``sample_ids`` (+1 / -1 / 0). A class listed as both pos and neg reads +1."""
        ids = as_sample_ids(sample_ids, self.num_samples, self.source)
        fill = NEG if self.unlisted == UNLISTED_NEGATIVE else 0
        out = np.full((len(ids), self.num_classes), fill, dtype=np.int8)
        flat = out.reshape(-1)
        rows, cols = gather_rows(self.neg_offsets, self.neg_values, ids)
        flat[rows * self.num_classes + cols] = NEG
        rows, cols = gather_rows(self.pos_offsets, self.pos_values, ids)
        flat[rows * self.num_classes + cols] = POS
        return out

    def known_per_class(self, sample_ids=None) -> np.ndarray:
        """int64 [K]: per class, the number of rows (of ``sample_ids``, default all) whose label is known.

        With ``unlisted = negative`` every entry is known, so every class counts every row.
        """
        ids = None if sample_ids is None else as_sample_ids(sample_ids, self.num_samples, self.source)
        n = self.num_samples if ids is None else len(ids)
        if self.unlisted == UNLISTED_NEGATIVE:
            return np.full(self.num_classes, n, dtype=np.int64)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for offsets, values in ((self.pos_offsets, self.pos_values), (self.neg_offsets, self.neg_values)):
            cols = values if ids is None else gather_rows(offsets, values, ids)[1]
            counts += np.bincount(cols, minlength=self.num_classes)[: self.num_classes]
        return counts

    def positives_per_class(self, sample_ids=None) -> np.ndarray:
        """int64 [K]: per class, the number of rows (of ``sample_ids``, default all) listing it as positive."""
        cols = self.pos_values
        if sample_ids is not None:
            ids = as_sample_ids(sample_ids, self.num_samples, self.source)
            cols = gather_rows(self.pos_offsets, self.pos_values, ids)[1]
        return np.bincount(cols, minlength=self.num_classes)[: self.num_classes].astype(np.int64)

    @staticmethod
    def from_dense(matrix: np.ndarray, unlisted: str, source: str = "<dense>") -> "SparseLabels":
        """Build from an int8 [N, K] matrix (+1 / -1 / 0). With ``unlisted = negative`` a 0 is an error.

        For tests and small data; the sparse result lists negatives explicitly only when
        ``unlisted = unknown`` (with ``negative`` they are implied, as ``ingest`` writes them).
        """
        m = np.asarray(matrix)
        if m.ndim != 2:
            raise ValueError(f"{source}: expected a 2-D label matrix, got shape {m.shape}")
        if not np.isin(m, (POS, NEG, 0)).all():
            raise ValueError(f"{source}: labels must be +1, -1 or 0")
        if unlisted == UNLISTED_NEGATIVE and (m == 0).any():
            raise ValueError(
                f"{source}: unlisted={UNLISTED_NEGATIVE!r} cannot express unknown (0) entries; use {UNLISTED_UNKNOWN!r}"
            )
        n, k = m.shape
        pos_r, pos_c = np.nonzero(m == POS)
        pos_off = csr_offsets(pos_r, n)
        if unlisted == UNLISTED_UNKNOWN:
            neg_r, neg_c = np.nonzero(m == NEG)
        else:
            neg_r = neg_c = np.zeros(0, dtype=np.int64)
        neg_off = csr_offsets(neg_r, n)
        return SparseLabels(pos_off, pos_c.astype(np.uint16), neg_off, neg_c.astype(np.uint16), k, unlisted, source)


def as_sample_ids(sample_ids, num_samples: int, where: str) -> np.ndarray:
    """1-D int64 array of sample ids, each in 0..num_samples-1 (torch tensors are moved to the CPU)."""
    if hasattr(sample_ids, "detach"):  # a torch tensor, possibly on an accelerator
        sample_ids = sample_ids.detach().cpu().numpy()
    ids = np.asarray(sample_ids)
    if ids.ndim != 1:
        raise ValueError(f"{where}: sample ids must be 1-D, got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: sample ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= num_samples):
        bad = ids[(ids < 0) | (ids >= num_samples)][0]
        raise IndexError(f"{where}: sample id {bad} out of range 0..{num_samples - 1}")
    return ids


def gather_rows(offsets: np.ndarray, values: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The entries of CSR rows ``ids`` as (position of the row in ``ids``: int64, value: ``values.dtype``).

    Vectorised (no loop per row): one ``np.repeat`` over the row lengths and one fancy index into values.
    """
    starts = offsets[ids].astype(np.int64, copy=False)
    lengths = offsets[ids + 1].astype(np.int64, copy=False) - starts
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
    # position of entry j of the batch in ``values``: starts[row] + (j - first entry of row in the batch)
    shift = starts - (np.cumsum(lengths) - lengths)
    positions = np.arange(total, dtype=np.int64) + shift[rows]
    return rows, values[positions]


def csr_offsets(sorted_rows: np.ndarray, num_rows: int) -> np.ndarray:
    """int64 offsets [num_rows + 1] of a CSR whose entries have the given non-decreasing row indices."""
    return np.searchsorted(sorted_rows, np.arange(num_rows + 1), side="left").astype(np.int64)


def row_ids(offsets: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
    """int64 row index of every entry of rows start..stop-1 (the CSR expanded to COO rows)."""
    stop = len(offsets) - 1 if stop is None else stop
    lengths = np.diff(offsets[start : stop + 1]).astype(np.int64, copy=False)
    return np.repeat(np.arange(start, stop, dtype=np.int64), lengths)


def rows_sorted_unique(offsets: np.ndarray, values: np.ndarray) -> bool:
    """Whether every row's values are strictly increasing (the canonical form ``np.nonzero`` would give)."""
    if len(values) < 2:
        return True
    increasing = np.diff(values.astype(np.int32)) > 0
    # a decrease between the last entry of a row and the first entry of the next one is allowed
    starts = np.asarray(offsets[1:-1], dtype=np.int64)
    starts = starts[(starts > 0) & (starts < len(values))]
    increasing[starts - 1] = True
    return bool(increasing.all())


def canonical_rows(offsets: np.ndarray, values: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row and drop duplicate classes; returns the input unchanged when already canonical."""
    if rows_sorted_unique(offsets, values):
        return offsets, values
    keys = np.unique(row_ids(offsets) * num_classes + values.astype(np.int64))
    return csr_offsets(keys // num_classes, len(offsets) - 1), (keys % num_classes).astype(np.uint16)


def read_labels(path: str | os.PathLike, num_classes: int) -> SparseLabels:
    """Open ``labels.arrow`` memory-mapped and return its CSR views.

    ``num_classes`` comes from the manifest. With one record batch (what ``ingest`` writes) the arrays
    are zero-copy views of the mapped file. A file with several batches is combined once: the values
    are copied (2 bytes per listed label) and int64 offsets are built (8 bytes per sample and column),
    so such a file costs that much RSS instead of page cache.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise FormatError(f"{where}: not found; run `ingest` for this split or check the dataset directory")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"{where}: num_classes must be 1..65535 (from the manifest), got {num_classes}")
    reader = open_labels_file(path)
    unlisted = check_label_schema(reader.schema, where)
    try:
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        for b in batches:
            # offsets past their buffers (a damaged file) would be read from outside the mapping: SIGBUS
            for name in ("sample", "pos", "neg"):
                b.column(name).validate(full=True)
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{where}: a record batch is unreadable ({e}); re-run ingest for this split") from e

    first = 0
    pos_parts, neg_parts = [], []
    for b in batches:
        sample = b.column("sample")
        if sample.null_count or b.column("pos").null_count or b.column("neg").null_count:
            raise FormatError(f"{where}: null entries in a non-nullable column; re-run ingest for this split")
        ids = sample.to_numpy(zero_copy_only=True)
        if len(ids) and (int(ids[0]) != first
                         or not np.array_equal(ids, np.arange(first, first + len(ids), dtype=np.uint32))):
            bad = int(np.flatnonzero(ids != np.arange(first, first + len(ids)))[0])
            raise FormatError(
                f"{where}: row {first + bad} has sample {int(ids[bad])}; rows must be sample ids 0..N-1 in order. "
                "Re-run ingest for this split"
            )
        first += len(ids)
        pos_parts.append(_list_csr(b.column("pos"), where))
        neg_parts.append(_list_csr(b.column("neg"), where))
    pos_off, pos_val = _combine(pos_parts)
    neg_off, neg_val = _combine(neg_parts)
    for name, values in (("pos", pos_val), ("neg", neg_val)):
        if len(values) and int(values.max()) >= num_classes:
            raise FormatError(
                f"{where}: column {name!r} holds class {int(values.max())} but the manifest has {num_classes} classes; "
                "the labels and manifest.json are from different ingests"
            )
    return SparseLabels(pos_off, pos_val, neg_off, neg_val, num_classes, unlisted, where)


def _list_csr(column: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray]:
    # ``offsets`` accounts for a slice offset of the list array; it indexes the whole child ``values``
    offsets = column.offsets.to_numpy(zero_copy_only=True)
    values = column.values.to_numpy(zero_copy_only=True)
    lo, hi = int(offsets[0]), int(offsets[-1])
    if lo != 0 or hi != len(values):
        offsets = offsets - offsets[0]
        values = values[lo:hi]
    return offsets, values


def _combine(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint16)
    if len(parts) == 1:
        return parts[0]
    sizes = np.array([len(v) for _, v in parts], dtype=np.int64)
    bases = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    offsets = np.concatenate([o[:-1].astype(np.int64) + base for (o, _), base in zip(parts, bases)] + [[sizes.sum()]])
    values = np.concatenate([v for _, v in parts])
    return offsets, values


def class_counts(
    pos_values: np.ndarray, neg_values: np.ndarray, num_samples: int, num_classes: int, unlisted: str
) -> tuple[np.ndarray, np.ndarray]:
    """(positives, known) per class [K] of a split: the manifest's ``positives_per_class`` and
    ``known_per_class`` (listed positives + listed negatives; every sample when unlisted = negative)."""
    positives = np.bincount(pos_values, minlength=num_classes)
    if unlisted == UNLISTED_NEGATIVE:
        return positives, np.full(num_classes, num_samples, dtype=np.int64)
    return positives, positives + np.bincount(neg_values, minlength=num_classes)


# ----------------------------------------------------------------------------------------------- write


class LabelsBuilder:
    """Labels of the written samples of one split, row by row, as flat CSR arrays (not Python lists per row)."""

    def __init__(self) -> None:
        self.pos_values = array("H")
        self.neg_values = array("H")
        self.pos_offsets = array("q", [0])
        self.neg_offsets = array("q", [0])

    def __len__(self) -> int:
        return len(self.pos_offsets) - 1

    def add(self, pos: tuple[int, ...], neg: tuple[int, ...]) -> None:
        self.pos_values.extend(pos)
        self.neg_values.extend(neg)
        self.pos_offsets.append(len(self.pos_values))
        self.neg_offsets.append(len(self.neg_values))

    def class_counts(self, num_classes: int, unlisted: str) -> tuple[np.ndarray, np.ndarray]:
        """(positives, known) per class, see ``class_counts``."""
        return class_counts(np.frombuffer(self.pos_values, dtype=np.uint16),
                            np.frombuffer(self.neg_values, dtype=np.uint16), len(self), num_classes, unlisted)


def write_labels(path: Path, labels: LabelsBuilder, unlisted: str) -> None:
    """Write ``labels`` as ``path`` (temporary name, fsync, rename); the caller fsyncs the folder."""
    n = len(labels)
    assert n * KEY_DIGITS < 2**31 and len(labels.pos_values) < 2**31 and len(labels.neg_values) < 2**31
    keys = pa.StringArray.from_buffers(
        n,
        pa.py_buffer(np.arange(n + 1, dtype=np.int32) * np.int32(KEY_DIGITS)),
        pa.py_buffer("".join(sample_key(i) for i in range(n)).encode("ascii")),
    )

    def lists(offsets: array, values: array) -> pa.ListArray:
        return pa.ListArray.from_arrays(
            pa.array(np.frombuffer(offsets, dtype=np.int64).astype(np.int32)),
            pa.array(np.frombuffer(values, dtype=np.uint16), type=pa.uint16()),
        )

    schema = label_schema(unlisted)
    batch = pa.RecordBatch.from_arrays(
        [pa.array(np.arange(n, dtype=np.uint32)), keys, lists(labels.pos_offsets, labels.pos_values),
         lists(labels.neg_offsets, labels.neg_values)],
        schema=schema,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    # one record batch, uncompressed: readers map the file and use the list columns as CSR views
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, schema) as w:
        w.write_batch(batch)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- verify


def open_labels_file(path: Path, split: str | None = None) -> ipc.RecordBatchFileReader:
    """``labels.arrow`` memory-mapped, as an Arrow IPC file reader; a ``FormatError`` naming the file when it is
    missing or not an IPC file (a damaged footer included: pyarrow's message names no file)."""
    fix = f"re-run ingest for split {split!r}" if split else "re-run ingest for this split"
    try:
        return ipc.open_file(pa.memory_map(str(path), "r"))
    except FileNotFoundError:
        raise FormatError(f"{path}: not found; {fix}") from None
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{path}: not an Arrow IPC file ({e}); {fix}") from e


def check_labels_file(path: Path, split: str) -> str:
    """Open ``labels.arrow`` of ``split`` and validate its schema (not its rows); return its ``unlisted``."""
    return check_label_schema(open_labels_file(path, split).schema, str(path))


def read_labels_table(path: Path) -> pa.Table:
    """``labels.arrow`` as a memory-mapped Arrow table (zero-copy)."""
    try:
        table = open_labels_file(path).read_all()
        table.validate(full=True)  # as in read_labels: a damaged offset must not be followed out of the file
        return table
    except (pa.ArrowException, OSError) as e:
        raise FormatError(f"{path}: a record batch is unreadable ({e}); re-run ingest for this split") from e


def verify_labels(path: Path, info: SplitInfo, num_classes: int) -> list[str]:
    """Every problem of a split's ``labels.arrow`` against its manifest entry, one line each: row count,
    ``sample`` == 0..N-1, keys, class range, sorted unique disjoint lists, per-class counts."""
    k = num_classes
    try:
        table = read_labels_table(path)
    except FormatError as e:
        return [str(e)]
    n = info.num_samples
    if table.num_rows != n:
        return [f"{path}: {table.num_rows} rows, manifest.json says {n} samples"]
    problems = []
    ids = table.column("sample").to_numpy()
    if not np.array_equal(ids, np.arange(n, dtype=ids.dtype)):
        bad = int(np.flatnonzero(ids != np.arange(n))[0])
        problems.append(f"{path}: row {bad} has sample {int(ids[bad])}; the sample column must be 0..N-1")
    keys = table.column("key").to_pylist()
    bad_keys = [i for i, key in enumerate(keys) if key != sample_key(i)]
    if bad_keys:
        row = bad_keys[0]
        problems.append(f"{path}: row {row} has key {keys[row]!r}, expected {sample_key(row)!r}")
    columns, cells = {}, {}
    for name in ("pos", "neg"):
        col = table.column(name).combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        values = col.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int64)
        if len(values) and int(values.max()) >= k:
            problems.append(f"{path}: column {name!r} holds class {int(values.max())}, the manifest has {k} classes")
            return problems
        # (row, class) as one int64; the lists are sorted unique per row iff these strictly increase
        cells[name] = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets)) * k + values
        bad = np.flatnonzero(np.diff(cells[name]) <= 0)
        if len(bad):
            problems.append(f"{path}: row {int(cells[name][bad[0]] // k)} column {name!r} is not sorted unique")
        columns[name] = values
    both = np.intersect1d(cells["pos"], cells["neg"])
    if len(both):
        problems.append(f"{path}: row {int(both[0] // k)} lists class {int(both[0] % k)} as both positive and negative")
    positives, known = class_counts(columns["pos"], columns["neg"], n, k, info.unlisted)
    if [int(x) for x in positives] != info.positives_per_class:
        problems.append(f"{path}: positives per class differ from manifest.json positives_per_class")
    if [int(x) for x in known] != info.known_per_class:
        problems.append(f"{path}: known labels per class differ from manifest.json known_per_class")
    return problems
