"""Test-only hooks of the trainer, kept out of the loop body: fault injection and debug dumps.

- ``fault_point(where)``: ``LARGELOSS_KILL_AT=<where>`` kills this process with SIGKILL when it reaches that
  point ("step:2:3" = epoch 2 before step 3, "merge:2" = before the LL-Cp merge of epoch 2,
  "checkpoint:2" = inside the checkpoint write of epoch 2). Unset in normal use.
- ``fault_error(where, path)``: ``LARGELOSS_FAIL_AT=<where>`` raises a full disk's OSError (ENOSPC) naming
  ``path`` there instead: the error path of a write, where a kill tests the crash path.
- ``Hooks`` with ``debug_dump=true``: every rank writes, per epoch, the sample ids it trained on, the LL-Cp
  corrections it proposed and its weights to ``<run>/debug/eNNNN-rR.npz``, so a test can check exact-once
  coverage, that the merge lost no correction, and identical replicas across ranks.
"""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import numpy as np
import torch


def fault_point(where: str) -> None:
    if os.environ.get("LARGELOSS_KILL_AT") == where:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_error(where: str, path: Path) -> None:
    if os.environ.get("LARGELOSS_FAIL_AT") == where:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class Hooks:
    """The loop calls these at fixed points; they do nothing unless a test asked for them."""

    def __init__(self, debug_dir: Path | None, accelerator):
        self.debug_dir = debug_dir  # None: no debug dump
        self.accelerator = accelerator
        self._ids: list[np.ndarray] = []
        self._corrections: list[np.ndarray] = []

    def step(self, epoch: int, step: int, ids: torch.Tensor) -> None:
        fault_point(f"step:{epoch}:{step}")
        if self.debug_dir is not None:
            self._ids.append(ids.numpy().copy())

    def corrections(self, sample_ids: np.ndarray, class_ids: np.ndarray) -> None:
        if self.debug_dir is not None:
            self._corrections.append(np.stack([sample_ids, class_ids], axis=1))

    def end_epoch(self, epoch: int, model) -> None:
        if self.debug_dir is None:
            return
        net = self.accelerator.unwrap_model(model)
        weights = torch.cat([p.detach().double().flatten().cpu() for p in net.parameters()]).numpy()
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, dtype=np.int64)
        corrections = np.concatenate(self._corrections) if self._corrections else np.zeros((0, 2), dtype=np.int64)
        self.debug_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.debug_dir / f"e{epoch:04d}-r{self.accelerator.process_index}.npz", ids=ids, weights=weights,
                 corrections=corrections)
        self._ids, self._corrections = [], []
