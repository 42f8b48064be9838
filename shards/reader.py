"""Read a dataset directory written by ``ingest``: manifest, shard paths, samples, and a full ``verify``.

``open_dataset`` validates the manifest and each split's ``labels.arrow`` schema (not the shard
bytes, which would mean reading everything); ``verify`` reads every byte and reports every problem it
finds as one line each, so ``ingest verify DIR`` can list them all.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from largeloss.shards.format import (
    LABELS_NAME,
    UNLISTED_NEGATIVE,
    FormatError,
    Manifest,
    check_label_schema,
    read_manifest,
    sample_key,
)
from largeloss.shards.writer import MEMBER_EXTS, dali_index_text, file_sha256

#: members every sample has, by extension
SAMPLE_EXTS = frozenset(MEMBER_EXTS)


@dataclass(frozen=True)
class Sample:
    sample_id: int
    key: str
    jpeg: bytes  # the source JPEG bytes, unchanged
    meta: dict[str, Any]  # <key>.json: source_id, rel_path, width, height, plus the adapter's meta (boxes ...)


class Dataset:
    """A dataset directory written by ``ingest`` (see docs/FORMAT.md)."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def split_names(self) -> list[str]:
        return list(self.manifest.splits)

    def _split(self, split: str):
        try:
            return self.manifest.splits[split]
        except KeyError:
            raise ValueError(f"{self.root}: no split {split!r}; the manifest has {self.split_names}") from None

    def split_dir(self, split: str) -> Path:
        self._split(split)
        return self.root / split

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / split / sh.file for sh in self._split(split).shards]

    def dali_index_paths(self, split: str) -> list[Path]:
        """The DALI index of each shard, in the order of ``shard_paths``."""
        return [p.with_suffix(".idx") for p in self.shard_paths(split)]

    def labels_path(self, split: str) -> Path:
        return self.split_dir(split) / LABELS_NAME

    def num_samples(self, split: str) -> int:
        return self._split(split).num_samples

    def unlisted(self, split: str) -> str:
        return self._split(split).unlisted

    def labels_table(self, split: str) -> pa.Table:
        """``labels.arrow`` of ``split`` as a memory-mapped Arrow table (zero-copy)."""
        path = self.labels_path(split)
        return ipc.open_file(pa.memory_map(str(path), "r")).read_all()

    def iter_samples(self, split: str) -> Iterator[Sample]:
        """Every sample of ``split`` in sample-id order, read sequentially from the shards."""
        expected = 0
        for path in self.shard_paths(split):
            for sample in _iter_tar(path):
                if sample.sample_id != expected:
                    raise FormatError(f"{path}: sample {sample.key} has id {sample.sample_id}, expected {expected}; "
                                      "run `ingest verify` on the dataset")
                expected += 1
                yield sample


def _iter_tar(path: Path) -> Iterator[Sample]:
    """Samples of one shard; raises FormatError for a member layout the writer does not produce."""
    key = None
    parts: dict[str, bytes] = {}

    def finish() -> Sample:
        missing = SAMPLE_EXTS - set(parts)
        if missing:
            raise FormatError(f"{path}: sample {key} lacks {sorted(missing)}; re-run ingest for this split")
        sid = int.from_bytes(parts["idx"], "little", signed=True)
        if len(parts["idx"]) != 4 or sample_key(sid) != key:
            raise FormatError(f"{path}: {key}.idx holds {parts['idx'].hex()}, not the key's id as int32 LE")
        try:
            meta = json.loads(parts["json"])
        except ValueError as e:
            raise FormatError(f"{path}: {key}.json is not JSON ({e})") from e
        return Sample(sid, key, parts["jpg"], meta)

    try:
        with tarfile.open(path, mode="r|") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                base, _, ext = m.name.partition(".")
                if ext not in SAMPLE_EXTS:
                    raise FormatError(f"{path}: unexpected member {m.name!r}; samples hold only .idx, .jpg, .json")
                if base != key:
                    if key is not None:
                        yield finish()
                    key, parts = base, {}
                if ext in parts:
                    raise FormatError(f"{path}: member {m.name!r} appears twice")
                parts[ext] = tf.extractfile(m).read()
    except tarfile.TarError as e:
        raise FormatError(f"{path}: not a readable tar ({e}); re-run ingest for this split") from e
    if key is not None:
        yield finish()


