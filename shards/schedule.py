"""What each rank reads of a split in each epoch: pure planning shared by the CPU and the DALI loader.

Every rule is a pure function below, tested over simulated layouts; ``EpochSchedule`` holds one rank's
arguments and the current epoch, and is what ``ShardLoader`` and ``DaliLoader`` both follow.

- **Selection.** ``select_split`` opens a split for a loader: the training subset is a sorted array
  of allowed sample ids (the trainer's 80/20 cut of the official train split lives in the same
  shards); every shard holding one of them must be on disk with its DALI index, which the loaders
  read the samples through (random access by offset, see ``shards.tar.ShardReader``).
- **Epoch order.** In training, the allowed samples are put in a uniformly random order drawn from
  ``(seed, epoch)`` only (``epoch_order``): one permutation of the whole selection, as the reference
  code's ``DataLoader(shuffle=True)`` draws every epoch. A batch is therefore a uniform draw of the
  selection whatever the order on disk, which follows the source (NUS-WIDE's lists are grouped by
  concept folder, OpenImages is sorted by ImageID, VOC by year); the top-k of the large-loss methods
  and BatchNorm are taken per batch. Each sample's horizontal flip is drawn from the same generator.
  In evaluation the order is the sample-id order, without flips.
- **Ranks.** Rank ``r`` of ``W`` gets the contiguous range ``[N*r//W, N*(r+1)//W)`` of that order
  (sizes differ by at most 1), so every allowed sample is yielded exactly once per epoch across ranks.
- **Batches.** Every rank yields ``num_batches(N, W, batch_size) = ceil(ceil(N/W) / batch_size)``
  batches (DDP hangs otherwise); ``batch_sizes`` splits a rank's samples into that many non-empty
  batches (a rank one sample short ends ``..., B-1, 1`` instead of with an empty batch).
- **Workers.** Position ``j`` of the rank's stream goes to the loader's worker ``j % num_workers``
  (``EpochPlan.worker``). A DataLoader over an IterableDataset returns, in order, item ``k`` of every
  still-running worker ``0..W-1`` for ``k = 0, 1, ...`` (``interleave``), so it returns the positions in
  order: a rank's stream, and so every batch, is a pure function of ``(seed, epoch, rank, world_size)``
  and does not depend on the number of workers nor on how fast each one runs.
- **Resume.** ``set_epoch(epoch, start_batch)`` plans the rest of the epoch's stream, from the first
  sample of batch ``start_batch``, and deals it to the workers as above: a resumed run yields exactly
  the batches ``start_batch..`` of an uninterrupted one.
"""
from __future__ import annotations

import os
from dataclasses import KW_ONLY, dataclass, field
from typing import Sequence

import numpy as np

from .format import FormatError, SplitInfo, read_manifest
from .tar import FIX_SHARD, ShardReader

# The first word of the SeedSequence entropy keeps the epoch-order stream apart from any other stream
# drawn from the same (seed, epoch).
_TAG_EPOCH_ORDER = 0x45504F43


# ----------------------------------------------------------------------------------------------
# Selection: which samples of which shards
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSelection:
    """What a loader reads of one split: its shards and the allowed sample ids."""

    root: str
    info: SplitInfo
    tar_paths: list[str]
    ids: np.ndarray = field(repr=False)  # allowed sample ids, sorted int64

    @property
    def total(self) -> int:
        return len(self.ids)

    def reader(self) -> ShardReader:
        """A reader of the split's samples by id (random access through the shards' DALI indexes)."""
        return ShardReader(self.tar_paths, [s.first_sample for s in self.info.shards],
                           [s.num_samples for s in self.info.shards])


