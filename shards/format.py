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

import errno
import fcntl
import hashlib
import json
import os
import re
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable

#: 2: the manifest lists the size and sha256 of every file (shard, DALI index, labels.arrow); a manifest of
#: another version is refused (``Manifest.from_dict``): the fix is a new ingest
FORMAT_VERSION = 2
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
#: split names name folders: letters, digits, '_' or '-'
SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


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
    idx_size: int  # bytes of the DALI index NNNNNN.idx
    idx_sha256: str


@dataclass
class SplitInfo:
    num_samples: int
    shards: list[ShardInfo]
    unlisted: str  # same as the labels.arrow metadata
    labels_size: int  # bytes of labels.arrow
    labels_sha256: str
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

    def files(self) -> list[tuple[str, int, str]]:
        """Every file of the dataset as (path relative to the dataset folder, size, sha256), split by split:
        each shard and its DALI index, then ``labels.arrow``."""
        out = []
        for split, info in self.splits.items():
            for sh in info.shards:
                out.append((f"{split}/{sh.file}", sh.size, sh.sha256))
                out.append((f"{split}/{sh.file[:-4]}.idx", sh.idx_size, sh.idx_sha256))
            out.append((f"{split}/{LABELS_NAME}", info.labels_size, info.labels_sha256))
        return out

    @staticmethod
    def from_dict(d: Any, where: str = MANIFEST_NAME) -> "Manifest":
        """Validate a parsed manifest.json: every key, type and shard entry; a problem is a ``FormatError``
        naming ``where`` and the key path (``splits.train.shards[3].size``)."""
        check = _Checker(where)
        check.keys(d, "manifest", [f.name for f in fields(Manifest)])
        version = d["format_version"]
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{where}: format_version {version!r} but this code reads {FORMAT_VERSION}; the dataset was written "
                "by another version of ingest: re-run the ingest command with --overwrite")
        dataset = check.typed(d["dataset"], "dataset", str)
        classes = check.typed(d["classes"], "classes", list)
        for i, c in enumerate(classes):
            if not isinstance(c, dict) or c.get("index") != i or "name" not in c or "id" not in c:
                raise FormatError(f"{where}: classes[{i}] must be {{index: {i}, id, name}}, got {c!r}; re-run ingest")
        if len(classes) > MAX_CLASSES:
            raise FormatError(f"{where}: {len(classes)} classes, at most {MAX_CLASSES} fit in uint16")
        splits = {}
        for name, s in check.typed(d["splits"], "splits", dict).items():
            if not SPLIT_NAME_RE.match(name):
                raise FormatError(f"{where}: split name {name!r} is not a folder name (letters, digits, '_', '-'); "
                                  "re-run ingest")
            path = f"splits.{name}"
            check.keys(s, path, [f.name for f in fields(SplitInfo)],
                       optional=("known_per_class", "positives_per_class"))
            shards = []
            expected = 0
            for k, sh in enumerate(check.typed(s["shards"], f"{path}.shards", list)):
                at = f"{path}.shards[{k}]"
                check.keys(sh, at, [f.name for f in fields(ShardInfo)])
                info = ShardInfo(**{f.name: check.typed(sh[f.name], f"{at}.{f.name}", _FIELD_TYPES[f.type])
                                    for f in fields(ShardInfo)})
                if info.file != shard_name(k):
                    raise FormatError(f"{where}: {at}.file is {info.file!r}, expected {shard_name(k)!r}; re-run ingest")
                if info.first_sample != expected or info.num_samples < 1:
                    raise FormatError(f"{where}: split {name!r} shard {info.file} starts at {info.first_sample} with "
                                      f"{info.num_samples} samples, expected a start at {expected}; re-run ingest")
                expected += info.num_samples
                shards.append(info)
            num_samples = check.typed(s["num_samples"], f"{path}.num_samples", int)
            if expected != num_samples:
                raise FormatError(
                    f"{where}: split {name!r} shards hold {expected} samples, num_samples says {num_samples}; "
                    "re-run ingest")
            unlisted = check.typed(s["unlisted"], f"{path}.unlisted", str)
            if unlisted not in UNLISTED_VALUES:
                raise FormatError(f"{where}: {path}.unlisted must be {' or '.join(UNLISTED_VALUES)}, got {unlisted!r}; "
                                  "re-run ingest")
            per_class = {}
            for key in ("known_per_class", "positives_per_class"):
                values = check.typed(s.get(key, []), f"{path}.{key}", list)
                if values and (len(values) != len(classes) or not all(_is_int(v) and v >= 0 for v in values)):
                    raise FormatError(f"{where}: {path}.{key} must be {len(classes)} counts, one per class; "
                                      "re-run ingest")
                per_class[key] = list(values)
            splits[name] = SplitInfo(
                num_samples=num_samples,
                shards=shards,
                unlisted=unlisted,
                labels_size=check.typed(s["labels_size"], f"{path}.labels_size", int),
                labels_sha256=check.typed(s["labels_sha256"], f"{path}.labels_sha256", str),
                **per_class,
            )
        return Manifest(
            format_version=version,
            dataset=dataset,
            classes=classes,
            splits=splits,
            counts=check.typed(d["counts"], "counts", dict),
            source=check.typed(d["source"], "source", dict),
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: the JSON type of each ShardInfo / SplitInfo field type (annotations are strings here)
_FIELD_TYPES = {"int": int, "str": str}
_JSON_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


class _Checker:
    """The checks ``Manifest.from_dict`` makes, each failing with a ``FormatError`` naming the file and key."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.where}: {what}; re-run ingest to rewrite the manifest")

    def typed(self, value: Any, path: str, kind: type) -> Any:
        if kind is int:
            ok = _is_int(value) and value >= 0
        else:
            ok = isinstance(value, kind)
        if not ok:
            got = next((n for t, n in _JSON_NAMES.items() if isinstance(value, t) and not isinstance(value, bool)),
                       None)
            shown = f"got {got}" if kind in (list, dict) and got else f"got {value!r}"
            raise self.fail(f"{path} must be {_JSON_NAMES[kind]}{' >= 0' if kind is int else ''}, {shown}")
        return value

    def keys(self, d: Any, path: str, names: list[str], optional: tuple[str, ...] = ()) -> None:
        self.typed(d, path, dict)
        for key in names:
            if key not in d and key not in optional:
                raise self.fail(f"{path}: missing key {key!r}")
        unknown = sorted(set(d) - set(names), key=str)
        if unknown:
            raise self.fail(f"{path}: unknown key {unknown[0]!r}")


def read_manifest(root: str | os.PathLike) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{path}: not found; is {root} a dataset directory written by `ingest`?")
    raw = path.read_bytes()
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); re-run ingest "
                          "to rewrite the manifest") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); re-run ingest to rewrite the manifest") from e
    return Manifest.from_dict(d, where=str(path))


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write, fsync and rename so that readers see the old or the new file, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk (or an interrupt) must not leave the temporary file behind
        raise
    fsync_dir(path.parent)


def lock_file(path: str | os.PathLike, busy: Callable[[str], Exception]) -> IO[str]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) until the returned file is closed; this
    process's pid is written into it. When another process holds it, raise ``busy(holder)``, where holder is
    "pid N" from the file (or "another process" if the file has none yet). The lock goes with the process:
    a killed holder leaves a file that the next caller locks at once, so stale files need no cleaning."""
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise busy(f"pid {pid}" if pid.isdigit() else "another process") from e
        raise
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    # a forked child (a loader worker) shares the lock, which lasts until every copy is closed: a worker that
    # outlives a killed holder would keep the directory locked. Children close their copy (that does not
    # release the parent's lock).
    ref = weakref.ref(f)
    os.register_at_fork(after_in_child=lambda: ref() is not None and ref().close())
    return f


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


def source_path(folder: str | os.PathLike, rel: str, where: str, what: str = "image path") -> str:
    """``folder/rel`` for an image path that a source file names (``where``: that file, and its line or entry).

    Adapters call it for every path they build from source text: ``rel`` must stay inside ``folder`` (not
    absolute, no ``..`` component), since a hostile list would otherwise pull any readable file into a
    shard; symbolic links inside ``folder`` are followed as usual. A NUL byte, which no file name holds,
    is refused too. ``what`` names ``rel`` in the message ("image id" for VOC's ids).
    """
    if "\x00" in rel:
        raise IngestError(f"{where}: {what} {rel!r} is not a file name (NUL byte); fix the entry")
    parts = PurePosixPath(rel).parts
    if not rel or PurePosixPath(rel).is_absolute() or ".." in parts:
        raise IngestError(f"{where}: {what} {rel!r} leaves the image folder {folder} (absolute, empty, or a '..' "
                          "component); fix or remove the entry")
    return os.path.join(os.fspath(folder), rel)


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
