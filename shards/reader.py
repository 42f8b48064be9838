"""Read a dataset directory written by ``ingest``: manifest, shard paths, samples, and a full ``verify``.

``open_dataset`` validates the manifest and each split's ``labels.arrow`` schema (not the shard
bytes, which would mean reading everything); ``verify`` reads every byte and reports every problem it
finds as one line each, so ``ingest verify DIR`` can list them all. The checks themselves belong to the
contract they check: ``shards.tar.verify_shard`` (a shard and its DALI index) and
``shards.labels.verify_labels`` (``labels.arrow``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from .format import LABELS_NAME, FormatError, Manifest, read_manifest
from .labels import check_labels_file, read_labels_table, verify_labels
from .tar import Sample, iter_samples, verify_shard


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


def open_dataset(root: str | os.PathLike) -> Dataset:
    """Open a dataset directory; validates manifest.json, that every shard exists, and each labels.arrow schema."""
    root = Path(root)
    manifest = read_manifest(root)
    for split, info in manifest.splits.items():
        for sh in info.shards:
            if not (root / split / sh.file).is_file():
                raise FormatError(f"{root / split / sh.file}: listed in manifest.json but not found; re-run ingest")
        path = root / split / LABELS_NAME
        unlisted = check_labels_file(path, split)
        if unlisted != info.unlisted:
            raise FormatError(f"{path}: unlisted={unlisted!r} but manifest.json says {info.unlisted!r}; re-run ingest")
    return Dataset(root, manifest)


# ----------------------------------------------------------------------------------------------- verify

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
            problems += verify_shard(ds.root / split / sh.file, sh)
        problems += verify_labels(ds.labels_path(split), info, ds.num_classes)
    return problems
