"""The state some methods keep beyond a mini-batch: ROLE's label estimates and EM+APL's pseudo-labels.

Both are dense tables of [training images x classes], one row per training id in the run's sorted
``train_ids``, held in the memory of every process: ``check_state_size`` refuses a run whose table has more
than ``max_state_entries`` entries (ROLE at OpenImages scale, 3.4M x 5,000, would be 17 billion entries).
Neither is a memory-mapped file: ROLE's estimates are parameters that the optimiser moves every step, all
of them (Adam's moments keep moving an entry after its image has left the batch, as in the authors' code),
and float16 cannot even hold those updates (a step of 1e-4 is below float16's resolution at a logit of 2).

- ``RoleState`` (Cole et al., CVPR 2021): a learnable logit per (image, class), initialised as in the
  authors' code (observed positives logit(0.995), observed negatives logit(0.005), unobserved entries
  uniform in +-logit(0.6), drawn from a generator seeded with the run's seed, so every rank builds the same
  table). ``module`` is a ``torch.nn.Module`` that the loop prepares with the model: DDP all-reduces its
  gradients as the model's, the run's optimiser trains it (parameter group ``role_estimates``, at the head's
  learning rate x ``role_lr_mult``, no weight decay), and Accelerate's checkpoints save it with its optimiser
  state, so a resumed run continues exactly.
- ``AplState`` (Zhou et al., ECCV 2022): a soft negative label per (image, class), NaN where there is none.
  At the end of every epoch t with ``apl_warmup <= t < epochs`` (the authors' script also labels after the
  last epoch, which changes nothing) the model scores the training images and ``apl_select`` labels, per
  class, the ``apl_quota`` unobserved entries without a label that have the lowest scores, each with its
  score as soft label. The scores come from ``train/evaluate.py``'s ``predict``, gathered from all ranks, so
  every rank computes the same table; it is registered for Accelerate's checkpoints (saved by the main
  process, loaded by every rank).

The loop asks a state for the extra loss inputs of a batch (``loss_inputs``: keyword arguments of
``compute_loss``) and calls ``end_epoch`` after each epoch's training.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .config import Config, ConfigError

#: methods whose state lives here
STATE_METHODS = ("role", "em_apl")
#: bytes per entry, for the size error: ROLE's float32 logit, its gradient and Adam's two moments; APL's float32
BYTES_PER_ENTRY = {"role": 16, "em_apl": 4}


def check_state_size(cfg: Config, num_train: int, num_classes: int) -> None:
    """Refuse, before anything is written, a run whose method would keep a table larger than
    ``max_state_entries``."""
    method = cfg.loss.method
    if method not in STATE_METHODS:
        return
    entries = num_train * num_classes
    if entries > cfg.max_state_entries:
        gib = entries * BYTES_PER_ENTRY[method] / 2**30
        what = "a label estimate" if method == "role" else "a pseudo-label"
        raise ConfigError(
            f"config: method {method} keeps {what} per (training image, class) in the memory of every process: "
            f"{num_train:,} x {num_classes:,} = {entries:,} entries ({gib:,.1f} GiB), more than max_state_entries = "
            f"{cfg.max_state_entries:,}. It is a method for datasets of this size or less; raise max_state_entries "
            "if the memory is there, or choose another method")


def training_rows(train_ids: np.ndarray, sample_ids: np.ndarray) -> np.ndarray:
    """Rows of ``sample_ids`` in the tables (positions in the sorted ``train_ids``); an id outside them is an
    error."""
    rows = np.searchsorted(train_ids, sample_ids)
    if (rows >= len(train_ids)).any() or not np.array_equal(train_ids[np.minimum(rows, len(train_ids) - 1)],
                                                           sample_ids):
        raise ValueError("a training batch holds sample ids outside the run's training ids")
    return rows


# ------------------------------------------------------------------------------------------------ ROLE


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def role_initial_logits(positive: torch.Tensor, negative: torch.Tensor, seed: int) -> torch.Tensor:
    """Cole et al.'s initial estimator logits, float32 [N, K]: logit(0.995) at observed positives, logit(0.005)
    at observed negatives, uniform in [-logit(0.6), logit(0.6)) elsewhere (``torch.rand`` of a generator
    seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    q = _logit(0.6)
    logits = q * (2 * torch.rand(positive.shape, generator=gen) - 1)
    logits[positive] = _logit(0.995)
    logits[negative] = _logit(0.005)
    return logits


class LabelEstimator(torch.nn.Module):
    """The estimates as one parameter; ``forward(rows)`` gives their probabilities for the batch's rows."""

    def __init__(self, initial_logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(initial_logits)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits[rows])


class RoleState:
    def __init__(self, cfg: Config, train_ids: np.ndarray, target: torch.Tensor, unknown: torch.Tensor):
        """``target``/``unknown``: the training rows' AN target and unknown mask (``LabelStore.targets``)."""
        self.train_ids = train_ids
        positive = ~unknown & (target > 0.5)
        self.module = LabelEstimator(role_initial_logits(positive, ~unknown & ~positive, cfg.seed))
        self.lr = cfg.lr * cfg.head_lr_mult * cfg.role_lr_mult

    def param_groups(self) -> list[dict]:
        return [{"params": [self.module.logits], "lr": self.lr, "weight_decay": 0.0, "name": "role_estimates"}]

    def loss_inputs(self, sample_ids: np.ndarray, device) -> dict:
        # non_blocking: the step does not wait for the device (train/loop.py train_step)
        rows = torch.from_numpy(training_rows(self.train_ids, sample_ids)).to(device, non_blocking=True)
        return {"estimates": self.module(rows)}

    def end_epoch(self, epoch: int, predict: Callable) -> str | None:
        return None


# ------------------------------------------------------------------------------------------------- APL


def apl_quota(unknown_per_class: np.ndarray, neg_proportion: float, epochs: int, warmup: int) -> np.ndarray:
    """Entries per class labelled at each pseudo-labelling step: ``int(neg_proportion * U_c / (epochs -
    warmup))``, U_c the class's unobserved entries at the start (the authors' float arithmetic, truncated)."""
    return (neg_proportion * np.asarray(unknown_per_class, dtype=np.float64) / (epochs - warmup)).astype(np.int64)


def apl_select(scores: np.ndarray, eligible: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Bool [N, K]: per class c, the ``quota[c]`` eligible entries with the lowest scores (all of them when
    fewer are eligible); ties go to the lower row."""
    chosen = np.zeros(eligible.shape, dtype=bool)
    for c in range(eligible.shape[1]):
        rows = np.flatnonzero(eligible[:, c])
        order = np.argsort(scores[rows, c], kind="stable")
        chosen[rows[order[:quota[c]]], c] = True
    return chosen


class AplState:
    def __init__(self, cfg: Config, train_ids: np.ndarray, unknown: torch.Tensor):
        """``unknown``: the training rows' unknown mask (``LabelStore.targets``)."""
        loss = cfg.loss
        self.train_ids, self.unknown = train_ids, unknown.numpy().copy()
        self.first, self.last = loss.apl_warmup, cfg.epochs - 1
        self.quota = apl_quota(self.unknown.sum(axis=0), loss.apl_neg_proportion, cfg.epochs, loss.apl_warmup)
        self.table = torch.full(unknown.shape, math.nan, dtype=torch.float32)
        self.module = None

    def param_groups(self) -> list[dict]:
        return []

    def loss_inputs(self, sample_ids: np.ndarray, device) -> dict:
        return {"pseudo": self.table[training_rows(self.train_ids, sample_ids)].to(device, non_blocking=True)}

    def end_epoch(self, epoch: int, predict: Callable) -> str | None:
        """After ``epoch``'s training: pseudo-label with ``predict()`` -> (sample ids, scores [N, K]) of the
        training ids (collective: call on every rank). Returns a line for the log."""
        if not self.first <= epoch <= self.last:
            return None
        ids, scores = predict()
        if not np.array_equal(ids, self.train_ids):
            raise RuntimeError("APL: the predictions do not cover the training ids")
        labelled = ~torch.isnan(self.table).numpy()
        chosen = apl_select(scores, self.unknown & ~labelled, self.quota)
        self.table[torch.from_numpy(chosen)] = torch.from_numpy(scores[chosen].astype(np.float32))
        return (f"APL after epoch {epoch}: {int(chosen.sum()):,} entries pseudo-labelled negative, "
                f"{int(labelled.sum() + chosen.sum()):,} in all")

    def state_dict(self) -> dict:
        return {"table": self.table.clone()}

    def load_state_dict(self, state: dict) -> None:
        table = state["table"]
        if tuple(table.shape) != tuple(self.table.shape):
            raise ValueError(f"APL checkpoint holds a {tuple(table.shape)} table; this run needs "
                             f"{tuple(self.table.shape)}")
        self.table = table.to(torch.float32).clone()


def method_state(cfg: Config, store, train_ids: np.ndarray) -> RoleState | AplState | None:
    """The state of ``cfg``'s method (None for the methods without), built from the training labels in
    ``store`` (a LabelStore over the training cut)."""
    if cfg.loss.method not in STATE_METHODS:
        return None
    target, unknown = store.targets(train_ids)
    if cfg.loss.method == "role":
        return RoleState(cfg, train_ids, target, unknown)
    return AplState(cfg, train_ids, unknown)
