"""The end-to-end source of the training loop: a MultiLabelNet (train/model.py) on images decoded from the shards.

``ImageSource`` gives ``train/loop.py`` what it trains on (see ``loop.Source``): the Accelerator and the
process's runtime settings, the model and its parameter groups (the head at ``lr * head_lr_mult``), the
LinearInit schedule, and the loaders (DALI on a GPU that has it, else the CPU ShardLoader), sharded over
the processes.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .config import Config
from .loop import make_accelerator
from .model import build_model, param_groups, resolve_weights_file


def set_cpu_threads(cfg: Config, accelerator) -> None:
    """On CPU, leave the loader workers their cores: oversubscribed OpenMP threads spin against the workers."""
    if accelerator.device.type != "cpu":
        return
    n = cfg.cpu_threads
    if n <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // accelerator.num_processes - cfg.num_workers)
    torch.set_num_threads(n)


def build_loader(cfg: Config, accelerator, split: str, sample_ids: np.ndarray | None, train: bool):
    from ..shards.loader import ShardLoader

    kind = cfg.loader
    if kind in ("auto", "dali"):
        from ..shards import dali as dali_loader

        if kind == "dali" or dali_loader.available(accelerator.device):
            return dali_loader.DaliLoader(  # the same batches as the CPU loader would give
                cfg.data, split, sample_ids=sample_ids,
                batch_size=cfg.batch_size if train else cfg.eval_batch_size,
                image_size=cfg.image_size, train=train, rank=accelerator.process_index,
                world_size=accelerator.num_processes, seed=cfg.seed, device=accelerator.device,
                on_error=cfg.on_error,
            )
    return ShardLoader(
        cfg.data, split, sample_ids=sample_ids,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        image_size=cfg.image_size, train=train, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=cfg.num_workers, seed=cfg.seed, on_error=cfg.on_error,
    )


class ImageSource:
    """Images end to end; ``train/main.py``'s trainer."""

    log_prefix = "[largeloss]"
    result_extra: dict = {}

    def __init__(self, cfg: Config, ds):
        resolve_weights_file(cfg.arch, cfg.weights)  # a missing weight file fails before the run directory exists
        self.cfg = cfg

    def accelerator(self):
        cfg = self.cfg
        # LinearInit runs the frozen backbone without gradient: DDP must tolerate parameters without grads
        accelerator = make_accelerator(cfg, find_unused_parameters=cfg.linear_init_epochs > 0)
        set_cpu_threads(cfg, accelerator)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        return accelerator

    def model(self, num_classes: int):
        model = build_model(self.cfg.arch, num_classes, self.cfg.weights, self.cfg.boost_alpha)
        return model, param_groups(model, self.cfg.lr, self.cfg.head_lr_mult, self.cfg.weight_decay)

    def frozen_backbone(self, epoch: int) -> bool:
        return epoch <= self.cfg.linear_init_epochs

    def train_loader(self, accelerator, sample_ids: np.ndarray):
        return build_loader(self.cfg, accelerator, self.cfg.train_split, sample_ids, train=True)

    def eval_loader(self, accelerator, split: str, sample_ids: np.ndarray | None):
        return build_loader(self.cfg, accelerator, split, sample_ids, train=False)

    def memo_loader(self, sample_ids: np.ndarray):
        """The memorisation tracker's images, scored by the main process alone (no sharding, no DALI)."""
        from ..shards.loader import ShardLoader

        cfg = self.cfg
        return ShardLoader(cfg.data, cfg.train_split, sample_ids=sample_ids, batch_size=cfg.eval_batch_size,
                           image_size=cfg.image_size, train=False, num_workers=cfg.num_workers, on_error=cfg.on_error)

    def write_run_files(self, run) -> None:
        pass
