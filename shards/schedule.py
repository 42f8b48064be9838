"""What each rank reads of a split in each epoch: pure planning shared by the CPU and the DALI loader.

Every rule is a pure function below, tested over simulated layouts; ``EpochSchedule`` holds one rank's
arguments and the current epoch, and is what ``ShardLoader`` and ``DaliLoader`` both follow.

- **Selection.** ``select_split`` opens a split for a loader: the training subset is a sorted array
  of allowed sample ids (the trainer's 80/20 cut of the official train split lives in the same
  shards), distributed over the shards (``split_by_shard``).
- **Epoch order.** In training the shard order is a permutation drawn from ``(seed, epoch)`` only; in
  evaluation it is the manifest order. Concatenating the allowed samples of the shards in that order,
  rank ``r`` of ``W`` gets the contiguous range ``[N*r//W, N*(r+1)//W)`` (sizes differ by at most 1),
  cut into pieces ``(shard, sample ids)``.
- **Workers.** Inside a rank, the loader's workers get contiguous near-equal ranges of the rank's
  samples in the same way; each reads its pieces sequentially and yields single samples, and batches
  are assembled from the interleaved stream, so the batch count and batch composition do not depend
  on how fast each worker runs.
- **Sample shuffle.** Training only: a per-worker window shuffle seeded from
  ``(seed, epoch, rank, worker)``: output order = ``argsort(position + U[0,1) * window)``. Each sample
  moves by less than ``window`` positions and a worker holds at most ``window`` encoded samples.
  The horizontal flip of each output is drawn from the same generator.
- **Batches.** Every rank yields ``num_batches(N, W, batch_size) = ceil(ceil(N/W) / batch_size)``
  batches (DDP hangs otherwise); ``batch_sizes`` splits a rank's samples into that many non-empty
  batches (a rank one sample short ends ``..., B-1, 1`` instead of with an empty batch).
- **Order across workers.** A DataLoader over an IterableDataset returns, in order, item ``k`` of every
  still-running worker ``0..W-1`` for ``k = 0, 1, ...`` (``interleave``). So a rank's whole stream is
  a pure function of ``(seed, epoch, rank, world_size, num_workers)`` (``rank_stream`` computes it),
  and a resumed run can restart it at the exact next batch: ``resume_point`` gives how many outputs
  each worker drops and which worker the DataLoader's round robin must start from (physical worker
  ``p`` plays logical worker ``(p + rotation) % num_workers``).
- **Evaluation** (``train=False``): manifest shard order, no shuffle, no flip; every allowed sample is
  yielded exactly once across ranks and workers.
"""
from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Sequence

import numpy as np

from .format import FormatError, SplitInfo, read_manifest

# Distinct first words of the SeedSequence entropy keep the shard-order stream and the per-worker
# streams independent even when (seed, epoch, ...) coincide.
_TAG_SHARD_ORDER = 0x53484F52
_TAG_WORKER = 0x574F524B


# ----------------------------------------------------------------------------------------------
# Selection: which samples of which shards
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSelection:
    """What a loader reads of one split: its shards and the allowed sample ids of each."""

    root: str
    info: SplitInfo
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
        raise FormatError(
            f"{os.path.join(root, 'manifest.json')}: no split {split!r}; it has {sorted(manifest.splits)}"
        )
    info = manifest.splits[split]
    ids = None if sample_ids is None else check_sample_ids(sample_ids, info.num_samples, split)
    per_shard = split_by_shard([(s.first_sample, s.num_samples) for s in info.shards], ids)
    paths = [os.path.join(root, split, s.file) for s in info.shards]
    for path, allowed in zip(paths, per_shard):
        if len(allowed) and not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: shard listed in the manifest is missing; re-run `ingest` for split {split!r}"
            )
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

    ``sample_ids`` must be sorted, unique, inside the split: the caller validates (``select_split`` does).
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


