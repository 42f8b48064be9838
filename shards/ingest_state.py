"""The state an ingest keeps in ``OUT/.ingest/`` to refuse a mismatched re-run and to resume an interrupted one.

::

    OUT/.ingest/state.json            the plan/argument fingerprint a resumed run must match
    OUT/.ingest/<split>/NNNNNN.json   per-shard sidecar: proof that the shard is complete
    OUT/.ingest/lock                  held (flock) while an ingest writes to OUT

Crash safety and resume
=======================

The writer (``shards.writer``) commits shards one after the other: shard ``k`` goes to
``<split>/.NNNNNN.tar.tmp``, is fsynced, its DALI index goes to ``.NNNNNN.idx.tmp`` (fsynced), both are
renamed into place (index first) and the directory is fsynced; only then is the sidecar
``.ingest/<split>/NNNNNN.json`` written atomically (``write_sidecar``). The sidecar records the shard's
manifest entry (size and sha256 of the tar and of its index, first sample id, sample count), the range
of source records it consumed (including the skipped ones before each of its samples, with their
reasons) and a sha256 over those records' contents and their image files' size and mtime
(``record_digest``, ``source_stat``).

A re-run into the same folder first checks ``.ingest/state.json`` (``prepare_output``): the dataset,
classes, ``unlisted``, split names, ``plan.source`` and the arguments that change the output (shard size,
strict, check, max_pixels, max_side and quality when max_side is set, the format and writer versions:
``fingerprint``) must equal the interrupted run's, or the run stops with an error naming each difference
(``overwrite=True`` discards the old output instead). Then, per split, ``kept_shards`` keeps the longest
prefix of shards whose sidecar exists and whose files still have the recorded size and sha256, and deletes
every later shard file and sidecar. The writer replays the kept shards' record ranges from the plan
without reading any image, recomputing each shard's digest from the records and a ``stat`` of their files:
from the first shard whose digest differs (a record, a label or an image file changed, an image was
deleted or appeared, or the source now ends inside the shard), every shard is deleted
(``remove_shards_from``) and rewritten from the current source. ``labels.arrow`` and the manifest are
rebuilt from the full record stream, so the result is byte-identical to an uninterrupted run over the
current source. An image rewritten with the same size and the same mtime (to the nanosecond) is not
noticed: that takes hashing every image, which is what resuming avoids.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable

from .format import (
    FORMAT_VERSION,
    LABELS_NAME,
    MANIFEST_NAME,
    WRITER_VERSION,
    IngestError,
    IngestPlan,
    Record,
    ShardInfo,
    file_sha256,
    lock_file,
    shard_name,
    write_json_atomic,
)

STATE_DIR = ".ingest"
STATE_NAME = "state.json"
LOCK_NAME = "lock"

_SHARD_FILE_RE = re.compile(r"^(\d{6})\.(tar|idx)$")
_SIDECAR_RE = re.compile(r"^(\d{6})\.json$")


# ------------------------------------------------------------------------------------ the output folder

def fingerprint(plan: IngestPlan, shard_size: int, strict: bool, check: str, max_pixels: int,
                max_side: int | None = None, quality: int | None = None) -> dict[str, Any]:
    """Everything the output bytes depend on; a resumed run must match it exactly. ``max_side`` and
    ``quality`` (``--max-side``) are in it only when ``max_side`` is set, so that the state of a run without
    it is what earlier versions wrote (and resumes across the upgrade)."""
    bounded = {} if max_side is None else {"max_side": max_side, "quality": quality}
    return json.loads(json.dumps({
        "format_version": FORMAT_VERSION,
        "writer_version": WRITER_VERSION,
        "dataset": plan.dataset,
        "classes": plan.classes,
        "unlisted": plan.unlisted,
        "splits": list(plan.splits),
        "source": plan.source,
        "shard_size": shard_size,
        "strict": strict,
        "check": check,
        "max_pixels": max_pixels,
        **bounded,
    }))


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append(f"{sub}: absent before, now {new[key]!r}")
            elif key not in new:
                out.append(f"{sub}: was {old[key]!r}, now absent")
            else:
                out.extend(_differences(old[key], new[key], sub))
        return out
    if old != new:
        shown = [json.dumps(v) if len(json.dumps(v)) <= 80 else json.dumps(v)[:77] + "..." for v in (old, new)]
        return [f"{path}: was {shown[0]}, now {shown[1]}"]
    return []


def _clear_output(out: Path, split_names: Iterable[str]) -> None:
    """Delete what an ingest writes (and nothing else) under ``out``; the lock file stays."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for split in split_names:
        d = out / split
        if d.is_dir():
            for p in d.iterdir():
                temp = p.name.startswith(".") and ".tmp" in p.name
                if _SHARD_FILE_RE.match(p.name) or p.name == LABELS_NAME or temp:
                    p.unlink()
            if not any(d.iterdir()):
                d.rmdir()
    state = out / STATE_DIR
    for p in state.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name != LOCK_NAME:
            p.unlink()