def open_dataset(root: str | os.PathLike) -> Dataset:
    """Open a dataset directory; validates manifest.json, that every shard exists, and each labels.arrow schema."""
    root = Path(root)
    manifest = read_manifest(root)
    for split, info in manifest.splits.items():
        for sh in info.shards:
            if not (root / split / sh.file).is_file():
                raise FormatError(f"{root / split / sh.file}: listed in manifest.json but not found; re-run ingest")
        path = root / split / LABELS_NAME
        try:
            schema = ipc.open_file(pa.memory_map(str(path), "r")).schema
        except FileNotFoundError:
            raise FormatError(f"{path}: not found; re-run ingest for split {split!r}") from None
        except pa.ArrowInvalid as e:
            raise FormatError(f"{path}: not an Arrow IPC file ({e}); re-run ingest for split {split!r}") from e
        unlisted = check_label_schema(schema, str(path))
        if unlisted != info.unlisted:
            raise FormatError(f"{path}: unlisted={unlisted!r} but manifest.json says {info.unlisted!r}; re-run ingest")
    return Dataset(root, manifest)


# ----------------------------------------------------------------------------------------------- verify

def _verify_shard(ds: Dataset, split: str, sh) -> list[str]:
    path = ds.root / split / sh.file
    problems = []
    size = path.stat().st_size
    if size != sh.size:
        problems.append(f"{path}: {size} bytes, manifest.json says {sh.size}")
    digest = file_sha256(path)
    if digest != sh.sha256:
        problems.append(f"{path}: sha256 {digest} differs from manifest.json ({sh.sha256})")
    n = 0
    try:
        for sample in _iter_tar(path):
            want = sh.first_sample + n
            if sample.sample_id != want:
                problems.append(f"{path}: sample {n} of the shard has id {sample.sample_id}, expected {want}")
                break
            for field in ("source_id", "rel_path", "width", "height"):
                if field not in sample.meta:
                    problems.append(f"{path}: {sample.key}.json lacks {field!r}")
            n += 1
    except FormatError as e:
        problems.append(str(e))
        return problems
    if n != sh.num_samples:
        problems.append(f"{path}: holds {n} samples, manifest.json says {sh.num_samples}")
    idx = path.with_suffix(".idx")
    try:
        if idx.read_text(encoding="ascii") != dali_index_text(path):
            problems.append(f"{idx}: does not match the DALI index of {path.name}; re-run ingest")
    except FileNotFoundError:
        problems.append(f"{idx}: DALI index not found")
    except (ValueError, tarfile.TarError) as e:
        problems.append(f"{idx}: cannot be checked ({e})")
    return problems


def _verify_labels(ds: Dataset, split: str) -> list[str]:
    path = ds.labels_path(split)
    info = ds.manifest.splits[split]
    k = ds.num_classes
    try:
        table = ds.labels_table(split)
    except (OSError, pa.ArrowInvalid) as e:
        return [f"{path}: unreadable ({e})"]
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
    counts, cells = {}, {}
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
        counts[name] = np.bincount(values, minlength=k)
    both = np.intersect1d(cells["pos"], cells["neg"])
    if len(both):
        problems.append(f"{path}: row {int(both[0] // k)} lists class {int(both[0] % k)} as both positive and negative")
    if [int(x) for x in counts["pos"]] != info.positives_per_class:
        problems.append(f"{path}: positives per class differ from manifest.json positives_per_class")
    known = np.full(k, n) if info.unlisted == UNLISTED_NEGATIVE else counts["pos"] + counts["neg"]
    if [int(x) for x in known] != info.known_per_class:
        problems.append(f"{path}: known labels per class differ from manifest.json known_per_class")
    return problems


def verify(root: str | os.PathLike) -> list[str]:
    """Read everything under ``root`` and return the problems found, one line each (empty: intact).

    Checks per split: each shard's size and sha256 against the manifest; its members (keys in order,
    ``.idx`` holding the sample id, the json fields) and sample count; its DALI index against one rebuilt
    from the tar; labels.arrow's row count, ``sample`` == 0..N-1, keys, class range, sorted unique lists,
    and the per-class counts in the manifest.
    """
    try:
        ds = open_dataset(root)
    except FormatError as e:
        return [str(e)]
    problems: list[str] = []
    for split, info in ds.manifest.splits.items():
        for sh in info.shards:
            problems += _verify_shard(ds, split, sh)
        problems += _verify_labels(ds, split)
    return problems
