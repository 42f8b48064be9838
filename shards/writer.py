"""The one shard writer behind every ``ingest`` adapter: ``IngestPlan`` -> dataset directory.

What it writes (docs/FORMAT.md is the full description)::

    OUT/manifest.json             written last, atomically: its presence means the ingest is complete
    OUT/<split>/NNNNNN.tar        WebDataset shard (``shards.tar``: member layout, ustar bytes)
    OUT/<split>/NNNNNN.idx        DALI index of the shard (``shards.tar``)
    OUT/<split>/labels.arrow      one row per sample in sample-id order (``shards.labels``)
    OUT/.ingest/...               fingerprint, per-shard sidecars, lock (``shards.ingest_state``)

Conventions
===========

- Sample ids are dense 0..N-1 per split in record order, counting only the records whose image was
  written; a missing or corrupt image takes no id (it is counted, and named in the sidecar).
- Images are stored as the source bytes; each is validated first (``shards.jpeg.validate_jpeg``:
  ``check="fast"``, the default, checks the header, its pixel count against ``max_pixels`` and the marker
  structure; ``check="full"`` also decodes it in strict mode). Only with ``max_side`` (``ingest
  --max-side N``, off by default) is an image whose longer side exceeds N re-encoded, once, at longer side
  N (``shards.jpeg.reencode_bounded``, JPEG ``quality``); its ``<key>.json`` then gives the stored size as
  ``width``/``height``, the source's as ``source_width``/``source_height``, and ``boxes`` scaled into the
  stored image; the manifest records N, the quality and how many images of each split were re-encoded.
- The manifest lists the size and sha256 of every file it describes (shards, DALI indexes,
  ``labels.arrow``): ``ingest verify`` and the trainer check them (``shards.reader``).
- Work is spread over threads: ``workers`` loader threads read and validate images, the main thread
  orders samples and builds the tar bytes, one thread hashes them (sha256) and one writes, fsyncs and
  commits shards (see ``_ShardSink``). The output does not depend on ``workers``.
- Shards are committed one after the other and an interrupted run resumes after the last committed
  one whose source records and image files (size and mtime) are unchanged, byte-identical to an
  uninterrupted run over the current source (``shards.ingest_state`` describes how).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import queue
import statistics
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .format import (
    FORMAT_VERSION,
    KEY_DIGITS,
    LABELS_NAME,
    MANIFEST_NAME,
    MAX_CLASSES,
    SPLIT_NAME_RE,
    UNLISTED_NEGATIVE,
    WRITER_VERSION,
    IngestError,
    IngestPlan,
    Manifest,
    Record,
    ShardInfo,
    SplitInfo,
    file_sha256,
    fsync_dir,
    shard_name,
    write_json_atomic,
)
from .ingest_state import (
    STATE_DIR,
    OutputLock,
    fingerprint,
    kept_shards,
    prepare_output,
    record_digest,
    remove_shards_from,
    source_stat,
    write_sidecar,
)
from .jpeg import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_QUALITY,
    MAX_PIXELS_LIMIT,
    CorruptImage,
    DecodeError,
    reencode_bounded,
    validate_jpeg,
)
from .labels import LabelsBuilder, label_schema, write_labels
from .progress import progress_bar
from .tar import TarBytes, format_dali_index, sample_members, write_synced_text

CHECK_MODES = ("fast", "full")
#: at most this many missing/corrupt files are named per split in the manifest counts ("problems")
MAX_PROBLEMS_LISTED = 20

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the writer

@dataclass
class _Loaded:
    status: str  # "ok" | "missing" | "corrupt"
    data: bytes | None = None
    width: int = 0
    height: int = 0
    detail: str = ""
    stat: list[int] | None = None  # [size, mtime_ns] of the file read (``ingest_state.source_stat``)
    source_size: tuple[int, int] | None = None  # (width, height) of the source when it was re-encoded


@dataclass(frozen=True)
class _Bound:
    """``max_side`` re-encoding: None (off) or the longer side and the JPEG quality."""

    max_side: int
    quality: int


def _load(rec: Record, full: bool, max_pixels: int, bound: _Bound | None = None) -> _Loaded:
    stat = None
    if rec.data is not None:
        data = bytes(rec.data)
    else:
        try:
            with open(rec.path, "rb") as f:
                data = f.read()
                st = os.fstat(f.fileno())  # of the file whose bytes were read, for the resume check
                stat = [st.st_size, st.st_mtime_ns]
        except (FileNotFoundError, NotADirectoryError):
            return _Loaded("missing", detail="file not found")
        except IsADirectoryError:
            return _Loaded("corrupt", detail="is a directory, not a file")
    try:
        w, h = validate_jpeg(data, full=full, max_pixels=max_pixels)
    except CorruptImage as e:
        return _Loaded("corrupt", detail=str(e), stat=stat)
    if bound is not None:  # after validation: --max-pixels applies to the source
        try:
            reencoded = reencode_bounded(data, bound.max_side, bound.quality)
        except DecodeError as e:
            return _Loaded("corrupt", detail=str(e), stat=stat)
        if reencoded is not None:
            return _Loaded("ok", reencoded[0], reencoded[1], reencoded[2], stat=stat, source_size=(w, h))
    return _Loaded("ok", data, w, h, stat=stat)


def _load_in_order(items: Iterator[tuple[int, Record]], workers: int, full: bool,
                   max_pixels: int, bound: _Bound | None = None) -> Iterator[tuple[int, Record, _Loaded]]:
    """Read and validate images, ``workers`` at a time, yielding results in record order.

    Threads, not processes: file reads and libjpeg-turbo (simplejpeg) release the GIL (measured: 2 threads
    decode 1.8x as fast as one on 2 cores), and the bytes need not be pickled back to the writer.
    """
    if workers <= 1:
        for i, rec in items:
            yield i, rec, _load(rec, full, max_pixels, bound)
        return
    window: deque = deque()
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest-load")
    try:
        for i, rec in items:
            window.append((i, rec, ex.submit(_load, rec, full, max_pixels, bound)))
            if len(window) >= 4 * workers:  # bounded read-ahead: at most 4*workers images in memory
                j, r, fut = window.popleft()
                yield j, r, fut.result()
        while window:
            j, r, fut = window.popleft()
            yield j, r, fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _record_where(split: str, index: int, rec: Record) -> str:
    return f"split {split!r} record {index} (source_id {rec.source_id!r}, {rec.rel_path})"


def _with_image(items: Iterator[tuple[int, Record]], split: str) -> Iterator[tuple[int, Record]]:
    for i, rec in items:
        if (rec.path is None) == (rec.data is None):
            raise IngestError(f"{_record_where(split, i, rec)}: the record must have exactly one of path and data "
                              "(adapter bug)")
        yield i, rec


def _check_classes(values: Iterable[Any], k: int, what: str, where: str) -> tuple[int, ...]:
    out = set()
    for c in values:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise IngestError(f"{where}: {what} holds {c!r}; class indices must be ints (adapter bug)")
        if not 0 <= int(c) < k:
            raise IngestError(f"{where}: {what} holds class {int(c)}, outside 0..{k - 1} (adapter bug)")
        out.add(int(c))
    return tuple(sorted(out))


def _record_labels(rec: Record, k: int, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    pos = _check_classes(rec.pos, k, "pos", where)
    neg = _check_classes(rec.neg, k, "neg", where)
    both = set(pos) & set(neg)
    if both:
        raise IngestError(f"{where}: classes {sorted(both)} are both positive and negative; "
                          "the adapter must resolve them")
    return pos, neg


def _sample_json(rec: Record, width: int, height: int, where: str,
                 source_size: tuple[int, int] | None = None) -> bytes:
    d = dict(rec.meta)
    # width/height from the JPEG header override any the source states: they are what a decoder returns
    d.update(source_id=rec.source_id, rel_path=rec.rel_path, width=width, height=height)
    if source_size is not None:  # re-encoded (max_side): boxes follow the pixels into the stored image
        sx, sy = width / source_size[0], height / source_size[1]
        d.update(source_width=source_size[0], source_height=source_size[1])
        if isinstance(d.get("boxes"), list):
            try:
                d["boxes"] = [{**b, "bbox": [b["bbox"][0] * sx, b["bbox"][1] * sy, b["bbox"][2] * sx,
                                             b["bbox"][3] * sy]} for b in d["boxes"]]
            except (TypeError, KeyError, IndexError) as e:
                raise IngestError(f"{where}: meta boxes must be {{'bbox': [xmin, ymin, xmax, ymax], ...}} to be "
                                  f"scaled with the image (--max-side), got {d['boxes']!r} ({e}; adapter bug)") from e
    try:
        return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise IngestError(f"{where}: meta is not plain JSON ({e})") from e


@dataclass
class _Run:
    out: Path
    plan: IngestPlan
    num_classes: int
    shard_size: int
    workers: int
    strict: bool
    full_check: bool
    max_pixels: int
    progress: bool
    bound: _Bound | None = None


@dataclass
class _SplitResult:
    info: SplitInfo
    counts: dict[str, Any]


@dataclass
class _OpenShard:
    """Bookkeeping of the shard being filled (main thread); its bytes go through ``_ShardSink``."""

    index: int
    first_sample: int
    first_record: int
    tar: TarBytes = field(default_factory=TarBytes)
    num_samples: int = 0
    last_record: int = -1
    digest: Any = field(default_factory=hashlib.sha256)
    skipped: list = field(default_factory=list)
    reencoded: int = 0  # samples re-encoded by max_side (kept in the sidecar for a resumed run's counts)


def _tmp_tar_path(split_dir: Path, index: int) -> Path:
    return split_dir / f".{shard_name(index)}.tmp"


def _commit_shard(split_dir: Path, state_dir: Path, shard: _OpenShard) -> ShardInfo:
    """Make a shard visible whose temp tar is complete and fsynced: write the DALI index, rename both into
    place (index first), fsync the folder, then write the sidecar that marks the shard as committed."""
    name = shard_name(shard.index)
    tmp_tar = _tmp_tar_path(split_dir, shard.index)
    tmp_idx = split_dir / f".{name[:-4]}.idx.tmp"
    # the same text as write_dali_index(tar) gives, from the offsets noted while building (no re-read)
    index_text = format_dali_index(shard.tar.members, str(tmp_tar))
    write_synced_text(tmp_idx, index_text)
    os.replace(tmp_idx, split_dir / f"{name[:-4]}.idx")
    os.replace(tmp_tar, split_dir / name)
    fsync_dir(split_dir)
    index_bytes = index_text.encode("ascii")
    info = ShardInfo(file=name, num_samples=shard.num_samples, first_sample=shard.first_sample,
                     size=shard.tar.size, sha256=shard.tar.sha.hexdigest(), idx_size=len(index_bytes),
                     idx_sha256=hashlib.sha256(index_bytes).hexdigest())
    write_sidecar(state_dir, shard.index, info, shard.first_record, shard.last_record - shard.first_record + 1,
                  shard.digest.hexdigest(), shard.skipped, shard.reencoded)
    return info


class _Stage:
    """One thread of the shard pipeline: applies ``handle(op, arg)`` to queued items in order.

    The queue is bounded (back-pressure). After a failure the thread keeps draining its queue, so that
    the producer never blocks, and forwards every item downstream either way; the failure is raised in
    the main thread by the next ``put`` or by ``close``.
    """

    QUEUE_ITEMS = 64

    def __init__(self, name: str, handle, on_stop=None, downstream: "_Stage | None" = None):
        self.handle, self.on_stop, self.downstream = handle, on_stop, downstream
        self.queue: queue.Queue = queue.Queue(maxsize=self.QUEUE_ITEMS)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def first_error(self) -> BaseException | None:
        if self.error is not None:
            return self.error
        return self.downstream.first_error() if self.downstream is not None else None

    def put(self, op: str, arg: Any = None) -> None:
        error = self.first_error()
        if error is not None:
            raise error
        self.queue.put((op, arg))

    def _run(self) -> None:
        while True:
            op, arg = self.queue.get()
            if op == "stop":
                break
            if self.error is None:
                try:
                    self.handle(op, arg)
                except BaseException as e:  # handed to the main thread, which raises it
                    self.error = e
            if self.downstream is not None:
                self.downstream.queue.put((op, arg))
        if self.on_stop is not None:
            self.on_stop()
        if self.downstream is not None:
            self.downstream.close(raise_error=False)

    def close(self, *, raise_error: bool = True) -> None:
        """Finish the queued work and stop this thread and those downstream."""
        self.queue.put(("stop", None))
        self.thread.join()
        error = self.first_error()
        if raise_error and error is not None:
            raise error


class _ShardSink:
    """Hashes, writes and commits the shards of one split, in order: main thread -> hash thread -> write thread.

    The main thread orders samples, assigns ids and builds the tar bytes; sha256, writes and fsync release
    the GIL, so they run beside it and beside the loader threads (reading, validation). Items are
    ``("open", _OpenShard)``, ``("add", bytes)`` (appended to the open shard) and ``("commit", _OpenShard)``.
    """

    def __init__(self, split_dir: Path, state_dir: Path):
        self.split_dir, self.state_dir = split_dir, state_dir
        self.committed: list[ShardInfo] = []
        self.f = None
        self.hash_shard: _OpenShard | None = None
        writer = _Stage("ingest-write", self._write, self._discard_open)
        self.head = _Stage("ingest-hash", self._hash, downstream=writer)

    def put(self, op: str, arg: Any = None) -> None:
        self.head.put(op, arg)

    def close(self, *, raise_error: bool = True) -> list[ShardInfo]:
        self.head.close(raise_error=raise_error)
        return self.committed

    def _hash(self, op: str, arg: Any) -> None:
        if op == "open":
            self.hash_shard = arg
        elif op == "add":
            self.hash_shard.tar.sha.update(arg)

    def _write(self, op: str, arg: Any) -> None:
        if op == "open":
            self.f = open(_tmp_tar_path(self.split_dir, arg.index), "wb")
        elif op == "add":
            self.f.write(arg)
        else:
            assert op == "commit" and self.f.tell() == arg.tar.size, op
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None
            self.committed.append(_commit_shard(self.split_dir, self.state_dir, arg))

    def _discard_open(self) -> None:
        """A shard still open when the pipeline stops was not committed (the run failed): delete its temp file."""
        if self.f is not None:
            self.f.close()
            Path(self.f.name).unlink(missing_ok=True)
            self.f = None


def _write_split(run: _Run, split: str, records: Iterable[Record]) -> _SplitResult:
    split_dir = run.out / split
    state_dir = run.out / STATE_DIR / split
    split_dir.mkdir(exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)

    # the longest intact prefix of committed shards survives; everything after it is rewritten
    kept = kept_shards(split_dir, state_dir)

    k = run.num_classes
    labels = LabelsBuilder()
    shards: list[ShardInfo] = []
    counts = {"missing": 0, "corrupt": 0, "reencoded": 0}
    problems: list[list] = []
    total = len(records) if hasattr(records, "__len__") else None
    bar = progress_bar(total, f"ingest {split}", "img", enabled=run.progress)
    items: Iterator[tuple[int, Record]] = enumerate(records)
    first_record = 0

    shard: _OpenShard | None = None
    sink: _ShardSink | None = None
    loaded: Iterator | None = None
    num_new = 0  # shards handed to the sink for commit

    def note_skip(entry: list) -> None:
        counts[entry[1]] += 1
        if len(problems) < MAX_PROBLEMS_LISTED:
            problems.append(entry)

    try:
        # replay the kept shards: labels and counts from the records, no image is read; the first shard whose
        # records or image files (size, mtime) changed since the interrupted run is rewritten, and all after it
        for sc in kept:
            skipped = {e[0]: e for e in sc["skipped"]}
            digest = hashlib.sha256()
            consumed: list[tuple[int, Record]] = []
            rows: list[tuple[tuple[int, ...], tuple[int, ...]] | list] = []
            for _ in range(sc["num_records"]):
                item = next(items, None)
                if item is None:
                    break  # the source now ends inside this shard
                consumed.append(item)
                i, rec = item
                where = _record_where(split, i, rec)
                pos, neg = _record_labels(rec, k, where)
                digest.update(record_digest(rec, pos, neg, where, source_stat(rec.path)))
                rows.append(skipped[i] if i in skipped else (pos, neg))
            if len(consumed) < sc["num_records"] or digest.hexdigest() != sc["records_sha256"]:
                log.warning("%s: shard %s of split %r: its source records or image files changed since the "
                            "interrupted run; rewriting from it", run.out, sc["shard"]["file"][:-4], split)
                remove_shards_from(split_dir, state_dir, len(shards))
                items = itertools.chain(consumed, items)
                break
            for row in rows:
                if isinstance(row, list):
                    note_skip(row)
                else:
                    labels.add(*row)
            assert len(labels) == sc["shard"]["first_sample"] + sc["shard"]["num_samples"]
            shards.append(ShardInfo(**sc["shard"]))
            counts["reencoded"] += sc.get("reencoded", 0)
            first_record += sc["num_records"]
            bar.update(sc["num_records"])

        # write the rest
        sink = _ShardSink(split_dir, state_dir)
        pending_digests: list[bytes] = []
        pending_skips: list[list] = []
        loaded = _load_in_order(_with_image(items, split), run.workers, run.full_check, run.max_pixels, run.bound)
        for i, rec, res in loaded:
            where = _record_where(split, i, rec)
            pos, neg = _record_labels(rec, k, where)
            pending_digests.append(record_digest(rec, pos, neg, where, res.stat))
            bar.update(1)
            if res.status != "ok":
                src = rec.path if rec.path is not None else f"<bytes of {rec.rel_path}>"
                if run.strict:
                    raise IngestError(
                        f"{src}: {res.status} image ({res.detail}; {where}). Fix or remove the file, "
                        "or run without --strict to skip and count it")
                entry = [i, res.status, rec.rel_path, res.detail]
                pending_skips.append(entry)
                note_skip(entry)
                bar.set_postfix(missing=counts["missing"], corrupt=counts["corrupt"], refresh=False)
                continue
            if shard is None:
                shard = _OpenShard(len(shards) + num_new, len(labels), first_record)
                sink.put("open", shard)
            for d in pending_digests:
                shard.digest.update(d)
            pending_digests.clear()
            shard.skipped.extend(pending_skips)
            pending_skips.clear()
            sid = len(labels)
            if sid >= 10**KEY_DIGITS:
                raise IngestError(f"split {split!r} has more than 10^{KEY_DIGITS} samples, the most a key can number")
            meta_json = _sample_json(rec, res.width, res.height, where, res.source_size)
            if res.source_size is not None:
                counts["reencoded"] += 1
                shard.reencoded += 1
            sink.put("add", shard.tar.sample(sample_members(sid, res.data, meta_json)))
            labels.add(pos, neg)
            shard.num_samples += 1
            shard.last_record = i
            if shard.num_samples == run.shard_size:
                sink.put("add", shard.tar.end())
                sink.put("commit", shard)
                num_new += 1
                first_record = i + 1
                shard = None
        if shard is not None:
            sink.put("add", shard.tar.end())
            sink.put("commit", shard)
        shards += sink.close()
        sink = None
    finally:
        if loaded is not None:
            loaded.close()  # stops the loader threads now, not when the generator is garbage-collected
        if sink is not None:  # failed: stop the writer threads; a shard they had open is not committed
            sink.close(raise_error=False)
        bar.close()
    labels_path = split_dir / LABELS_NAME
    write_labels(labels_path, labels, run.plan.unlisted)
    fsync_dir(split_dir)

    n = len(labels)
    positives, known = labels.class_counts(k, run.plan.unlisted)
    info = SplitInfo(num_samples=n, shards=shards, unlisted=run.plan.unlisted,
                     labels_size=labels_path.stat().st_size, labels_sha256=file_sha256(labels_path),
                     known_per_class=[int(x) for x in known], positives_per_class=[int(x) for x in positives])
    return _SplitResult(info, {"written": n, **counts, "problems": problems})


def _merge_counts(split: str, plan_counts: dict[str, Any], mine: dict[str, Any], bounded: bool) -> dict[str, Any]:
    theirs = json.loads(json.dumps(plan_counts))  # a deep copy that also proves it is plain JSON
    for key in ("written", "missing", "corrupt", "reencoded", "problems"):
        if key in theirs:
            raise ValueError(f"plan.counts[{split!r}] sets {key!r}, which the writer computes (adapter bug)")
    written, missing, corrupt = mine["written"], mine["missing"], mine["corrupt"]
    out = {
        # "listed": what the source lists (adapter-provided); default: the records handed to the writer
        "listed": theirs.pop("listed", written + missing + corrupt),
        "written": written,
        "missing": missing,
        "corrupt": corrupt,
        "skipped": dict(sorted(theirs.pop("skipped", {}).items())),
    }
    if bounded:  # only with max_side, so that a manifest without it keeps the bytes of earlier versions
        out["reencoded"] = mine["reencoded"]
    out.update(sorted(theirs.items()))
    # the first MAX_PROBLEMS_LISTED skipped images: [record index, reason, rel_path, detail]
    out["problems"] = mine["problems"]
    return out


# ------------------------------------------------------------------------------------------ public API

def _check_plan(plan: IngestPlan) -> None:
    label_schema(plan.unlisted)  # raises for a bad value
    if not plan.classes:
        raise ValueError("plan.classes is empty")
    if len(plan.classes) > MAX_CLASSES:
        raise ValueError(f"plan has {len(plan.classes)} classes; class indices are uint16, at most {MAX_CLASSES}")
    for i, c in enumerate(plan.classes):
        if not isinstance(c, dict) or c.get("index") != i or "id" not in c or "name" not in c:
            raise ValueError(f"plan.classes[{i}] must be {{'index': {i}, 'id': ..., 'name': ...}}, got {c!r}")
    if not plan.splits:
        raise ValueError("plan has no splits")
    for split in plan.splits:
        if not isinstance(split, str) or not SPLIT_NAME_RE.match(split):
            raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-' (it names a folder)")
    for split in plan.counts:
        if split not in plan.splits:
            raise ValueError(f"plan.counts names split {split!r}, which is not in plan.splits {list(plan.splits)}")


def write_dataset(
    out_dir: str | os.PathLike,
    plan: IngestPlan,
    *,
    shard_size: int = 1000,
    workers: int = 1,
    strict: bool = False,
    check: str = "fast",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write ``plan`` as a dataset directory (shards, DALI indexes, labels.arrow, manifest.json); return the manifest.

    Resumes an interrupted run with the same plan and arguments (see ``shards.ingest_state``); a folder
    holding another ingest is an ``IngestError`` unless ``overwrite``. ``workers`` threads read and
    validate images; the output does not depend on it. ``strict`` makes a missing or corrupt image an
    error instead of a counted skip. ``check`` is "fast" (header + structure) or "full" (strict decode);
    an image whose header declares more than ``max_pixels`` pixels (1 .. ``jpeg.MAX_PIXELS_LIMIT``) is corrupt.
    ``max_side``: None (default) stores every image's source bytes; N re-encodes an image whose longer side
    exceeds N at longer side N and JPEG ``quality`` (1..100; ``shards.jpeg.reencode_bounded``).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or not 1 <= max_pixels <= MAX_PIXELS_LIMIT:
        raise ValueError(f"max_pixels must be an int in 1..{MAX_PIXELS_LIMIT}, got {max_pixels!r}")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be None or a positive int, got {max_side!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an int in 1..100, got {quality!r}")
    bound = None if max_side is None else _Bound(max_side, quality)
    _check_plan(plan)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IngestError(f"{out}: exists and is not a folder; --out must name a folder")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out)
    try:
        fp = fingerprint(plan, shard_size, strict, check, max_pixels, *((max_side, quality) if bound else ()))
        prepare_output(out, fp, overwrite)
        run = _Run(out, plan, len(plan.classes), shard_size, workers, strict, check == "full", max_pixels, progress,
                   bound)
        results = {split: _write_split(run, split, records) for split, records in plan.splits.items()}
        # adapters may fill plan.counts while their records are iterated, so merge only now
        counts = {split: _merge_counts(split, plan.counts.get(split, {}), r.counts, bound is not None)
                  for split, r in results.items()}
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            dataset=plan.dataset,
            classes=fp["classes"],
            splits={split: r.info for split, r in results.items()},
            counts=counts,
            source={**fp["source"], "ingest": {
                "writer_version": WRITER_VERSION, "shard_size": shard_size, "strict": strict, "check": check,
                "max_pixels": max_pixels, **({"max_side": max_side, "quality": quality} if bound else {})}},
        )
        write_json_atomic(out / MANIFEST_NAME, manifest.to_json() + "\n")
    finally:
        lock.release()
    return manifest


def summary_table(manifest: Manifest) -> str:
    """The end-of-run table: images per outcome, labels per image and positives per class, one row per split."""
    header = ["split", "listed", "written", "missing", "corrupt", "skipped", "pos/img", "neg/img",
              "pos/class min", "median", "max"]
    rows = [header]
    for split, info in manifest.splits.items():
        c = manifest.counts.get(split, {})
        n = info.num_samples
        pos = info.positives_per_class
        n_pos = sum(pos)
        if info.unlisted == UNLISTED_NEGATIVE:
            n_neg = n * manifest.num_classes - n_pos  # unlisted classes are negatives
        else:
            n_neg = sum(info.known_per_class) - n_pos
        skipped = ", ".join(f"{r}={v}" for r, v in c.get("skipped", {}).items()) or "-"
        rows.append([
            split, str(c.get("listed", "-")), str(n), str(c.get("missing", 0)), str(c.get("corrupt", 0)), skipped,
            f"{n_pos / n:.2f}" if n else "-", f"{n_neg / n:.2f}" if n else "-",
            str(min(pos)) if pos else "-", f"{statistics.median(pos):g}" if pos else "-", str(max(pos)) if pos else "-",
        ])
    widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
    lines = ["  ".join(v.ljust(w) if j in (0, 5) else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    bound = manifest.source.get("ingest", {})
    if "max_side" in bound:
        parts = ", ".join(f"{split} {manifest.counts.get(split, {}).get('reencoded', 0)}" for split in manifest.splits)
        lines.append(f"re-encoded at longer side {bound['max_side']} (--max-side; JPEG quality {bound['quality']}): "
                     f"{parts}")
    problems = [(split, p) for split in manifest.splits for p in manifest.counts.get(split, {}).get("problems", [])]
    if problems:
        lines.append(f"skipped images (at most {MAX_PROBLEMS_LISTED} per split are named in manifest.json):")
        lines += [f"  {split}: {p[2]}: {p[1]} ({p[3]})" for split, p in problems]
    return "\n".join(lines)
