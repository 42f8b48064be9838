"""CPU loader: WebDataset shards -> (uint8 images [B,3,S,S], int64 sample ids [B]).

Which samples each rank reads, in which order and in which batches is ``shards.schedule`` (an
``EpochSchedule``, the same one the DALI loader follows); this module runs that plan:

- **Reading.** The DataLoader workers deal the rank's stream round robin (``EpochPlan.worker``). Each
  reads its samples in stream order by offset (``shards.tar.ShardReader``: random access through the
  shards' DALI indexes, which are parsed once in the main process before the workers fork), decodes
  (``shards.jpeg``) and yields decoded samples in runs of up to ``MAX_CHUNK`` consecutive stream positions
  (the stream is dealt to the workers run by run, ``EpochPlan.worker``); batches are assembled in the main
  process, so the batch count and batch composition do not depend on the number of workers or on how
  fast each one runs. A worker resizes each image straight into one of its slots in shared memory and
  sends only the slot index; the main process copies the slot into the batch and frees it (see
  ``_ShardStream``). A sample that cannot be read or decoded travels as a marker and is raised or
  skipped by the main process when the stream reaches it. OpenCV is
  set to one thread in the calling process before the workers fork (the workers are the parallelism;
  see ``ShardLoader.__iter__``).
- **Errors.** A missing or damaged DALI index is a ``FormatError`` naming the file (at construction or
  when the epoch starts), whatever ``on_error`` says: it is no sample's fault, re-run ``ingest``. For a
  sample, ``on_error="raise"`` (default) raises ``SampleError`` naming the shard file and the key, for
  any read or decode failure (``shards.jpeg.decode_image`` reports every failure as ``DecodeError``).
  ``on_error="skip"`` counts skipped samples in ``ShardLoader.skipped`` (by reason) and keeps the first
  messages in ``ShardLoader.skip_log``. Skipping breaks the guarantees as follows: a skipped sample
  still occupies its slot in the planned stream (the worker sends a marker instead of pixels), so the
  number of batches stays exactly ``len(loader)`` on every rank, but batch ``i`` loses its skipped
  samples (smaller batches), the skipped samples are missing from the epoch, and a batch whose every
  sample was skipped repeats the previous good sample of the rank (counted as ``skipped["repeated"]``;
  a duplicate id, which evaluation's de-duplication by sample id absorbs and its count check reports).
"""
from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
from collections import Counter
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .format import sample_key
from .jpeg import DecodeError, decode_rgb, resize_planes
from .schedule import EpochPlan, EpochSchedule, select_split
from .tar import ShardReader

__all__ = ["SampleError", "ShardLoader"]

logger = logging.getLogger(__name__)

#: shared-memory slots per worker beyond its prefetch_factor (tests set it negative for a 1-slot ring)
_RING_EXTRA = 2

#: skipped-sample messages kept in ``ShardLoader.skip_log`` (the counters keep counting past it)
SKIP_LOG_LIMIT = 1000

#: the fix a SampleError names (both loaders); on_error is the loaders' argument and the training config key
FIX_READ = (
    "the shard is damaged or incomplete: re-run `ingest` for this split (finished shards are verified), "
    "or set on_error=skip to count and skip such samples"
)
FIX_DECODE = (
    "the image bytes cannot be decoded: re-run `ingest` (it counts undecodable images as corrupt), "
    "or set on_error=skip to count and skip such samples"
)


class SampleError(RuntimeError):
    """A sample could not be read or decoded; the message names the shard file and the key."""


