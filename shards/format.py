"""The on-disk contract between ``ingest`` and everything that reads a dataset directory.

Declared once in ``shards`` and validated on read (docs/FORMAT.md is the prose version)::

    DIR/manifest.json          ``Manifest`` (here)
    DIR/<split>/NNNNNN.tar     WebDataset shard: <key>.idx, <key>.jpg (source bytes), <key>.json (``shards.tar``)
    DIR/<split>/NNNNNN.idx     DALI index of the shard (``shards.tar``)
    DIR/<split>/labels.arrow   Arrow IPC file, one row per sample in sample-id order (``shards.labels``)
    DIR/.ingest/               the writer's fingerprint, per-shard sidecars and lock (``shards.ingest_state``)

The input side of the contract is here too: what a dataset adapter (``ingest/<name>.py``) hands to the
writer (``IngestPlan`` of ``Record``s) and the error it raises for bad input (``IngestError``).

Label encoding (everywhere in memory): +1 observed positive, -1 observed negative, 0 unknown.
Class indices are dense 0..K-1 in the order of ``Manifest.classes``.
Sample ids are dense 0..N-1 per split; a sample's WebDataset key is its zero-padded id (``sample_key``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

FORMAT_VERSION = 1
#: bump whenever the bytes written for the same plan change (tar layout, json fields, labels layout)
WRITER_VERSION = 1

POS, NEG, UNK = 1, -1, 0

#: ``unlisted`` metadata: what a class that is in neither ``pos`` nor ``neg`` means for that row.
UNLISTED_NEGATIVE = "negative"  # complete annotation (VOC, COCO, NUS-WIDE, CUB)
UNLISTED_UNKNOWN = "unknown"  # partial annotation (OpenImages)
UNLISTED_VALUES = (UNLISTED_NEGATIVE, UNLISTED_UNKNOWN)

MAX_CLASSES = 65535  # class indices are stored as uint16
KEY_DIGITS = 9  # enough for 10^9 samples per split

MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.arrow"


class FormatError(ValueError):
    """A dataset directory that does not follow this contract; the message names the file."""


class IngestError(ValueError):
    """Bad input to an ingest (source files, plan, output folder); the message names the file and the fix."""


def sample_key(sample_id: int) -> str:
    return f"{int(sample_id):0{KEY_DIGITS}d}"


def shard_name(index: int) -> str:
    return f"{int(index):06d}.tar"


@dataclass
class ShardInfo:
    file: str  # relative to the split folder, e.g. "000003.tar"
    num_samples: int
    first_sample: int  # sample ids in this shard are first_sample .. first_sample + num_samples - 1
    size: int  # bytes
    sha256: str


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo]
    unlisted: str  # same as the labels.arrow metadata
    #: per-class count of samples whose label for that class is known (pos + neg + unlisted-negative);
    #: used for the G1..G5 groups (computed by the writer)
    known_per_class: list[int] = field(default_factory=list)
    positives_per_class: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    format_version: int
    dataset: str
    classes: list[dict[str, Any]]  # [{"index": i, "id": source id, "name": display name}]
    splits: dict[str, SplitInfo]
    #: per split: {"listed": n, "written": n, "missing": n, "corrupt": n, "skipped": {reason: n}}
    counts: dict[str, dict[str, Any]]
    source: dict[str, Any]  # provenance: root, arguments, tool version, which source files were read

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        for k in ("format_version", "dataset", "classes", "splits", "counts", "source"):
            if k not in d:
                raise FormatError(f"{where}: missing key {k!r}; re-run ingest to rewrite the manifest")
        if d["format_version"] != FORMAT_VERSION:
            raise FormatError(
                f"{where}: format_version {d['format_version']} but this code reads {FORMAT_VERSION}; re-run ingest"
            )
        classes = d["classes"]
        for i, c in enumerate(classes):
            if c.get("index") != i or "name" not in c or "id" not in c:
                raise FormatError(f"{where}: classes[{i}] must be {{index: {i}, id, name}}, got {c!r}")
        if len(classes) > MAX_CLASSES:
            raise FormatError(f"{where}: {len(classes)} classes, at most {MAX_CLASSES} fit in uint16")
        splits = {}
        for name, s in d["splits"].items():
            shards = [ShardInfo(**sh) for sh in s["shards"]]
            expected = 0
            for sh in shards:
                if sh.first_sample != expected:
                    raise FormatError(
                        f"{where}: split {name!r} shard {sh.file} starts at {sh.first_sample}, expected {expected}"
                    )
                expected += sh.num_samples
            if expected != s["num_samples"]:
                raise FormatError(
                    f"{where}: split {name!r} shards hold {expected} samples, num_samples says {s['num_samples']}"
                )
            splits[name] = SplitInfo(
                num_samples=s["num_samples"],
                shards=shards,
                unlisted=s["unlisted"],
                known_per_class=list(s.get("known_per_class", [])),
                positives_per_class=list(s.get("positives_per_class", [])),
            )
        return Manifest(
            format_version=d["format_version"],
            dataset=d["dataset"],
            classes=classes,
            splits=splits,
            counts=d["counts"],
            source=d["source"],
        )


def read_manifest(root: str | os.PathLike) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{path}: not found; is {root} a dataset directory written by `ingest`?")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    return Manifest.from_dict(d, where=str(path))


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write, fsync and rename so that readers see the old or the new file, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Record:
    """What a dataset adapter yields for one source image; the writer turns it into one sample.

    Adapters never read or decode images: they name the file (``path``) or, for sources that ship
    pixels in arrays, hand over encoded bytes (``data``). Class indices follow the manifest order.
    ``pos``/``neg`` are observed-by-the-source labels; with ``unlisted = negative`` (complete
    annotation) ``neg`` is normally empty and every unlisted class is negative.
    """

    source_id: str  # the image id in the source dataset, kept as a string ("2008_000002", OpenImages hex ids)
    rel_path: str  # path relative to the dataset root, as the source names it
    pos: list[int]
    neg: list[int] = field(default_factory=list)
    path: str | None = None  # absolute path of the JPEG on disk
    data: bytes | None = None  # encoded image bytes when there is no file
    #: extra metadata for <key>.json: width/height from the source when it has them, and
    #: boxes as [{"class": index, "bbox": [xmin, ymin, xmax, ymax]}] in absolute pixels (floats)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class IngestPlan:
    """What a dataset adapter hands to the writer (``shards.writer.write_dataset``).

    Every adapter module (``ingest/<name>.py``) exposes ``NAME`` (the sub-command), ``HELP`` (one line),
    ``DESCRIPTION`` (the ``--help`` text: the folder layout it expects), ``add_arguments(parser)`` (its
    own options; the CLI adds the common ones: ``--out``, ``--shard-size``, ``--workers``, ``--strict``,
    ``--no-progress``) and ``build(args) -> IngestPlan``, which parses the native files and yields
    ``Record``s without reading image bytes.
    """

    dataset: str  # "voc2012", "coco2014", "nuswide", "cub", "openimages_v3", "demo", ...
    classes: list[dict[str, Any]]  # [{"index": i, "id": source id, "name": display name}]
    #: split name -> records in sample-id order ("train" = official train list, "test" = official val/test)
    splits: dict[str, Iterable[Record]]
    unlisted: str  # UNLISTED_NEGATIVE or UNLISTED_UNKNOWN
    source: dict[str, Any] = field(default_factory=dict)  # provenance: root, files read, options
    #: what the adapter itself left out before any image was looked at, per split:
    #: {"train": {"skipped": {"no_positive": 12, "non_trainable_rows": 40}}}; the writer merges these
    #: with its own counts (written / missing / corrupt) into the manifest
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)
