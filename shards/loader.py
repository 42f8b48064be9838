"""CPU loader: WebDataset shards -> (uint8 images [B,3,S,S], int64 sample ids [B]).

Conventions (every one is a pure function below, tested over simulated layouts):

- **Epoch order.** The training subset is a sorted array of allowed sample ids (the trainer's 80/20 cut
  of the official train split lives in the same shards). In training the shard order is a permutation
  drawn from ``(seed, epoch)`` only; in evaluation it is the manifest order. Concatenating the allowed
  samples of the shards in that order, rank ``r`` of ``W`` gets the contiguous range
  ``[N*r//W, N*(r+1)//W)`` (sizes differ by at most 1), cut into pieces ``(shard, sample ids)``.
- **Workers.** Inside a rank, the DataLoader workers get contiguous near-equal ranges of the rank's
  samples in the same way. Each worker reads its pieces sequentially (tar headers are skipped by
  seeking, so a worker that starts mid-shard or a subset that leaves out samples costs no extra reads)
  and yields *single decoded samples*; batches are assembled in the main process, so the batch count
  and batch composition do not depend on how fast each worker runs. A worker writes each image into
  one of its slots in shared memory and sends only the slot index; the main process copies the slot
  into the batch and frees it (see ``_ShardStream``). OpenCV is set to one thread in the calling
  process before the workers fork (the workers are the parallelism; see ``ShardLoader.__iter__``).
- **Sample shuffle.** Training only: a per-worker window shuffle seeded from
  ``(seed, epoch, rank, worker)``: output order = ``argsort(position + U[0,1) * window)``. Each sample
  moves by less than ``window`` positions and a worker holds at most ``window`` encoded samples.
  The horizontal flip of each output is drawn from the same generator.
- **Batches.** Every rank yields ``num_batches(N, W, batch_size) = ceil(ceil(N/W) / batch_size)``
  batches (DDP hangs otherwise); ``batch_sizes`` splits a rank's samples into that many non-empty
  batches (a rank one sample short ends ``..., B-1, 1`` instead of with an empty batch).
- **Order across workers.** A DataLoader over an IterableDataset returns, in order, item ``k`` of every
  still-running worker ``0..W-1`` for ``k = 0, 1, ...`` (``interleave``). So a rank's whole stream is
  a pure function of ``(seed, epoch, rank, world_size, num_workers)``, and a resumed run can restart
  it at the exact next batch: ``resume_point`` gives how many outputs each worker drops and which
  worker the DataLoader's round robin must start from (physical worker ``p`` plays logical worker
  ``(p + rotation) % num_workers``).
- **Evaluation** (``train=False``): manifest shard order, no shuffle, no flip; every allowed sample is
  yielded exactly once across ranks and workers.
- **Decoding.** simplejpeg (libjpeg-turbo) first, OpenCV as a fallback for what simplejpeg refuses
  (e.g. PNG bytes named .jpg). On 500x375 JPEGs (tests/bench/loader.py, one thread, interleaved
  passes, best of 5) the two are within 2 % of each other (simplejpeg 0.92-1.19 ms, OpenCV
  0.94-1.17 ms per image to RGB; simplejpeg faster in 3 of 4 runs on a shared 2-core machine). With
  no speed reason either way, simplejpeg stays first: it takes the reduced scale as a minimum output
  size and returns RGB directly (OpenCV's IMREAD_REDUCED_* / IMREAD_COLOR_RGB flags would also do).
  Grayscale and CMYK JPEGs come out RGB (libjpeg-turbo converts Adobe CMYK; tested). When an image
  is at least twice the target on both sides it
  is decoded at a reduced DCT scale, 1/2, 1/4 or 1/8, the largest that keeps both sides >= S (only
  powers of two: libjpeg-turbo has SIMD IDCTs for them, and a 5/8 scale measured slower than a full
  decode), then squash-resized to (S, S) with ``cv2.INTER_LINEAR``. EXIF orientation is ignored, as
  PIL's ``Image.open`` does. Normalisation is left to the device.
- **Errors.** ``on_error="raise"`` (default) raises ``SampleError`` naming the shard file and the key.
  ``on_error="skip"`` counts skipped samples in ``ShardLoader.skipped`` (by reason) and keeps the first
  messages in ``ShardLoader.skip_log``. Skipping breaks the guarantees as follows: a skipped sample
  still occupies its slot in the planned stream (the worker sends a marker instead of pixels), so the
  number of batches stays exactly ``len(loader)`` on every rank, but batch ``i`` loses its skipped
  samples (smaller batches), the skipped samples are missing from the epoch, and a batch whose every
  sample was skipped repeats the previous good sample of the rank (counted as ``skipped["repeated"]``;
  a duplicate id, which evaluation's de-duplication by sample id absorbs and its count check reports).
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import struct
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
import simplejpeg
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from largeloss.shards.format import FormatError, read_manifest, sample_key

__all__ = [
    "Piece",
    "EpochPlan",
    "SampleError",
    "DecodeError",
    "ShardLoader",
    "split_by_shard",
    "shard_order",
    "rank_bounds",
    "take_range",
    "num_batches",
    "batch_sizes",
    "window_shuffle",
    "worker_order",
    "interleave",
    "resume_point",
    "plan_epoch",
    "decode_scale",
    "decode_rgb",
    "decode_image",
]

logger = logging.getLogger(__name__)

# Distinct first words of the SeedSequence entropy keep the shard-order stream and the per-worker
# streams independent even when (seed, epoch, ...) coincide.
_TAG_SHARD_ORDER = 0x53484F52
_TAG_WORKER = 0x574F524B

#: shared-memory slots per worker beyond its prefetch_factor (tests set it negative for a 1-slot ring)
_RING_EXTRA = 2

#: skipped-sample messages kept in ``ShardLoader.skip_log`` (the counters keep counting past it)
SKIP_LOG_LIMIT = 1000

_FIX_READ = (
    "the shard is damaged or incomplete: re-run `ingest` for this split (finished shards are verified), "
    "or pass on_error='skip' to count and skip such samples"
)
_FIX_DECODE = (
    "the image bytes cannot be decoded: re-run `ingest` (it counts undecodable images as corrupt), "
    "or pass on_error='skip' to count and skip such samples"
)


class SampleError(RuntimeError):
    """A sample could not be read or decoded; the message names the shard file and the key."""


class DecodeError(ValueError):
    """Image bytes that neither simplejpeg nor OpenCV can decode."""


# ----------------------------------------------------------------------------------------------
# Planning: pure functions of the layout, the allowed ids and (seed, epoch, rank, worker)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Piece:
    """Samples of one shard read by one worker, in sample-id (= tar) order."""

    shard: int  # index into the split's shard list (manifest order)
    ids: np.ndarray  # int64 sample ids, sorted, all inside that shard


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """Everything one rank needs for one epoch; identical on every call with the same arguments."""

    batch_sizes: list[int]  # this rank's planned batches; len() is the same on every rank
    workers: list[list[Piece]]  # pieces of each *logical* worker, in reading order
    rotation: int  # physical DataLoader worker p plays logical worker (p + rotation) % num_workers
    skips: list[int]  # outputs each logical worker drops before its first yield (resume), by logical id
    start_batch: int  # first planned batch this plan yields

    @property
    def num_samples(self) -> int:
        """Samples of this rank in the whole epoch (start_batch ignored)."""
        return sum(self.batch_sizes)


def split_by_shard(shard_ranges: Sequence[tuple[int, int]], sample_ids: np.ndarray | None) -> list[np.ndarray]:
    """Allowed ids of each shard. ``shard_ranges[i] = (first_sample, num_samples)``; ``None`` allows all.

    ``sample_ids`` must be sorted, unique, inside the split: the caller validates (``ShardLoader`` does).
    """
    out = []
    for first, n in shard_ranges:
        if sample_ids is None:
            out.append(np.arange(first, first + n, dtype=np.int64))
        else:
            lo, hi = np.searchsorted(sample_ids, [first, first + n])
            out.append(np.asarray(sample_ids[lo:hi], dtype=np.int64))
    return out


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Order in which the shards are concatenated: a permutation from (seed, epoch), or manifest order."""
    if not shuffle:
        return np.arange(num_shards)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_SHARD_ORDER, seed, epoch])))
    return rng.permutation(num_shards)


