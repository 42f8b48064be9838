"""Read a dataset directory written by ``ingest``: manifest, shard paths, samples, and a full ``verify``.

``open_dataset`` validates the manifest, that every file it lists (shards, DALI indexes, labels.arrow)
exists with the listed size, and each split's ``labels.arrow`` schema: cheap (one ``stat`` per file),
it catches a truncated, extended or replaced file. ``verify="full"`` also hashes every file against the
manifest's sha256 (a same-size change: one byte of a label offset moves a label to another sample).
``verify`` reads every byte and reports every problem it finds as one line each, so ``ingest verify
DIR`` can list them all: every file's size and sha256 (``file_problems``), then the structure, whose
checks belong to the contract they check: ``shards.tar.verify_shard`` (a shard and its DALI index) and
``shards.labels.verify_labels`` (``labels.arrow``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
from tqdm import tqdm

from .format import LABELS_NAME, FormatError, Manifest, read_manifest
from .labels import check_labels_file, read_labels_table, verify_labels
from .tar import Sample, iter_samples, verify_shard

#: what ``open_dataset`` checks of every file: its size (default), or also its sha256 (reads everything)
VERIFY_MODES = ("size", "full")


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
        return read_labels_table(self.labels_path(split))

    def iter_samples(self, split: str) -> Iterator[Sample]:
        """Every sample of ``split`` in sample-id order, read sequentially from the shards."""
        expected = 0
        for path in self.shard_paths(split):
            for sample in iter_samples(path):
                if sample.sample_id != expected:
                    raise FormatError(f"{path}: sample {sample.key} has id {sample.sample_id}, expected {expected}; "
                                      "run `ingest verify` on the dataset")
                expected += 1
                yield sample


def file_problems(root: Path, manifest: Manifest, *, full: bool,
                  progress: bool = False) -> Iterator[tuple[str, str, bool]]:
    """(split, problem, whether the file is missing) for every file of ``manifest`` that is missing or whose
    size, or with ``full`` whose sha256, differs from the manifest's; a problem names the file and what
    differs, not the fix."""
    files = manifest.files()
    sizes = {}
    for rel, size, _ in files:
        path = root / rel
        try:
            sizes[rel] = path.stat().st_size
        except OSError:
            yield rel.split("/")[0], f"{path}: listed in manifest.json but not found", True
            continue
        if sizes[rel] != size:
            yield rel.split("/")[0], f"{path}: {sizes[rel]} bytes, manifest.json says {size}", False
    if not full:
        return
    todo = [(rel, sha) for rel, size, sha in files if sizes.get(rel) == size]
    with tqdm(total=sum(sizes[rel] for rel, _ in todo), desc=f"verify {root}", unit="B", unit_scale=True,
              disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:
        for rel, sha in todo:
            path = root / rel
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    bar.update(len(chunk))
            if h.hexdigest() != sha:
                yield rel.split("/")[0], f"{path}: sha256 {h.hexdigest()} differs from manifest.json ({sha})", False


def open_dataset(root: str | os.PathLike, verify: str = "size", progress: bool = False) -> Dataset:
    """Open a dataset directory: validates manifest.json, that every file it lists exists with its size
    (``verify="full"``: and its sha256, with a progress bar if ``progress``), and each labels.arrow schema.

    A problem is a ``FormatError`` naming the file and the fix.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    root = Path(root)
    manifest = read_manifest(root)
    for split, problem, missing in file_problems(root, manifest, full=verify == "full", progress=progress):
        why = "" if missing else "the file was changed after the ingest: run `ingest verify` on the dataset and "
        raise FormatError(f"{problem}; {why}re-run ingest for split {split!r}")
    for split, info in manifest.splits.items():
        path = root / split / LABELS_NAME
        unlisted = check_labels_file(path, split)
        if unlisted != info.unlisted:
            raise FormatError(f"{path}: unlisted={unlisted!r} but manifest.json says {info.unlisted!r}; re-run ingest")
    return Dataset(root, manifest)


# ----------------------------------------------------------------------------------------------- verify

def verify(root: str | os.PathLike) -> list[str]:
    """Read everything under ``root`` and return the problems found, one line each (empty: intact).

    Checks the manifest, then every file's size and sha256 against it (``file_problems``), then per split:
    each shard's members (keys in order, ``.idx`` holding the sample id, the json fields) and sample count,
    its DALI index against one rebuilt from the tar; labels.arrow's schema, row count, ``sample`` ==
    0..N-1, keys, class range, sorted unique lists, and the per-class counts in the manifest.
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except FormatError as e:
        return [str(e)]
    problems = [f"{problem}; re-run ingest for split {split!r}"
                for split, problem, _ in file_problems(root, manifest, full=True)]
    for split, info in manifest.splits.items():
        for sh in info.shards:
            if (root / split / sh.file).is_file():
                problems += verify_shard(root / split / sh.file, sh)
        path = root / split / LABELS_NAME
        if not path.is_file():
            continue  # reported above
        try:
            unlisted = check_labels_file(path, split)
        except FormatError as e:
            problems.append(str(e))
            continue
        if unlisted != info.unlisted:
            problems.append(f"{path}: unlisted={unlisted!r} but manifest.json says {info.unlisted!r}")
        problems += verify_labels(path, info, manifest.num_classes)
    return problems
