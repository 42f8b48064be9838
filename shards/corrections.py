"""The persistent LL-Cp corrections of one label file: each rank's log and the merged CSR generations.

LL-Cp corrections (unknown -> positive, permanent) live on disk in ``corrections_dir``::

    log-e{epoch:04d}-r{rank}.bin   one per rank and epoch: 16-byte header (b"LLCPLOG1", uint32 epoch,
                                   uint32 rank, little-endian) + records (uint32 sample, uint16 class),
                                   6 bytes each, packed, in append order, duplicates allowed
    gen-{epoch:04d}/               generation = every correction merged up to and including that epoch:
        offsets.bin                int64 [N + 1], CSR offsets (little-endian, raw)
        values.bin                 uint16 [count], class ids, sorted and unique within each row
        meta.json                  counts, base generation, protocol, seed, the logs merged, and the
                                   sha256 of offsets.bin and values.bin (version 2)
    CURRENT                        JSON integer: the newest committed generation (for tools; training
                                   restores the generation recorded in its checkpoint)

Epoch protocol (all ranks): during epoch t, ``append(t, ...)``; at its end every rank calls ``flush(t)``
(creates an empty log if it made none), barrier, ONE process calls ``g = merge(t, world_size)``,
barrier, every rank calls ``use(g)``. So corrections made in epoch t take effect from epoch t+1.
``generation`` (-1 = none) goes into the checkpoint; on resume after epoch e, ``use(checkpoint's
generation)`` and ``discard_logs_after(e)``. (``shards.labelstore.LabelStore`` exposes these as
``append_corrections``, ``flush_corrections``, ``merge_corrections``, ``use_generation`` ...)

Opening the log of epoch t truncates any older log of the same rank and epoch: one left by an
interrupted attempt is stale, because a resumed run repeats epoch t from the checkpoint's generation.

``use(g)`` trusts nothing on disk: meta.json must describe this label file, both files must have the
size and sha256 meta.json records, offsets must be monotone from 0 to the number of values, and every
row's classes must be sorted, unique and < K. A damaged generation is a ValueError naming the file (a
class id >= K would otherwise land on the next sample, and a monotone edit of the offsets would move a
correction to another sample). A generation written before the checksums (meta version 1) is used with
a warning, so that a run started before them can still resume; the other checks apply to it.
A ``Corrections`` is not thread-safe and holds open files: make one per process.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .format import UNLISTED_NEGATIVE, file_sha256, fsync_dir, write_json_atomic
from .labels import SparseLabels, as_sample_ids, gather_rows, row_ids, rows_sorted_unique

logger = logging.getLogger(__name__)

LOG_MAGIC = b"LLCPLOG1"
_LOG_HEADER = struct.Struct("<8sII")  # magic, epoch, rank
LOG_RECORD = np.dtype([("sample", "<u4"), ("cls", "<u2")])  # packed: 6 bytes
CURRENT_NAME = "CURRENT"
#: meta.json "version": 2 records the sha256 of offsets.bin and values.bin; 1 did not
META_VERSION = 2
_FIX = "remove the generation and redo the merge from the logs"
_GEN_RE = re.compile(r"^gen-(\d{4,})$")
_LOG_RE = re.compile(r"^log-e(\d{4,})-r(\d+)\.bin$")
_FLUSH_RECORDS = 1 << 18  # buffered records per rank before a write (1.5 MB)
_MERGE_ROWS = 1 << 18  # samples per chunk of the merge: bounds its temporaries
_READ_RECORDS = 1 << 22  # log records read at a time by the merge


def log_path(corrections_dir: str | os.PathLike, epoch: int, rank: int) -> Path:
    return Path(corrections_dir) / f"log-e{int(epoch):04d}-r{int(rank)}.bin"


def generation_dir(corrections_dir: str | os.PathLike, generation: int) -> Path:
    return Path(corrections_dir) / f"gen-{int(generation):04d}"


def current_generation(corrections_dir: str | os.PathLike) -> int:
    """The generation named by ``CURRENT`` (-1 when there is none yet)."""
    path = Path(corrections_dir) / CURRENT_NAME
    if not path.is_file():
        return -1
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON integer ({e.msg}); delete it and re-run the merge") from e
    if not isinstance(g, int):
        raise ValueError(f"{path}: expected a JSON integer generation, got {g!r}")
    return g


def list_generations(corrections_dir: str | os.PathLike) -> list[int]:
    d = Path(corrections_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _GEN_RE.match(p.name)) and p.is_dir())


def _publish(tmp: Path, final: Path) -> None:
    """Make a finished generation directory visible under its final name (atomic rename).

    A redone merge replaces an existing directory of that name (one from an abandoned run, or the
    same content): moved aside first, because a rename cannot replace a non-empty directory.
    """
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _map_array(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """Read-only ndarray over a raw little-endian file of exactly ``count`` items (memory-mapped)."""
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise ValueError(
            f"{path}: {size} bytes, expected {count * dtype.itemsize} ({count} x {dtype}); the generation is "
            "damaged: remove it and redo the merge from the logs"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=count)  # the array keeps the mapping alive


def _row_keys(offsets: np.ndarray, values: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    """Entries of rows start..stop-1 as int64 keys ``sample * K + class`` (sorted if rows are)."""
    a, b = int(offsets[start]), int(offsets[stop])
    return row_ids(offsets, start, stop) * k + values[a:b].astype(np.int64)


def _in_sorted(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """bool mask: which ``values`` occur in the sorted array ``reference`` (binary search).

    Used instead of ``np.isin``, whose hash-based ``unique`` costs ~10x more on merge-sized arrays.
    """
    if not len(reference):
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(reference, values)
    np.minimum(at, len(reference) - 1, out=at)
    return reference[at] == values


@dataclass
class _OpenLog:
    epoch: int
    path: Path
    file: object
    pending: list = field(default_factory=list)
    pending_records: int = 0
    records: int = 0


class Corrections:
    """LL-Cp corrections of the observed labels ``observed`` of one label file (``where`` names it).

    Only entries unknown in ``observed`` (and not corrected before) may be corrected, and only samples
    in ``in_subset`` (a bool mask [N]; None = every sample). ``protocol`` and ``seed`` made ``observed``
    from the truth: a generation records them, and ``use`` refuses one made for other labels.
    ``directory`` None: no corrections can be logged or merged (``use(-1)`` still works).
    """

    def __init__(
        self,
        directory: Path | None,
        observed: SparseLabels,
        *,
        where: str,
        protocol: str,
        seed: int,
        in_subset: np.ndarray | None = None,
        rank: int = 0,
    ) -> None:
        self.dir = directory
        self.observed = observed
        self.where = where
        self.protocol = protocol
        self.seed = seed
        self.in_subset = in_subset
        self.rank = rank
        self.num_samples = observed.num_samples
        self.num_classes = observed.num_classes
        self._gen = -1
        self._offsets: np.ndarray | None = None
        self._values: np.ndarray | None = None
        self._log: _OpenLog | None = None

    @property
    def generation(self) -> int:
        """The generation in use (-1: none)."""
        return self._gen

    @property
    def count(self) -> int:
        """Corrections in the generation in use."""
        return 0 if self._values is None else len(self._values)

    def csr(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(offsets int64 [N + 1], class ids uint16) of the generation in use, None when there is none."""
        return None if self._values is None else (self._offsets, self._values)

    def append(self, epoch: int, sample_ids, class_ids) -> None:
        """Record LL-Cp corrections (pairs sample_ids[i], class_ids[i]) made in ``epoch`` by this rank.

        Buffered; durable after ``flush``. Every pair must be unknown in the state in use
        (not observed, not corrected before) and its sample in ``in_subset``: anything else is an error,
        since the loss only ever proposes unknown entries. Duplicates within the epoch are fine.
        """
        epoch = self._check_epoch(epoch, "append_corrections")
        s = as_sample_ids(sample_ids, self.num_samples, f"{self.where} corrections")
        c = self._class_ids(class_ids, len(s))
        if self.in_subset is not None and len(s) and not self.in_subset[s].all():
            bad = s[~self.in_subset[s]][0]
            raise ValueError(f"{self.where}: correction of sample {bad}, which is not in this store's subset_ids")
        self._check_unknown(s, c)
        log = self._open_log(epoch)
        if len(s):
            rec = np.empty(len(s), dtype=LOG_RECORD)
            rec["sample"] = s
            rec["cls"] = c
            log.pending.append(rec)
            log.pending_records += len(rec)
            log.records += len(rec)
            if log.pending_records >= _FLUSH_RECORDS:
                self._write_pending(log)

    def append_mask(self, epoch: int, sample_ids, mask) -> None:
        """``append`` from a bool [B, K] mask of modified entries of the batch ``sample_ids``."""
        if hasattr(mask, "detach"):
            mask = mask.detach().cpu().numpy()
        mask = np.asarray(mask, dtype=bool)
        ids = as_sample_ids(sample_ids, self.num_samples, self.where)
        if mask.shape != (len(ids), self.num_classes):
            raise ValueError(f"{self.where}: mask shape {mask.shape} != (batch {len(ids)}, classes {self.num_classes})")
        rows, cols = np.nonzero(mask)
        self.append(epoch, ids[rows], cols)

    def flush(self, epoch: int | None = None) -> None:
        """Write and fsync this rank's buffered corrections.

        With ``epoch``, also creates the (empty) log of that epoch if this rank made no correction, so
        that the merge can tell "none" from "lost": every rank calls it at the end of the epoch.
        """
        if epoch is not None:
            self._open_log(self._check_epoch(epoch, "flush_corrections"))
        log = self._log
        if log is None:
            return
        self._write_pending(log)
        log.file.flush()
        os.fsync(log.file.fileno())

    def merge(self, epoch: int, world_size: int) -> int:
        """Merge every rank's log of ``epoch`` into the generation in use; returns the new generation.

        Called by ONE process after all ranks' ``flush(epoch)``. Writes
        ``gen-{epoch:04d}/`` into a temporary directory, fsyncs it, renames it into place, then points
        ``CURRENT`` at it. The generation in use stays until ``use``. A crash at any
        point leaves the previous generations valid, and the merge can be redone (the logs stay until
        ``remove_generations``). Memory: 8 bytes per logged correction plus per-chunk temporaries;
        the previous generation and the labels stay memory-mapped.
        """
        d = self._need_dir()
        epoch = self._check_epoch(epoch, "merge_corrections")
        if int(world_size) < 1:
            raise ValueError(f"merge_corrections: world_size must be >= 1, got {world_size}")
        if self._log is not None and self._log.epoch == epoch:
            self.flush()
        for p in d.iterdir():  # leftovers of an interrupted merge
            if p.name.startswith((".tmp-gen-", ".old-gen-")) and p.is_dir():
                shutil.rmtree(p)
        logs = [log_path(d, epoch, r) for r in range(int(world_size))]
        keys, log_counts = self._read_logs(logs, epoch)
        keys.sort()
        tmp = d / f".tmp-gen-{epoch:04d}-{os.getpid()}"
        tmp.mkdir()
        total, added, sha256 = self._write_generation(tmp, keys, epoch)
        del keys
        meta = {
            "format": "largeloss-corrections",
            "version": META_VERSION,
            "generation": epoch,
            "base_generation": self._gen,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "num_corrections": total,
            "added": added,
            "protocol": str(self.protocol),
            "seed": self.seed,
            "labels": self.where,
            "logs": {p.name: n for p, n in zip(logs, log_counts)},
            "sha256": sha256,
        }
        write_json_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
        fsync_dir(tmp)
        _publish(tmp, generation_dir(d, epoch))
        write_json_atomic(d / CURRENT_NAME, f"{epoch}\n")
        return epoch

    def use(self, generation: int) -> None:
        """Map corrections generation ``generation`` (-1: none); on resume, the checkpoint's value."""
        g = int(generation)
        if g == -1:
            self._gen, self._offsets, self._values = -1, None, None
            return
        d = self._need_dir()
        gdir = generation_dir(d, g)
        meta_path = gdir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{gdir}: no such corrections generation (have {list_generations(d)}); the checkpoint and "
                "corrections_dir do not match, or the generation was removed"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: not JSON ({e}); {_FIX}") from None
        if not isinstance(meta, dict) or meta.get("version") not in (1, META_VERSION):
            raise ValueError(f"{meta_path}: not a corrections generation of version 1 or {META_VERSION}; {_FIX}")
        expected = {
            "generation": g,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "protocol": str(self.protocol),
            "seed": self.seed,
        }
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(
                    f"{meta_path}: {key} is {meta.get(key)!r} but this store has {value!r}; these corrections "
                    "belong to another run or label file"
                )
        count = meta.get("num_corrections")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{meta_path}: num_corrections is {count!r}, not a count; {_FIX}")
        offsets = _map_array(gdir / "offsets.bin", np.dtype("<i8"), self.num_samples + 1)
        values = _map_array(gdir / "values.bin", np.dtype("<u2"), count)
        sums = meta.get("sha256")
        if meta["version"] == 1:
            logger.warning("%s: version 1 generation has no checksums; only its structure is checked", meta_path)
        elif not isinstance(sums, dict):
            raise ValueError(f"{meta_path}: no sha256 of offsets.bin and values.bin; {_FIX}")
        else:
            for name in ("offsets.bin", "values.bin"):
                digest = file_sha256(gdir / name)
                if digest != sums.get(name):
                    raise ValueError(
                        f"{gdir / name}: sha256 {digest} differs from meta.json ({sums.get(name)}); {_FIX}")
        if offsets[0] != 0 or offsets[-1] != count or (np.diff(offsets) < 0).any():
            raise ValueError(f"{gdir / 'offsets.bin'}: not valid CSR offsets; {_FIX}")
        if count and int(values.max()) >= self.num_classes:
            raise ValueError(f"{gdir / 'values.bin'}: holds class {int(values.max())}, but the labels have "
                             f"{self.num_classes} classes; {_FIX}")
        if not rows_sorted_unique(offsets, values):
            keys = row_ids(offsets) * self.num_classes + values.astype(np.int64)
            row = int(keys[np.flatnonzero(np.diff(keys) <= 0)[0]] // self.num_classes)
            raise ValueError(f"{gdir / 'values.bin'}: the classes of sample {row} are not sorted and unique; {_FIX}")
        self._gen, self._offsets, self._values = g, offsets, values

    def remove_generations(self, keep) -> list[str]:
        """Delete every generation not in ``keep`` and the logs already merged into a kept one.

        ``keep`` must hold the generation in use and the one ``CURRENT`` names. Logs of epochs up to
        the newest kept generation are deleted (that generation contains them); later logs are kept.
        Returns the names removed.
        """
        d = self._need_dir()
        keep = {int(g) for g in keep}
        cur = current_generation(d)
        for g, what in ((self._gen, "in use"), (cur, "named by CURRENT")):
            if g != -1 and g not in keep:
                raise ValueError(f"{d}: remove_generations would remove generation {g}, {what}; add it to keep")
        newest = max(keep | {-1})
        removed = []
        for p in sorted(d.iterdir()):
            m_gen, m_log = _GEN_RE.match(p.name), _LOG_RE.match(p.name)
            if m_gen and p.is_dir() and int(m_gen.group(1)) not in keep:
                shutil.rmtree(p)
            elif m_log and int(m_log.group(1)) <= newest and not (self._log is not None and self._log.path == p):
                p.unlink()
            elif p.name.startswith((".tmp-gen-", ".old-gen-")) and p.is_dir():
                shutil.rmtree(p)
            else:
                continue
            removed.append(p.name)
        fsync_dir(d)
        return removed

    def discard_logs_after(self, epoch: int) -> list[str]:
        """On resume after ``epoch``: delete every rank's logs of later epochs (never merged into the
        checkpoint's state). Safe to call on every rank at once. Returns the names removed.

        Not required for correctness (opening a log truncates a stale one of the same rank and epoch),
        but it keeps a rank that makes no correction from leaving an old log for the merge to read.
        """
        d = self._need_dir()
        e = int(epoch)
        if self._log is not None and self._log.epoch > e:
            self._log.file.close()
            self._log = None
        removed = []
        for p in sorted(d.iterdir()):
            m = _LOG_RE.match(p.name)
            if m and int(m.group(1)) > e:
                p.unlink(missing_ok=True)  # another rank may have removed it first
                removed.append(p.name)
        fsync_dir(d)
        return removed

    def for_analysis(self, sample_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Corrections of the generation in use as (sample int64, class int64), sorted by (sample, class)."""
        if self._values is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if sample_ids is None:
            return row_ids(self._offsets), self._values.astype(np.int64)
        ids = np.sort(as_sample_ids(sample_ids, self.num_samples, self.where))
        rows, cols = gather_rows(self._offsets, self._values, ids)
        return ids[rows], cols.astype(np.int64)

    def close(self) -> None:
        """Flush and close this rank's log."""
        if self._log is not None:
            self.flush()
            self._log.file.close()
            self._log = None

    def _need_dir(self) -> Path:
        if self.dir is None:
            raise ValueError(f"{self.where}: this LabelStore has no corrections_dir; pass one to use LL-Cp corrections")
        return self.dir

    def _check_epoch(self, epoch: int, what: str) -> int:
        e = int(epoch)
        if e < 0:
            raise ValueError(f"{what}: epoch must be >= 0, got {epoch}")
        if e <= self._gen:
            raise ValueError(
                f"{what}: epoch {e} but generation {self._gen} (corrections up to epoch {self._gen}) is in use; "
                "corrections of an epoch are merged on top of an earlier generation"
            )
        return e

    def _class_ids(self, class_ids, n: int) -> np.ndarray:
        if hasattr(class_ids, "detach"):
            class_ids = class_ids.detach().cpu().numpy()
        c = np.asarray(class_ids)
        if c.shape != (n,):
            raise ValueError(f"{self.where}: class_ids shape {c.shape} does not match {n} sample ids")
        if n and not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"{self.where}: class ids must be integers, got dtype {c.dtype}")
        c = c.astype(np.int64, copy=False)
        if n and (int(c.min()) < 0 or int(c.max()) >= self.num_classes):
            raise IndexError(f"{self.where}: class id out of range 0..{self.num_classes - 1}")
        return c

    def _check_unknown(self, s: np.ndarray, c: np.ndarray) -> None:
        if not len(s):
            return
        k, obs = self.num_classes, self.observed
        if obs.unlisted == UNLISTED_NEGATIVE:
            raise ValueError(
                f"{self.where}: protocol {self.protocol} leaves no entry unknown, so there is nothing to correct "
                f"(first: sample {s[0]}, class {c[0]})"
            )
        uniq = np.unique(s)
        pair = s * k + c
        sources = [
            ("an observed positive", obs.pos_offsets, obs.pos_values),
            ("an observed negative", obs.neg_offsets, obs.neg_values),
        ]
        if self._values is not None:
            sources.append((f"already corrected in generation {self._gen}", self._offsets, self._values))
        for what, offsets, values in sources:
            rows, cols = gather_rows(offsets, values, uniq)
            hit = _in_sorted(pair, np.sort(uniq[rows] * k + cols))
            if hit.any():
                i = int(np.flatnonzero(hit)[0])
                raise ValueError(
                    f"{self.where}: correction (sample {s[i]}, class {c[i]}) is {what}; "
                    "LL-Cp corrects unknown entries only"
                )

    def _open_log(self, epoch: int) -> _OpenLog:
        if self._log is not None and self._log.epoch == epoch:
            return self._log
        self.close()
        d = self._need_dir()
        path = log_path(d, epoch, self.rank)
        f = open(path, "wb")  # truncates a stale log of an interrupted attempt at this epoch
        f.write(_LOG_HEADER.pack(LOG_MAGIC, epoch, self.rank))
        fsync_dir(d)
        self._log = _OpenLog(epoch, path, f)
        return self._log

    @staticmethod
    def _write_pending(log: _OpenLog) -> None:
        for rec in log.pending:
            log.file.write(rec.tobytes())
        log.pending.clear()
        log.pending_records = 0

    def _read_logs(self, logs: list[Path], epoch: int) -> tuple[np.ndarray, list[int]]:
        """All records of the logs as int64 keys sample * K + class (unsorted), and the count per log."""
        counts = []
        for r, p in enumerate(logs):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: missing; every rank must call flush_corrections({epoch}) before the merge "
                    f"(world_size {len(logs)})"
                )
            body = p.stat().st_size - _LOG_HEADER.size
            if body < 0 or body % LOG_RECORD.itemsize:
                raise ValueError(
                    f"{p}: {p.stat().st_size} bytes is not a header plus whole {LOG_RECORD.itemsize}-byte records; "
                    f"rank {r} did not finish flush_corrections({epoch})"
                )
            counts.append(body // LOG_RECORD.itemsize)
        k = self.num_classes
        keys = np.empty(sum(counts), dtype=np.int64)
        at = 0
        for r, (p, n) in enumerate(zip(logs, counts)):
            with open(p, "rb") as f:
                magic, e, rank = _LOG_HEADER.unpack(f.read(_LOG_HEADER.size))
                if magic != LOG_MAGIC or e != epoch or rank != r:
                    raise ValueError(
                        f"{p}: header says {magic!r} epoch {e} rank {rank}, expected epoch {epoch} rank {r}"
                    )
                left = n
                while left:
                    rec = np.fromfile(f, dtype=LOG_RECORD, count=min(left, _READ_RECORDS))
                    s, c = rec["sample"].astype(np.int64), rec["cls"].astype(np.int64)
                    if len(rec) and (int(s.max()) >= self.num_samples or int(c.max()) >= k):
                        raise ValueError(
                            f"{p}: a record is outside {self.num_samples} samples x {k} classes; wrong labels file?"
                        )
                    if self.in_subset is not None and not self.in_subset[s].all():
                        raise ValueError(
                            f"{p}: corrects sample {s[~self.in_subset[s]][0]}, not in this store's subset_ids"
                        )
                    keys[at : at + len(rec)] = s * k + c
                    at += len(rec)
                    left -= len(rec)
        assert at == len(keys)
        return keys, counts

    def _write_generation(self, tmp: Path, keys: np.ndarray, epoch: int) -> tuple[int, int, dict[str, str]]:
        """Union of the generation in use and the sorted new ``keys`` as CSR files in ``tmp``.

        Row chunks bound the temporaries. New keys that are observed or already corrected are an error.
        Returns (total corrections, newly added, the sha256 of each file written).
        """
        n, k, obs = self.num_samples, self.num_classes, self.observed
        offsets = np.zeros(n + 1, dtype=np.int64)
        added = 0
        lo = 0
        values_sha = hashlib.sha256()
        with open(tmp / "values.bin", "wb") as vf:
            for s0 in range(0, n, _MERGE_ROWS):
                s1 = min(n, s0 + _MERGE_ROWS)
                hi = int(np.searchsorted(keys, s1 * k, side="left"))
                new = keys[lo:hi]
                lo = hi
                if len(new):
                    new = new[np.concatenate(([True], new[1:] != new[:-1]))]
                old = (
                    _row_keys(self._offsets, self._values, s0, s1, k)
                    if self._values is not None
                    else np.zeros(0, dtype=np.int64)
                )
                if len(new):
                    if obs.unlisted == UNLISTED_NEGATIVE:
                        raise ValueError(
                            f"{self.where}: protocol {self.protocol} leaves nothing unknown, "
                            f"but epoch {epoch} logs corrections"
                        )
                    known = np.concatenate(
                        [
                            _row_keys(obs.pos_offsets, obs.pos_values, s0, s1, k),
                            _row_keys(obs.neg_offsets, obs.neg_values, s0, s1, k),
                            old,
                        ]
                    )
                    known.sort()
                    hit = _in_sorted(new, known)
                    if hit.any():
                        bad = int(new[hit][0])
                        raise ValueError(
                            f"{self.where}: the logs of epoch {epoch} correct (sample {bad // k}, class {bad % k}), "
                            f"which is observed or already corrected in generation {self._gen}; "
                            "LL-Cp corrects unknown entries only"
                        )
                    merged = np.concatenate([old, new])
                    merged.sort(kind="stable")  # two sorted runs: a merge
                    added += len(new)
                else:
                    merged = old
                offsets[s0 + 1 : s1 + 1] = np.bincount(merged // k - s0, minlength=s1 - s0)
                chunk = (merged % k).astype("<u2").tobytes()
                vf.write(chunk)
                values_sha.update(chunk)
            vf.flush()
            os.fsync(vf.fileno())
        assert lo == len(keys)
        np.cumsum(offsets, out=offsets)
        raw = offsets.astype("<i8", copy=False).tobytes()
        with open(tmp / "offsets.bin", "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        return int(offsets[-1]), added, {"offsets.bin": hashlib.sha256(raw).hexdigest(),
                                         "values.bin": values_sha.hexdigest()}