def rank_bounds(n: int, part: int, parts: int) -> tuple[int, int]:
    """Contiguous range of ``part`` when ``n`` items are cut into ``parts`` (sizes differ by at most 1)."""
    return n * part // parts, n * (part + 1) // parts


def take_range(pieces: Sequence[Piece], start: int, stop: int) -> list[Piece]:
    """Items ``[start, stop)`` of the concatenation of ``pieces``, as pieces (empty ones dropped)."""
    out = []
    offset = 0
    for p in pieces:
        n = len(p.ids)
        lo, hi = max(start - offset, 0), min(stop - offset, n)
        if lo < hi:
            out.append(Piece(p.shard, p.ids[lo:hi]))
        offset += n
        if offset >= stop:
            break
    return out


def num_batches(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per epoch, the same on every rank: enough for the largest rank (ceil(N/W) samples).

    Every rank must fill that many non-empty batches; the smallest rank has floor(N/W) samples, which
    is always enough for batch_size >= 2 and N >= W. Otherwise no split without padding exists.
    """
    n_max = -(-num_samples // world_size)
    n_min = num_samples // world_size
    nb = -(-n_max // batch_size)
    if n_min < nb:
        raise ValueError(
            f"{num_samples} samples over {world_size} ranks with batch_size {batch_size}: the smallest rank "
            f"({n_min} samples) cannot fill the {nb} batches of the largest one; use batch_size >= 2 and "
            "at least as many samples as ranks"
        )
    return nb


def batch_sizes(n_rank: int, n_batches: int, batch_size: int) -> list[int]:
    """Split a rank's ``n_rank`` samples into exactly ``n_batches`` non-empty batches of <= batch_size.

    Greedy: full batches while the remaining batches can still get one sample each. A rank one
    sample short of ``(n_batches - 1) * batch_size + 1`` ends ``[..., B, B-1, 1]`` instead of with an
    empty batch, which would leave it one batch short of the other ranks.
    """
    if not n_batches <= n_rank <= n_batches * batch_size:
        raise ValueError(f"{n_rank} samples cannot fill {n_batches} non-empty batches of at most {batch_size}")
    sizes = []
    remaining = n_rank
    for i in range(n_batches):
        b = min(batch_size, remaining - (n_batches - 1 - i))
        sizes.append(b)
        remaining -= b
    return sizes


def window_shuffle(n: int, window: float, rng: np.random.Generator) -> np.ndarray:
    """Output order (output position -> input position) of a bounded-memory shuffle.

    ``argsort(i + U[0,1) * window)``: an input read at position i is emitted before every input whose
    key is larger, so a sequential reader never holds more than ``window`` inputs that it has read but
    not yet emitted. ``window <= 0`` keeps the order.
    """
    if window <= 0:
        return np.arange(n)
    keys = np.arange(n) + rng.random(n) * window
    return np.argsort(keys, kind="stable")


def worker_order(
    n: int, *, train: bool, window: float, seed: int, epoch: int, rank: int, worker: int
) -> tuple[np.ndarray, np.ndarray]:
    """(order, flips) of a logical worker's ``n`` samples: shuffle + flip in training, identity in eval."""
    if not train:
        return np.arange(n), np.zeros(n, dtype=bool)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_WORKER, seed, epoch, rank, worker])))
    order = window_shuffle(n, window, rng)
    flips = rng.random(n) < 0.5
    return order, flips