def prepare_output(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Check ``out`` against ``fingerprint`` (see the module docstring), clear it where that is asked or
    needed, and record the fingerprint in ``.ingest/state.json``."""
    state_path = out / STATE_DIR / STATE_NAME
    old = None
    if state_path.is_file():
        try:
            old = json.loads(state_path.read_text(encoding="utf-8"))["fingerprint"]
        except (ValueError, KeyError, TypeError) as e:
            raise IngestError(f"{state_path}: unreadable ingest state ({e}); re-run with --overwrite") from e
    new_splits = fingerprint["splits"]
    if old is None:
        ours = [n for n in [MANIFEST_NAME, *new_splits] if (out / n).exists()]
        if ours and not overwrite:
            raise IngestError(
                f"{out}: holds {', '.join(ours)} but no {STATE_DIR}/{STATE_NAME}, so it was not written by this "
                "ingest; choose another --out, or pass --overwrite to replace those")
        _clear_output(out, new_splits)
    elif old != fingerprint:
        if not overwrite:
            diff = "; ".join(_differences(old, fingerprint))
            raise IngestError(
                f"{state_path}: {out} holds an ingest made with other inputs or arguments ({diff}). Re-run with the "
                "same plan and arguments to resume it, or pass --overwrite to discard it")
        _clear_output(out, sorted(set(old.get("splits", [])) | set(new_splits)))
    elif overwrite:
        _clear_output(out, new_splits)
    write_json_atomic(state_path, json.dumps({"fingerprint": fingerprint}, indent=1))


class OutputLock:
    """An exclusive flock on OUT/.ingest/lock: two ingests into one folder would interleave shards."""

    def __init__(self, out: Path):
        path = out / STATE_DIR / LOCK_NAME
        self.f = lock_file(path, lambda holder: IngestError(
            f"{path}: another ingest ({holder}) is writing to {out}; wait for it to finish"))

    def release(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------------- shard sidecars

def sidecar_path(state_dir: Path, index: int) -> Path:
    return state_dir / f"{index:06d}.json"


def write_sidecar(state_dir: Path, index: int, info: ShardInfo, first_record: int, num_records: int,
                  records_sha256: str, skipped: list, reencoded: int = 0) -> None:
    """Mark shard ``index`` as committed; its tar and DALI index must be in place and fsynced."""
    sidecar = {
        "writer_version": WRITER_VERSION,
        "shard": info.__dict__,
        "first_record": first_record,
        "num_records": num_records,
        "records_sha256": records_sha256,
        "skipped": skipped,  # [[record index, "missing"|"corrupt", rel_path, detail], ...]
    }
    if reencoded:  # samples re-encoded by --max-side; absent = 0 (the sidecars of a run without it are unchanged)
        sidecar["reencoded"] = reencoded
    write_json_atomic(sidecar_path(state_dir, index), json.dumps(sidecar, indent=0))


def _valid_sidecar(split_dir: Path, state_dir: Path, index: int, first_sample: int, first_record: int) -> dict | None:
    """The sidecar of shard ``index`` if it and the shard's files are intact and continue the prefix."""
    try:
        sc = json.loads(sidecar_path(state_dir, index).read_text(encoding="utf-8"))
        info = ShardInfo(**sc["shard"])
        if (sc["writer_version"] != WRITER_VERSION or info.file != shard_name(index)
                or info.first_sample != first_sample or sc["first_record"] != first_record or info.num_samples < 1):
            return None
        tar, idx = split_dir / info.file, split_dir / f"{info.file[:-4]}.idx"
        if tar.stat().st_size != info.size or idx.stat().st_size != info.idx_size:
            return None
        if file_sha256(tar) != info.sha256 or file_sha256(idx) != info.idx_sha256:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        # absent, unreadable or damaged sidecar or shard: the shard is rewritten from here on
        return None
    return sc


def remove_shards_from(split_dir: Path, state_dir: Path, first: int) -> None:
    """Delete shard files and sidecars with index >= first, and temporary files of an interrupted run."""
    for d, pattern in ((split_dir, _SHARD_FILE_RE), (state_dir, _SIDECAR_RE)):
        for p in d.iterdir():
            m = pattern.match(p.name)
            if (m and int(m.group(1)) >= first) or (p.name.startswith(".") and ".tmp" in p.name):
                p.unlink()


def kept_shards(split_dir: Path, state_dir: Path) -> list[dict]:
    """The sidecars of the longest intact prefix of committed shards; every later shard file, sidecar and
    temporary file is deleted (it is rewritten)."""
    kept: list[dict] = []
    first_sample = first_record = 0
    while (sc := _valid_sidecar(split_dir, state_dir, len(kept), first_sample, first_record)) is not None:
        kept.append(sc)
        first_sample += sc["shard"]["num_samples"]
        first_record += sc["num_records"]
    remove_shards_from(split_dir, state_dir, len(kept))
    return kept


def source_stat(path: str | None) -> list[int] | None:
    """[size, mtime_ns] of the image file a record names, None when there is none (missing, a folder, or a
    record that carries its bytes). The writer records the same values from the file it read."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def record_digest(rec: Record, pos: tuple[int, ...], neg: tuple[int, ...], where: str,
                  file_stat: list[int] | None) -> bytes:
    """sha256 of one source record: its contents (ids, paths, labels, meta, the bytes it carries) and
    ``file_stat``, the [size, mtime_ns] of its image file (``source_stat``); a sidecar's ``records_sha256`` is
    the sha256 over those of its records."""
    data_sha = hashlib.sha256(rec.data).hexdigest() if rec.data is not None else None
    try:
        text = json.dumps([rec.source_id, rec.rel_path, pos, neg, rec.path, data_sha, file_stat, rec.meta],
                          sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise IngestError(f"{where}: meta is not plain JSON ({e}); "
                          "the adapter must store plain ints/floats/strings") from e
    return hashlib.sha256(text.encode()).digest()