def select_split(dataset_root, split: str, sample_ids=None) -> SplitSelection:
    """Open ``split`` of a dataset directory for a loader: manifest checked, ``sample_ids`` (strictly
    increasing ids of the split; None = all) validated, every shard that holds a selected sample present on
    disk with its DALI index. Shared by ShardLoader and the DALI loader, so both read the same samples."""
    root = os.fspath(dataset_root)
    manifest = read_manifest(root)
    if split not in manifest.splits:
        raise FormatError(
            f"{os.path.join(root, 'manifest.json')}: no split {split!r}; it has {sorted(manifest.splits)}"
        )
    info = manifest.splits[split]
    if sample_ids is None:
        ids = np.arange(info.num_samples, dtype=np.int64)
    else:
        ids = check_sample_ids(sample_ids, info.num_samples, split)
    paths = [os.path.join(root, split, s.file) for s in info.shards]
    firsts = np.array([s.first_sample for s in info.shards], dtype=np.int64)
    for k in np.unique(np.searchsorted(firsts, ids, side="right") - 1).tolist():
        if not os.path.isfile(paths[k]):
            raise FileNotFoundError(
                f"{paths[k]}: shard listed in the manifest is missing; re-run `ingest` for split {split!r}"
            )
        idx = paths[k][: -len(".tar")] + ".idx"
        if not os.path.isfile(idx):
            raise FormatError(f"{idx}: DALI index of {os.path.basename(paths[k])} is missing; {FIX_SHARD}")
    return SplitSelection(root, info, paths, ids)


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
# Planning: pure functions of the allowed ids and (seed, epoch, rank, world size)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """Everything one rank needs for one epoch; identical on every call with the same arguments."""

    batch_sizes: list[int]  # this rank's planned batches of the whole epoch; len() is the same on every rank
    start_batch: int  # first planned batch this plan yields
    ids: np.ndarray  # int64 sample ids the rank yields from start_batch on, in output order
    flips: np.ndarray  # bool, the horizontal flip of each

    @property
    def num_samples(self) -> int:
        """Samples of this rank in the whole epoch (start_batch ignored)."""
        return sum(self.batch_sizes)

    def worker(self, worker: int, num_workers: int, chunk: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(ids, flips) that loader worker ``worker`` of ``num_workers`` yields: positions ``worker, worker +
        num_workers, ...`` of the stream, which a DataLoader's round robin (``interleave``) puts back in order.
        With ``chunk`` > 1 the stream is dealt in runs of ``chunk`` consecutive positions (run ``worker``,
        ``worker + num_workers``, ...), each run one DataLoader item, which the round robin puts back alike."""
        if chunk == 1:
            return self.ids[worker::num_workers], self.flips[worker::num_workers]
        mine = (np.arange(len(self.ids)) // chunk) % num_workers == worker
        return self.ids[mine], self.flips[mine]

    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, flips) of each batch this plan yields (batches ``start_batch..``)."""
        bounds = np.cumsum([0] + self.batch_sizes[self.start_batch :])
        assert bounds[-1] == len(self.ids), "the plan's batch sizes must cover the rank's stream"
        return [(self.ids[a:b], self.flips[a:b]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """(order, flips) of an epoch over ``n`` selected samples: ``order`` is a uniformly random permutation
    of ``0..n-1`` drawn from ``(seed, epoch)`` only, ``flips[j]`` the horizontal flip of the sample at
    position ``j``; without ``shuffle`` (evaluation) the identity and no flips."""
    if not shuffle:
        return np.arange(n), np.zeros(n, dtype=bool)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_TAG_EPOCH_ORDER, seed, epoch])))
    order = rng.permutation(n)
    flips = rng.random(n) < 0.5
    return order, flips


def rank_bounds(n: int, part: int, parts: int) -> tuple[int, int]:
    """Contiguous range of ``part`` when ``n`` items are cut into ``parts`` (sizes differ by at most 1)."""
    return n * part // parts, n * (part + 1) // parts


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


def interleave(counts: Sequence[int]) -> list[tuple[int, int]]:
    """(worker, item index) in the order a DataLoader (``in_order=True``) yields from IterableDataset workers.

    The DataLoader sends requests to workers round robin and returns results in request order; a
    worker whose iterator is exhausted answers once with "stop" and is dropped from the cycle. So the
    output is item k of every still-running worker 0..W-1, for k = 0, 1, ... With the positions of a
    stream dealt round robin (``EpochPlan.worker``: worker w holds ceil((n - w) / W) items, non-increasing
    in w) that is position k * W + w, i.e. the stream in order.
    """
    out = []
    for k in range(max(counts, default=0)):
        out.extend((w, k) for w, c in enumerate(counts) if k < c)
    return out


def plan_epoch(
    ids: np.ndarray,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    start_batch: int = 0,
) -> EpochPlan:
    """One rank's epoch over the allowed (sorted) ``ids``: epoch order, the rank's range, batch sizes, and the
    stream from the first sample of batch ``start_batch`` on."""
    n = len(ids)
    nb = num_batches(n, world_size, batch_size)
    if not 0 <= start_batch <= nb:
        raise ValueError(f"start_batch {start_batch} is outside 0..{nb} (batches per epoch)")
    order, flips = epoch_order(n, seed, epoch, shuffle)
    lo, hi = rank_bounds(n, rank, world_size)
    sizes = batch_sizes(hi - lo, nb, batch_size)
    first = lo + sum(sizes[:start_batch])
    return EpochPlan(batch_sizes=sizes, start_batch=start_batch, ids=np.asarray(ids, dtype=np.int64)[order[first:hi]],
                     flips=flips[first:hi])


# ----------------------------------------------------------------------------------------------
# One rank's schedule
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class EpochSchedule:
    """One rank's batches of a selected split, epoch by epoch (the loaders' ``len``/``set_epoch``/``plan``).

    ``len(schedule)`` is the number of batches per epoch, the same on every rank. ``set_epoch(epoch,
    start_batch)`` selects the epoch (sample order and flips) and the first batch the next pass yields;
    ``plan()`` is that epoch's ``EpochPlan`` for this rank and ``batches()`` its (ids, flips) per batch.
    """

    selection: SplitSelection = field(repr=False)
    _: KW_ONLY
    batch_size: int
    rank: int
    world_size: int
    seed: int
    train: bool
    epoch: int = field(default=0, init=False)
    start_batch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._len = num_batches(self.selection.total, self.world_size, self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (sample order and flips) and the first batch the next iteration yields."""
        if epoch < 0 or not 0 <= start_batch <= self._len:
            raise ValueError(f"epoch must be >= 0 and start_batch in 0..{self._len}, got {epoch}, {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self._len

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (the same for every epoch)."""
        lo, hi = rank_bounds(self.selection.total, self.rank, self.world_size)
        return hi - lo

    def plan(self) -> EpochPlan:
        """The plan of the current epoch for this rank (pure: same arguments, same plan)."""
        return plan_epoch(
            self.selection.ids,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.train,
            start_batch=self.start_batch,
        )

    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, flips) of each batch this rank yields in the current epoch (from ``start_batch``)."""
        return self.plan().batches()