def interleave(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(worker, item index) in the order a DataLoader (``in_order=True``) yields from IterableDataset workers.

    The DataLoader sends requests to workers round robin and returns results in request order; a
    worker whose iterator is exhausted answers once with "stop" and is dropped from the cycle. So the
    output is item k of every still-running worker 0..W-1, for k = 0, 1, ...
    """
    out = []
    for k in range(max(counts, default=0)):
        out.extend((w, k) for w, c in enumerate(counts) if k < c)
    return out


def _outputs_before(counts: Sequence[int], position: int) -> list[int]:
    """Items of each worker at cyclic positions < ``position`` (position t belongs to worker t % W)."""
    w_count = len(counts)
    return [min(c, max(0, -(-(position - w) // w_count))) for w, c in enumerate(counts)]


def resume_point(counts: Sequence[int], consumed: int) -> tuple[int, list[int]]:
    """Where the DataLoader stream continues after ``consumed`` outputs: (rotation, skips per worker).

    Position t of the round robin belongs to worker t % W, item t // W (absent when exhausted). Let P be
    the position just after the consumed-th output. A fresh DataLoader whose physical worker p plays
    logical worker (p + P) % W and drops that worker's first ``skips`` items yields exactly the rest of
    the original stream, because it walks the same cyclic sequence starting at P.
    """
    total = sum(counts)
    if not 0 <= consumed <= total:
        raise ValueError(f"cannot resume after {consumed} of {total} outputs")
    lo, hi = 0, len(counts) * max(counts, default=0)
    while lo < hi:  # smallest P with at least `consumed` outputs before it
        mid = (lo + hi) // 2
        if sum(_outputs_before(counts, mid)) >= consumed:
            hi = mid
        else:
            lo = mid + 1
    return lo % max(len(counts), 1), _outputs_before(counts, lo)


def plan_epoch(
    per_shard: Sequence[np.ndarray],
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    start_batch: int = 0,
) -> EpochPlan:
    """One rank's epoch: shards ordered, the rank's range, worker ranges, batch sizes, resume point.

    ``per_shard[i]`` holds the allowed (sorted) ids of shard i; ``num_workers = 0`` plans one worker
    (the main process).
    """
    n_workers = max(num_workers, 1)
    order = shard_order(len(per_shard), seed, epoch, shuffle)
    ordered = [Piece(int(s), per_shard[s]) for s in order if len(per_shard[s])]
    total = sum(len(p.ids) for p in ordered)
    nb = num_batches(total, world_size, batch_size)
    mine = take_range(ordered, *rank_bounds(total, rank, world_size))
    n_rank = sum(len(p.ids) for p in mine)
    sizes = batch_sizes(n_rank, nb, batch_size)
    workers = [take_range(mine, *rank_bounds(n_rank, w, n_workers)) for w in range(n_workers)]
    if not 0 <= start_batch <= nb:
        raise ValueError(f"start_batch {start_batch} is outside 0..{nb} (batches per epoch)")
    counts = [sum(len(p.ids) for p in w) for w in workers]
    rotation, skips = resume_point(counts, sum(sizes[:start_batch]))
    return EpochPlan(batch_sizes=sizes, workers=workers, rotation=rotation, skips=skips, start_batch=start_batch)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def decode_scale(height: int, width: int, size: int) -> int:
    """Largest DCT reduction in (1, 2, 4, 8) that keeps both sides >= size (so 1 below 2x the target)."""
    f = 1
    while f < 8 and height >= 2 * f * size and width >= 2 * f * size:
        f *= 2
    return f


def decode_rgb(data: bytes, size: int) -> np.ndarray:
    """Decode to an HxWx3 uint8 RGB array, at reduced scale when the image is >= 2x ``size``."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        f = decode_scale(height, width, size)
        # libjpeg-turbo picks the smallest M/8 scale whose output is >= the minimum; ceil(h/f) makes
        # that exactly 1/f (scaled sizes are rounded up).
        scaled = {} if f == 1 else {"min_height": -(-height // f), "min_width": -(-width // f)}
        return simplejpeg.decode_jpeg(data, colorspace="RGB", **scaled)
    except ValueError as e:  # not a JPEG libjpeg-turbo accepts (PNG bytes, some exotic JPEGs)
        first_error = e
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DecodeError(f"neither simplejpeg ({first_error}) nor OpenCV can decode these {len(data)} bytes")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode and squash-resize to (size, size, 3) uint8 RGB (aspect ratio not kept, as in the paper)."""
    img = decode_rgb(data, size)
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return img


def _to_chw(img: np.ndarray, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """HWC -> CHW (into ``out`` when given), flipped horizontally if asked.

    ``cv2.split`` into views of the output planes: measured 0.06 ms at 448x448 against 0.23 ms for
    numpy's transposing copy.
    """
    if flip:
        img = cv2.flip(img, 1)  # 1 = around the vertical axis
    if out is None:
        out = np.empty((img.shape[2], img.shape[0], img.shape[1]), np.uint8)
    planes = cv2.split(img, [out[c] for c in range(out.shape[0])])
    if planes[0].ctypes.data != out[0].ctypes.data:  # an OpenCV that allocated planes of its own
        out[...] = np.stack(planes)
    return out


# ----------------------------------------------------------------------------------------------
# Reading shards
# ----------------------------------------------------------------------------------------------

# What flows to the main process, one per planned sample:
# (sample id, physical worker, payload, skip reason or None, message or None). The payload is the CHW
# uint8 array when decoding runs in the main process, the index of the worker's shared-memory slot that
# holds it when it runs in DataLoader workers, None for a skipped sample. Why slots: per-sample IPC
# of 3x448x448 uint8 moved ~600 samples/s as tensors (one shared-memory segment each) and ~1150/s as
# pickled arrays (2 workers, a busy 2-core machine), about as much CPU as decoding itself; a slot
# is written in place by the worker and copied once into the batch.
_Item = tuple[int, int, "np.ndarray | int | None", "str | None", "str | None"]


def _read_piece(path: str, ids: np.ndarray, needed: np.ndarray) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Yield (index into ids, jpeg bytes, None) or (index, None, error) once for every needed index.

    Members of a sample are consecutive in the tar (the WebDataset convention), so a sample is
    complete when the key changes. Reading stops once every needed sample of the piece was seen.
    """
    want = {int(ids[i]): int(i) for i in np.flatnonzero(needed)}
    if not want:
        return
    try:
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as e:
        for i in want.values():
            yield i, None, f"cannot open the shard ({e})"
        return

    def finish(sid: int, members: dict[str, bytes]) -> tuple[int, bytes | None, str | None]:
        i = want.pop(sid)
        if "jpg" not in members:
            return i, None, "no .jpg member"
        if "idx" in members:
            if len(members["idx"]) != 4:
                return i, None, f".idx member has {len(members['idx'])} bytes, expected 4"
            stored = struct.unpack("<i", members["idx"])[0]  # sample id, little-endian int32
            if stored != sid:
                return i, None, f".idx member says sample {stored}"
        return i, members["jpg"], None

    with tar:
        current: int | None = None  # sample id of the member group being read, if wanted
        members: dict[str, bytes] = {}
        try:
            for m in tar:  # reads headers lazily; seeks over the data of members not read
                key, _, ext = os.path.basename(m.name).partition(".")
                sid = int(key) if key.isdigit() else -1
                if sid != current:
                    if current is not None:
                        yield finish(current, members)
                        if not want:
                            break
                    current, members = (sid if sid in want else None), {}
                if current is not None and ext in ("jpg", "idx") and m.isfile():
                    fobj = tar.extractfile(m)
                    assert fobj is not None  # isfile() members always have data
                    members[ext] = fobj.read()
            else:
                if current is not None:
                    yield finish(current, members)
        except (OSError, tarfile.TarError) as e:  # a truncated or corrupt member
            for i in want.values():
                yield i, None, f"shard unreadable from here on ({e})"
            return
    # tarfile ends iteration silently at a damaged header after the first member: what is still
    # wanted is missing either way
    for i in want.values():
        yield i, None, "not in the shard"


class _ShardStream(IterableDataset):
    """One rank's planned stream of single samples; runs in each DataLoader worker (or the main process)."""

    def __init__(
        self,
        paths: list[str],
        plan: EpochPlan,
        *,
        train: bool,
        window: float,
        seed: int,
        epoch: int,
        rank: int,
        image_size: int,
        on_error: str,
        slots: torch.Tensor | None = None,
        free: list | None = None,
    ):
        # In-process decoding: both None. With workers: slots [W, R, 3, S, S] uint8 in shared memory and
        # one semaphore per physical worker counting its free slots (R at the start). The worker takes a
        # permit before writing its next slot (round robin over its R slots); the main process gives
        # it back after copying the slot into a batch. Semaphores, not a shared counter: their
        # acquire/release are memory barriers on every architecture, so a slot is never rewritten
        # while the main process may still be reading it.
        self.slots = slots
        self.free = free
        self.parent_pid = os.getpid()
        self.paths = paths
        self.plan = plan
        self.train = train
        self.window = window
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.image_size = image_size
        self.on_error = on_error

    def __iter__(self) -> Iterator[_Item]:
        n_workers = len(self.plan.workers)
        info = get_worker_info()
        physical = 0 if info is None else info.id
        if info is not None:
            if info.num_workers != n_workers:
                raise RuntimeError(f"internal error: planned {n_workers} workers, DataLoader runs {info.num_workers}")
        logical = (physical + self.plan.rotation) % n_workers
        pieces = self.plan.workers[logical]
        yield from self._produce(pieces, physical, logical, self.plan.skips[logical])

    def _slot(self, physical: int, k: int) -> tuple[int, np.ndarray]:
        """Slot of this worker's k-th image; waits until the main process has copied the image R before it."""
        assert self.slots is not None and self.free is not None
        while not self.free[physical].acquire(timeout=1.0):
            if os.getppid() != self.parent_pid:
                raise RuntimeError("the main process of this DataLoader worker has exited")
        ring = self.slots.shape[1]
        return k % ring, self.slots[physical, k % ring].numpy()

    def _produce(self, pieces: list[Piece], physical: int, logical: int, skip: int) -> Iterator[_Item]:
        ids = np.concatenate([p.ids for p in pieces]) if pieces else np.zeros(0, np.int64)
        n = len(ids)
        order, flips = worker_order(
            n, train=self.train, window=self.window, seed=self.seed, epoch=self.epoch, rank=self.rank, worker=logical
        )
        needed = np.ones(n, dtype=bool)
        needed[order[:skip]] = False  # resumed: the outputs already consumed are never read
        used_slots = 0
        piece_start = np.cumsum([0] + [len(p.ids) for p in pieces])
        reader = self._read(pieces, piece_start, needed)
        pending: dict[int, tuple[bytes | None, str | None]] = {}
        for j in range(skip, n):
            i = int(order[j])
            while i not in pending:
                got = next(reader, None)
                if got is None:
                    raise RuntimeError(f"internal error: the reader ended before input {i} of worker {logical}")
                pending[got[0]] = (got[1], got[2])
            data, error = pending.pop(i)
            sid = int(ids[i])
            reason = "read"
            if data is not None:
                try:
                    img = decode_image(data, self.image_size)
                except DecodeError as e:
                    reason, error = "decode", str(e)
                else:
                    if self.slots is None:
                        yield sid, physical, _to_chw(img, bool(flips[j])), None, None
                    else:
                        slot, out = self._slot(physical, used_slots)
                        used_slots += 1
                        _to_chw(img, bool(flips[j]), out)
                        yield sid, physical, slot, None, None
                    continue
            path = self.paths[pieces[int(np.searchsorted(piece_start, i, side="right")) - 1].shard]
            fix = _FIX_DECODE if reason == "decode" else _FIX_READ
            message = f"{path}: sample {sample_key(sid)}: {error}"
            if self.on_error == "raise":
                raise SampleError(f"{message}; {fix}")
            yield sid, physical, None, reason, message

    def _read(
        self, pieces: list[Piece], piece_start: np.ndarray, needed: np.ndarray
    ) -> Iterator[tuple[int, bytes | None, str | None]]:
        for p, base in zip(pieces, piece_start):
            sub = needed[base : base + len(p.ids)]
            for i, data, error in _read_piece(self.paths[p.shard], p.ids, sub):
                yield int(base) + i, data, error


def _pass_through(item: _Item) -> _Item:
    # the DataLoader must not collate single samples; batches are assembled in the main process
    return item


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSelection:
    """What a loader reads of one split: its shards and the allowed sample ids of each."""

    root: str
    info: Any  # shards.format.SplitInfo
    tar_paths: list[str]
    per_shard: list[np.ndarray]  # allowed sample ids of each shard (split_by_shard)

    @property
    def total(self) -> int:
        return sum(len(a) for a in self.per_shard)


def select_split(dataset_root, split: str, sample_ids=None) -> SplitSelection:
    """Open ``split`` of a dataset directory for a loader: manifest checked, ``sample_ids`` (strictly
    increasing ids of the split; None = all) distributed over the shards, every shard that holds a selected
    sample present on disk. Shared by ShardLoader and the DALI loader, so both read the same samples."""
    root = os.fspath(dataset_root)
    manifest = read_manifest(root)
    if split not in manifest.splits:
        raise FormatError(f"{os.path.join(root, 'manifest.json')}: no split {split!r}; it has {sorted(manifest.splits)}")
    info = manifest.splits[split]
    ids = None if sample_ids is None else check_sample_ids(sample_ids, info.num_samples, split)
    per_shard = split_by_shard([(s.first_sample, s.num_samples) for s in info.shards], ids)
    paths = [os.path.join(root, split, s.file) for s in info.shards]
    for path, allowed in zip(paths, per_shard):
        if len(allowed) and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: shard listed in the manifest is missing; re-run `ingest` for split {split!r}")
    return SplitSelection(root, info, paths, per_shard)


def check_sample_ids(sample_ids, n: int, split: str) -> np.ndarray:
    """Sorted unique int64 ids of a split of ``n`` samples, or a ValueError saying what is wrong."""
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"sample_ids must be a 1-D array of integers, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids[0] < 0 or ids[-1] >= n or np.any(np.diff(ids) <= 0)):
        raise ValueError(f"sample_ids must be strictly increasing ids of split {split!r} (0..{n - 1})")
    return ids


class ShardLoader:
    """Batches of (uint8 images [B,3,S,S], int64 sample ids [B]) for one rank of one split.

    ``len(loader)`` is the number of batches per epoch, the same on every rank. Call
    ``set_epoch(epoch)`` before each epoch (``set_epoch(epoch, start_batch=n)`` to resume at batch n:
    the pass then yields batches n..len-1, exactly those of an uninterrupted pass).

    - ``sample_ids``: sorted allowed ids of the split (e.g. the 80 % train cut); None = all.
    - ``train``: shuffled shards and samples + random horizontal flip; False: evaluation order, no flip.
    - ``num_workers``: DataLoader worker processes (0 decodes in this process); the sample stream, and
      so every batch, depends on it, so a resumed run must use the same value.
    - ``shuffle_buffer``: the sample-shuffle window (samples each worker keeps in memory, encoded).
    - ``on_error``: "raise" or "skip" (see the module docstring for what skipping changes).
    - ``pin_memory``: page-lock the batches (when CUDA is available) for asynchronous copies.
    """

    def __init__(
        self,
        dataset_root: str | os.PathLike,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        train: bool,
        sample_ids: Sequence[int] | np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        on_error: str = "raise",
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
    ):
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size} and {image_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        if num_workers < 0 or seed < 0 or shuffle_buffer < 0:
            raise ValueError("num_workers, seed and shuffle_buffer must be >= 0")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        sel = select_split(dataset_root, split, sample_ids)
        self.root, self._per_shard, self._paths = sel.root, sel.per_shard, sel.tar_paths
        self.split = split
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.on_error = on_error
        self.shuffle_buffer = shuffle_buffer
        self.pin_memory = pin_memory
        self.epoch = 0
        self.start_batch = 0
        #: skipped samples by reason ("read", "decode") and "repeated" (batches refilled), over the loader's life
        self.skipped: Counter[str] = Counter()
        #: the first SKIP_LOG_LIMIT skip messages ("<shard path>: sample <key>: <why>")
        self.skip_log: list[str] = []
        total = sum(len(a) for a in self._per_shard)
        if total == 0:
            raise ValueError(f"{self.root}: no samples selected from split {split!r} (empty sample_ids?)")
        self._len = num_batches(total, world_size, batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (shard and sample order) and the first batch the next iteration yields."""
        if epoch < 0 or not 0 <= start_batch <= self._len:
            raise ValueError(f"epoch must be >= 0 and start_batch in 0..{self._len}, got {epoch}, {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self._len

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (the same for every epoch)."""
        return self.plan().num_samples

    def plan(self) -> EpochPlan:
        """The plan of the current epoch for this rank (pure: same arguments, same plan)."""
        return plan_epoch(
            self._per_shard,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.train,
            start_batch=self.start_batch,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan()
        extra = {}
        slots = free = None
        if self.num_workers > 0:
            # One OpenCV thread per worker: the workers are the parallelism. It is set here, before the
            # workers fork, because reconfiguring OpenCV's thread pool inside a forked child deadlocks
            # when the parent had used the pool. Side effect: OpenCV in this process stays single-threaded.
            cv2.setNumThreads(1)
            # keep about two batches in flight across the workers: single samples are small requests
            prefetch = max(2, math.ceil(2 * self.batch_size / self.num_workers))
            extra["prefetch_factor"] = prefetch
            # a worker has about `prefetch` requests outstanding, so prefetch + 2 slots rarely make it wait
            s, ring = self.image_size, max(1, prefetch + _RING_EXTRA)
            slots = torch.empty((self.num_workers, ring, 3, s, s), dtype=torch.uint8).share_memory_()
            free = [multiprocessing.Semaphore(ring) for _ in range(self.num_workers)]
        stream = _ShardStream(
            self._paths,
            plan,
            train=self.train,
            window=self.shuffle_buffer,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            image_size=self.image_size,
            on_error=self.on_error,
            slots=slots,
            free=free,
        )
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_pass_through,
            persistent_workers=False,
            pin_memory=False,  # batches are pinned after assembly, not sample by sample
            **extra,
        )
        pin = self.pin_memory and torch.cuda.is_available()
        if self.pin_memory and not pin:
            logger.warning("pin_memory=True but CUDA is not available: batches are not pinned")
            self.pin_memory = False  # say it once
        return self._batches(iter(loader), plan.batch_sizes[plan.start_batch :], pin, slots, free, extra)

    def _batches(
        self,
        items: Iterator[_Item],
        sizes: list[int],
        pin: bool,
        slots: torch.Tensor | None,
        free: list | None,
        dataloader_args: dict,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self._assemble(items, sizes, pin, slots, free)
        finally:
            if free is not None:
                # Stopped early (or done): workers may still be serving outstanding requests (at most
                # prefetch_factor * num_workers in all) before the DataLoader shuts them down; unblock them.
                for sem in free:
                    for _ in range(dataloader_args["prefetch_factor"] * len(free) + 1):
                        sem.release()

    def _assemble(
        self,
        items: Iterator[_Item],
        sizes: list[int],
        pin: bool,
        slots: torch.Tensor | None,
        free: list | None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shape = (3, self.image_size, self.image_size)
        slot_arrays = None if slots is None else slots.numpy()
        last_good: tuple[int, np.ndarray] | None = None
        for size in sizes:
            # copies go through numpy, not torch: torch's intra-op threads made a 16 x 3 x 448 x 448
            # stack ~100x slower on a busy machine (127 ms vs 1 ms, 2 threads on 2 loaded cores)
            if pin:
                batch = torch.empty((size, *shape), dtype=torch.uint8, pin_memory=True)
            else:
                batch = torch.empty((size, *shape), dtype=torch.uint8)
            out = batch.numpy()
            ids: list[int] = []
            for _ in range(size):
                item = next(items, None)
                if item is None:
                    raise RuntimeError(f"internal error: rank {self.rank}'s stream ended before its planned batches")
                sid, worker, payload, reason, message = item
                if isinstance(payload, np.ndarray):
                    out[len(ids)] = payload
                elif payload is not None:
                    assert slot_arrays is not None and free is not None
                    out[len(ids)] = slot_arrays[worker, payload]
                    free[worker].release()
                if payload is None:
                    self._record_skip(reason, message)
                    continue
                ids.append(sid)
            if not ids:
                if last_good is None:
                    raise SampleError(
                        f"{self.root}: every sample of rank {self.rank}'s first batch was skipped "
                        f"({self.skip_log[-1] if self.skip_log else 'no message'}); re-run `ingest` for {self.split!r}"
                    )
                out[0] = last_good[1]
                ids = [last_good[0]]
                self.skipped["repeated"] += 1
            if self.on_error == "skip":  # a copy: the consumer may modify the batch in place
                last_good = (ids[-1], out[len(ids) - 1].copy())
            yield batch[: len(ids)], torch.tensor(ids, dtype=torch.int64)
        if next(items, None) is not None:
            raise RuntimeError(f"internal error: rank {self.rank}'s stream has more samples than its planned batches")

    def _record_skip(self, reason: str | None, message: str | None) -> None:
        self.skipped[reason or "read"] += 1
        if len(self.skip_log) < SKIP_LOG_LIMIT:
            self.skip_log.append(message or "")
        logger.warning("skipped %s", message)
