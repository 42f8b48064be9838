"""LabelStore: the labels a training run sees of one split, and its persistent LL-Cp corrections.

Labels are looked up by sample id, with the protocol applied (``shards.protocols``). ``targets(ids)``
builds the assume-negative target and the unknown mask densely for the batch only; the whole label
matrix stays sparse (memory-mapped CSR, see ``shards.labels``). Truth is read only through
``truth_for_analysis`` (analysis code, never the loss).

The LL-Cp corrections (the on-disk logs and generations, and the epoch protocol the trainer follows)
are ``shards.corrections.Corrections``; a LabelStore holds one and exposes its operations under the
names the trainer uses (``append_corrections``, ``flush_corrections``, ``merge_corrections``,
``use_generation`` ...). ``targets`` applies the generation in use. A LabelStore is not thread-safe and
holds open files: make one per process.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .corrections import Corrections
from .format import UNLISTED_NEGATIVE
from .labels import SparseLabels, as_sample_ids, gather_rows, read_labels
from .protocols import DEFAULT_SEED, FULL, observe, parse_protocol


class LabelStore:
    """Observed labels (protocol applied) of one split file, and its LL-Cp corrections.

    ``subset_ids`` (e.g. the train part of ``protocols.train_val_split``) names the samples this store
    serves: ``sample_ids``, ``known_per_class`` and the corrections (only those samples may be
    corrected) use it. It restricts nothing in ``targets``: the protocol is applied to every row of the
    file before the cut (as Cole et al. do), so a sample's labels are the same in any subset, and any
    sample id of the file can be looked up.
    """

    def __init__(
        self,
        labels_path: str | os.PathLike,
        num_classes: int,
        protocol: str = FULL,
        *,
        seed: int = DEFAULT_SEED,
        subset_ids=None,
        corrections_dir: str | os.PathLike | None = None,
        rank: int = 0,
    ) -> None:
        self.path = Path(labels_path)
        self.protocol = parse_protocol(protocol)
        self.seed = int(seed)
        self._truth: SparseLabels = read_labels(self.path, num_classes)
        self._observed: SparseLabels = observe(self._truth, self.protocol, self.seed)
        self.num_samples = self._truth.num_samples
        self.num_classes = self._truth.num_classes
        self._where = str(self.path)
        if subset_ids is None:
            self.sample_ids = np.arange(self.num_samples, dtype=np.int64)
            self._in_subset = None
        else:
            ids = np.sort(as_sample_ids(subset_ids, self.num_samples, f"{self._where} subset_ids"))
            if len(ids) > 1 and not (ids[1:] != ids[:-1]).all():
                raise ValueError(f"{self._where}: subset_ids holds duplicate sample ids")
            self.sample_ids = ids
            self._in_subset = np.zeros(self.num_samples, dtype=bool)
            self._in_subset[ids] = True
        self.corrections_dir = None if corrections_dir is None else Path(corrections_dir)
        if self.corrections_dir is not None:
            self.corrections_dir.mkdir(parents=True, exist_ok=True)
        self.rank = int(rank)
        self._corrections = Corrections(
            self.corrections_dir, self._observed, where=self._where, protocol=str(self.protocol), seed=self.seed,
            in_subset=self._in_subset, rank=self.rank,
        )

    # ------------------------------------------------------------------ labels

    @property
    def unlisted(self) -> str:
        """What an entry that is neither observed positive nor observed negative is: negative or unknown."""
        return self._observed.unlisted

    @property
    def generation(self) -> int:
        """The corrections generation in use (-1: none). Save it in checkpoints."""
        return self._corrections.generation

    @property
    def num_corrections(self) -> int:
        return self._corrections.count

    def targets(self, sample_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(target float32 [B, K], unknown bool [B, K]) for a batch of sample ids.

        target: 1 for observed positives and corrected entries (generation in use), 0 elsewhere
        (assume-negative). unknown: entries neither observed (positive or negative) nor corrected;
        all False when the protocol leaves nothing unknown.
        """
        ids = as_sample_ids(sample_ids, self.num_samples, self._where)
        b, k = len(ids), self.num_classes
        obs = self._observed
        # numpy buffers filled explicitly (not torch.zeros, ~10x slower here: fresh pages per call; not
        # calloc, whose lazily zeroed pages would move the cost to the first reader)
        t = np.empty(b * k, dtype=np.float32)
        t.fill(0.0)
        rows, cols = gather_rows(obs.pos_offsets, obs.pos_values, ids)
        pos_flat = rows * k + cols
        t[pos_flat] = 1.0
        corr_flat = None
        corr = self._corrections.csr()
        if corr is not None:
            rows, cols = gather_rows(*corr, ids)
            corr_flat = rows * k + cols
            t[corr_flat] = 1.0
        u = np.empty(b * k, dtype=bool)
        if obs.unlisted == UNLISTED_NEGATIVE:
            u.fill(False)
            return torch.from_numpy(t.reshape(b, k)), torch.from_numpy(u.reshape(b, k))
        u.fill(True)
        u[pos_flat] = False
        rows, cols = gather_rows(obs.neg_offsets, obs.neg_values, ids)
        u[rows * k + cols] = False
        if corr_flat is not None:
            u[corr_flat] = False
        return torch.from_numpy(t.reshape(b, k)), torch.from_numpy(u.reshape(b, k))

    def known_entries(self, sample_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The observed (known) entries of a set of samples, sparse: (rows into ``sample_ids``, class ids,
        is_positive). For sparse evaluation where most entries are unknown (OpenImages); corrections are not
        labels and are not included."""
        ids = as_sample_ids(sample_ids, self.num_samples, self._where)
        obs = self._observed
        pr, pc = gather_rows(obs.pos_offsets, obs.pos_values, ids)
        nr, nc = gather_rows(obs.neg_offsets, obs.neg_values, ids)
        rows = np.concatenate((pr, nr)).astype(np.int64)
        cols = np.concatenate((pc, nc)).astype(np.int64)
        is_pos = np.zeros(len(rows), dtype=bool)
        is_pos[: len(pr)] = True
        return rows, cols, is_pos

    def truth_for_analysis(self, sample_ids) -> np.ndarray:
        """ANALYSIS ONLY (memorisation, precision of correction): truth labels int8 [B, K], +1 / -1 / 0.

        Training truth must never reach the loss; training reads ``targets``.
        """
        return self._truth.dense(sample_ids)

    def known_per_class(self) -> np.ndarray:
        """int64 [K]: per class, the number of samples of ``sample_ids`` whose observed label is known.

        Observed positives and negatives (every entry when unlisted = negative); corrections excluded.
        Used to sort classes into the G1..G5 groups.
        """
        return self._observed.known_per_class(None if self._in_subset is None else self.sample_ids)

    # ------------------------------------------------------------- corrections (see shards.corrections)

    def append_corrections(self, epoch: int, sample_ids, class_ids) -> None:
        """Log corrections made in ``epoch`` by this rank (``Corrections.append``)."""
        self._corrections.append(epoch, sample_ids, class_ids)

    def append_correction_mask(self, epoch: int, sample_ids, mask) -> None:
        """``append_corrections`` from a bool [B, K] mask of the batch ``sample_ids`` (``Corrections.append_mask``)."""
        self._corrections.append_mask(epoch, sample_ids, mask)

    def flush_corrections(self, epoch: int | None = None) -> None:
        """Write and fsync this rank's log; with ``epoch``, create it if empty (``Corrections.flush``)."""
        self._corrections.flush(epoch)

    def merge_corrections(self, epoch: int, world_size: int) -> int:
        """ONE process: merge every rank's log of ``epoch``; returns the generation (``Corrections.merge``)."""
        return self._corrections.merge(epoch, world_size)

    def use_generation(self, generation: int) -> None:
        """Apply generation ``generation`` (-1: none) from now on (``Corrections.use``)."""
        self._corrections.use(generation)

    def remove_generations(self, keep) -> list[str]:
        """Delete the generations not in ``keep`` and the logs merged into a kept one (``Corrections``)."""
        return self._corrections.remove_generations(keep)

    def discard_logs_after(self, epoch: int) -> list[str]:
        """On resume after ``epoch``: delete every rank's logs of later epochs (``Corrections``)."""
        return self._corrections.discard_logs_after(epoch)

    def corrections_for_analysis(self, sample_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Corrections in use as (sample int64, class int64), sorted (``Corrections.for_analysis``)."""
        return self._corrections.for_analysis(sample_ids)

    def close(self) -> None:
        """Flush and close this rank's log."""
        self._corrections.close()

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LabelStore({self._where!r}, samples={self.num_samples}, classes={self.num_classes}, "
            f"protocol={str(self.protocol)!r}, subset={len(self.sample_ids)}, generation={self.generation})"
        )