def interleave_order(counts: Sequence[int]) -> np.ndarray:
    """Vectorised ``interleave``: positions in the concatenation of the workers' items.

    The DataLoader yields item k of every still-running worker 0..W-1 for k = 0, 1, ...; that is the
    items sorted by (k, worker). Returns indices into ``concatenate(items of worker 0, 1, ...)``.
    """
    w_count = len(counts)
    if w_count == 0:
        return np.zeros(0, dtype=np.int64)
    keys = np.concatenate([np.arange(c, dtype=np.int64) * w_count + w for w, c in enumerate(counts)])
    return np.argsort(keys, kind="stable")


def rank_stream(
    plan: EpochPlan, *, train: bool, window: float, seed: int, epoch: int, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids int64, flips bool) of one rank in ``ShardLoader``'s output order, from ``plan.start_batch``.

    Mirrors ``ShardLoader``: logical worker w reads its pieces in order, emits them in ``worker_order``
    (output position j carries ``flips[j]``) after dropping its first ``plan.skips[w]`` outputs;
    physical DataLoader worker p plays logical worker ``(p + plan.rotation) % W``; the DataLoader
    interleaves the physical workers round robin.
    """
    n_workers = len(plan.workers)
    per_logical: list[tuple[np.ndarray, np.ndarray]] = []
    for logical, pieces in enumerate(plan.workers):
        ids = np.concatenate([p.ids for p in pieces]).astype(np.int64) if pieces else np.zeros(0, np.int64)
        order, flips = worker_order(
            len(ids), train=train, window=window, seed=seed, epoch=epoch, rank=rank, worker=logical
        )
        skip = plan.skips[logical]
        per_logical.append((ids[order[skip:]], np.asarray(flips[skip:], dtype=bool)))
    physical = [per_logical[(p + plan.rotation) % n_workers] for p in range(n_workers)]
    take = interleave_order([len(ids) for ids, _ in physical])
    all_ids = np.concatenate([ids for ids, _ in physical]) if physical else np.zeros(0, np.int64)
    all_flips = np.concatenate([f for _, f in physical]) if physical else np.zeros(0, bool)
    return all_ids[take], all_flips[take]


# ----------------------------------------------------------------------------------------------
# One rank's schedule
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class EpochSchedule:
    """One rank's batches of a selected split, epoch by epoch (the loaders' ``len``/``set_epoch``/``plan``).

    ``len(schedule)`` is the number of batches per epoch, the same on every rank. ``set_epoch(epoch,
    start_batch)`` selects the epoch (shard and sample order) and the first batch the next pass yields;
    ``plan()`` is that epoch's ``EpochPlan`` for this rank and ``batches()`` its (ids, flips) per batch.
    ``num_workers`` is the number of logical workers the stream is planned for (0 plans one), ``window``
    the sample-shuffle window; the stream, and so every batch, depends on both.
    """

    selection: SplitSelection = field(repr=False)
    _: KW_ONLY
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    train: bool
    window: float
    epoch: int = field(default=0, init=False)
    start_batch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._len = num_batches(self.selection.total, self.world_size, self.batch_size)

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
            self.selection.per_shard,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.train,
            start_batch=self.start_batch,
        )

    def order_args(self) -> dict[str, Any]:
        """``worker_order``'s arguments for this rank and the current epoch (all but ``n`` and ``worker``)."""
        return {"train": self.train, "window": self.window, "seed": self.seed, "epoch": self.epoch, "rank": self.rank}

    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, flips) of each batch this rank yields in the current epoch (from ``start_batch``)."""
        plan = self.plan()
        ids, flips = rank_stream(plan, **self.order_args())
        sizes = plan.batch_sizes[plan.start_batch :]
        bounds = np.cumsum([0] + sizes)
        assert bounds[-1] == len(ids), "the plan's batch sizes must cover the rank's stream"
        return [(ids[a:b], flips[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