def _decode(data: bytes, size: int, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """The image squash-resized to CHW (size, size), flipped horizontally if asked, into ``out`` when given
    (a shared-memory slot); ``DecodeError``. Unflipped, the resize writes straight into ``out``."""
    img = decode_rgb(data, size)
    if img.shape[:2] == (size, size):
        return _to_chw(img, False, flip, out)
    if flip:
        return _to_chw(resize_planes(img, size), True, True, out)
    return resize_planes(img, size, out)


def _to_chw(img: np.ndarray, planar: bool, flip: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Decoded pixels, planar CHW or (``planar=False``) HWC, as CHW (into ``out`` when given), flipped
    horizontally if asked.

    Planes are copied or flipped plane by plane. HWC is split with ``cv2.split`` into views of the
    output planes: measured 0.06 ms at 448x448 against 0.23 ms for numpy's transposing copy.
    """
    if planar:
        if out is None and not flip:
            return img
        if out is None:
            out = np.empty_like(img)
        for c in range(img.shape[0]):
            if not flip:
                np.copyto(out[c], img[c])
            elif cv2.flip(img[c], 1, dst=out[c]).ctypes.data != out[c].ctypes.data:  # 1: around the vertical axis
                out[c] = cv2.flip(img[c], 1)  # an OpenCV that allocated a plane of its own
        return out
    if flip:
        img = cv2.flip(img, 1)
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
# (sample id, worker, payload, failure reason or None, message or None). The payload is the CHW
# uint8 array when decoding runs in the main process, the index of the worker's shared-memory slot that
# holds it when it runs in DataLoader workers, None for a sample that failed (the main process raises
# or skips it, in stream order). Why slots: per-sample IPC of 3x448x448 uint8 moved ~600 samples/s as
# tensors (one shared-memory segment each) and ~1150/s as pickled arrays (2 workers, a busy 2-core
# machine), about as much CPU as decoding itself; a slot is written in place by the worker and copied
# once into the batch. Items travel in lists of up to ``chunk`` consecutive stream positions, one
# DataLoader item each: the DataLoader's per-item cost (an index request, a result message, its pickling,
# a profiler record) is paid once per list (tests/bench/loader.py, README).
_Item = tuple[int, int, "np.ndarray | int | None", "str | None", "str | None"]

#: most samples per DataLoader item (``_chunk``)
MAX_CHUNK = 4


def _chunk(batch_size: int, num_workers: int) -> int:
    """Samples per DataLoader item: half a worker's share of a batch, at most ``MAX_CHUNK`` (one sample
    in-process). Half, not all of it: with a whole share per item the main process waits for the last image
    of every worker before it can assemble anything, and on a busy 2-core machine the epoch took 1.4x as long
    in wall time (407 vs 562 img/s at 448 px, batch 16, 2 workers; CPU per image 2.14 vs 2.23 ms); with 2-4
    samples per item the CPU saving stays and the wall time is that of one sample per item (README)."""
    return 1 if num_workers == 0 else max(1, min(MAX_CHUNK, -(-batch_size // (2 * num_workers))))


class _ShardStream(IterableDataset):
    """One rank's planned stream of single samples; runs in each DataLoader worker (or the main process)."""

    def __init__(
        self,
        reader: ShardReader,
        plan: EpochPlan,
        *,
        image_size: int,
        on_error: str,
        slots: torch.Tensor | None = None,
        free: list | None = None,
        chunk: int = 1,
    ):
        # In-process decoding: both None. With workers: slots [W, R, 3, S, S] uint8 in shared memory and
        # one semaphore per worker counting its free slots (R at the start). The worker takes a permit
        # before writing its next slot (round robin over its R slots); the main process gives it back
        # after copying the slot into a batch. Semaphores, not a shared counter: their acquire/release
        # are memory barriers on every architecture, so a slot is never rewritten while the main process
        # may still be reading it.
        self.slots = slots
        self.free = free
        self.parent_pid = os.getpid()
        self.reader = reader
        self.plan = plan
        self.image_size = image_size
        self.on_error = on_error
        self.chunk = chunk

    def __iter__(self) -> Iterator[list[_Item]]:
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        ids, flips = self.plan.worker(worker, n_workers, self.chunk)
        items = self._produce(ids, flips, worker)
        while run := list(itertools.islice(items, self.chunk)):
            yield run

    def _slot(self, worker: int, k: int) -> tuple[int, np.ndarray]:
        """Slot of this worker's k-th image; waits until the main process has copied the image R before it."""
        assert self.slots is not None and self.free is not None
        while not self.free[worker].acquire(timeout=1.0):
            if os.getppid() != self.parent_pid:
                raise RuntimeError("the main process of this DataLoader worker has exited")
        ring = self.slots.shape[1]
        return k % ring, self.slots[worker, k % ring].numpy()

    def _produce(self, ids: np.ndarray, flips: np.ndarray, worker: int) -> Iterator[_Item]:
        used_slots = 0
        for sid, flip in zip(ids.tolist(), flips.tolist()):
            data, error = self.reader.read(sid)
            reason = "read"
            if data is not None:
                slot, out = (None, None) if self.slots is None else self._slot(worker, used_slots)
                try:
                    pixels = _decode(data, self.image_size, flip, out)
                except DecodeError as e:
                    reason, error = "decode", str(e)
                    if slot is not None:
                        self.free[worker].release()  # the slot stays unused: its permit goes back
                else:
                    if slot is not None:
                        used_slots += 1
                    yield sid, worker, pixels if slot is None else slot, None, None
                    continue
            # raised or skipped by the main process when the stream reaches it (_assemble)
            yield sid, worker, None, reason, f"{self.reader.path_of(sid)}: sample {sample_key(sid)}: {error}"


def _pass_through(item: _Item) -> _Item:
    # the DataLoader must not collate single samples; batches are assembled in the main process
    return item


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------


class ShardLoader:
    """Batches of (uint8 images [B,3,S,S], int64 sample ids [B]) for one rank of one split.

    ``len(loader)`` is the number of batches per epoch, the same on every rank. Call
    ``set_epoch(epoch)`` before each epoch (``set_epoch(epoch, start_batch=n)`` to resume at batch n:
    the pass then yields batches n..len-1, exactly those of an uninterrupted pass).

    - ``sample_ids``: sorted allowed ids of the split (e.g. the 80 % train cut); None = all.
    - ``train``: a random order of the samples every epoch + random horizontal flip; False: sample-id
      order, no flip.
    - ``num_workers``: DataLoader worker processes (0 decodes in this process); the batches do not
      depend on it.
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
        pin_memory: bool = False,
    ):
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size} and {image_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        if num_workers < 0 or seed < 0:
            raise ValueError("num_workers and seed must be >= 0")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        sel = select_split(dataset_root, split, sample_ids)
        #: which samples, in which order and batches, epoch by epoch (the DALI loader follows the same)
        self.schedule = EpochSchedule(sel, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                      train=train)
        self.num_workers = num_workers
        self.root = sel.root
        self._reader = sel.reader()
        self.split = split
        self.image_size = image_size
        self.on_error = on_error
        self.pin_memory = pin_memory
        #: skipped samples by reason ("read", "decode") and "repeated" (batches refilled), over the loader's life
        self.skipped: Counter[str] = Counter()
        #: the first SKIP_LOG_LIMIT skip messages ("<shard path>: sample <key>: <why>")
        self.skip_log: list[str] = []
        if sel.total == 0:
            raise ValueError(f"{self.root}: no samples selected from split {split!r} (empty sample_ids?)")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (sample order and flips) and the first batch the next iteration yields."""
        self.schedule.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.schedule)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (the same for every epoch)."""
        return self.schedule.num_samples

    def plan(self) -> EpochPlan:
        """The plan of the current epoch for this rank (pure: same arguments, same plan)."""
        return self.schedule.plan()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sched = self.schedule
        plan = sched.plan()
        self._reader.load(plan.ids)  # parsed here, before the workers fork, so that they inherit the indexes
        n_workers = self.num_workers
        chunk = _chunk(sched.batch_size, n_workers)
        extra = {}
        slots = free = None
        if n_workers > 0:
            # One OpenCV thread per worker: the workers are the parallelism. It is set here, before the
            # workers fork, because reconfiguring OpenCV's thread pool inside a forked child deadlocks
            # when the parent had used the pool. Side effect: OpenCV in this process stays single-threaded.
            cv2.setNumThreads(1)
            # keep about two batches in flight across the workers (a request is one chunk of samples)
            prefetch = max(2, math.ceil(2 * sched.batch_size / (n_workers * chunk)))
            extra["prefetch_factor"] = prefetch
            # a worker has about `prefetch` requests outstanding, so prefetch + 2 chunks of slots rarely make it
            # wait; at least one chunk, which the worker fills before sending it
            s, ring = self.image_size, chunk * max(1, prefetch + _RING_EXTRA)
            slots = torch.empty((n_workers, ring, 3, s, s), dtype=torch.uint8).share_memory_()
            free = [multiprocessing.Semaphore(ring) for _ in range(n_workers)]
        stream = _ShardStream(self._reader, plan, image_size=self.image_size, on_error=self.on_error, slots=slots,
                              free=free, chunk=chunk)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=n_workers,
            collate_fn=_pass_through,
            persistent_workers=False,
            pin_memory=False,  # batches are pinned after assembly, not sample by sample
            **extra,
        )
        pin = self.pin_memory and torch.cuda.is_available()
        if self.pin_memory and not pin:
            logger.warning("pin_memory=True but CUDA is not available: batches are not pinned")
            self.pin_memory = False  # say it once
        items = itertools.chain.from_iterable(loader)
        return self._batches(items, plan.batch_sizes[plan.start_batch :], pin, slots, free, extra, chunk)

    def _batches(
        self,
        items: Iterator[_Item],
        sizes: list[int],
        pin: bool,
        slots: torch.Tensor | None,
        free: list | None,
        dataloader_args: dict,
        chunk: int,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self._assemble(items, sizes, pin, slots, free)
        finally:
            if free is not None:
                # Stopped early (or done): workers may still be serving outstanding requests (at most
                # prefetch_factor * num_workers chunks in all) before the DataLoader shuts them down; unblock them.
                for sem in free:
                    for _ in range((dataloader_args["prefetch_factor"] * len(free) + 1) * chunk):
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
                    raise RuntimeError(
                        f"internal error: rank {self.schedule.rank}'s stream ended before its planned batches"
                    )
                sid, worker, payload, reason, message = item
                if isinstance(payload, np.ndarray):
                    out[len(ids)] = payload
                elif payload is not None:
                    assert slot_arrays is not None and free is not None
                    out[len(ids)] = slot_arrays[worker, payload]
                    free[worker].release()
                if payload is None:
                    if self.on_error == "raise":
                        raise SampleError(f"{message}; {FIX_DECODE if reason == 'decode' else FIX_READ}")
                    self._record_skip(reason, message)
                    continue
                ids.append(sid)
            if not ids:
                if last_good is None:
                    raise SampleError(
                        f"{self.root}: every sample of rank {self.schedule.rank}'s first batch was skipped "
                        f"({self.skip_log[-1] if self.skip_log else 'no message'}); re-run `ingest` for {self.split!r}"
                    )
                out[0] = last_good[1]
                ids = [last_good[0]]
                self.skipped["repeated"] += 1
            if self.on_error == "skip":  # a copy: the consumer may modify the batch in place
                last_good = (ids[-1], out[len(ids) - 1].copy())
            yield batch[: len(ids)], torch.tensor(ids, dtype=torch.int64)
        if next(items, None) is not None:
            raise RuntimeError(
                f"internal error: rank {self.schedule.rank}'s stream has more samples than its planned batches"
            )

    def _record_skip(self, reason: str | None, message: str | None) -> None:
        self.skipped[reason or "read"] += 1
        if len(self.skip_log) < SKIP_LOG_LIMIT:
            self.skip_log.append(message or "")
        logger.warning("skipped %s", message)
