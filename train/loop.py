"""The training loop of both trainers: one readable function, Accelerate for everything distributed.

Per epoch: train on the 80 % cut of the official train split with the protocol's observed labels
(plus LL-Cp corrections), validate on the held-out 20 % (clean labels by default), keep the best
weights, stop early when validation mAP falls ``early_stop_drop`` points below the best; then test once
with the best weights. LL-Cp corrections found in epoch t are merged into a new label generation at the
end of epoch t and used from epoch t+1 (the paper's semantics). A run killed at any point resumes
exactly from its last checkpoint (``resume=RUN_DIR``).

What is trained is a ``Source``: images end to end (train/images.py, ``train/main.py``) or a linear head
on cached backbone features (train/features.py). A source gives the Accelerator, the model and its
parameter groups, and the batches as ``(inputs, sample ids)``; the rest is this module's: label stores,
losses, LL-Cp generations, analyses, checkpoints and the run directory (eval/rundir.py).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..eval import metrics
from ..eval.analysis import MemorizationTracker, PrecisionTracker, predict_logits
from ..eval.rundir import RunDir, RunDirError, default_name, method_id
from ..shards import protocols
from ..shards.format import MANIFEST_NAME, UNLISTED_NEGATIVE, UNLISTED_UNKNOWN
from ..shards.labelstore import LabelStore
from ..shards.progress import progress_bar
from ..shards.reader import Dataset, open_dataset
from . import checkpoint as ckpt
from .config import Config, ConfigError, to_dict
from .evaluate import evaluate, predict
from .hooks import Hooks, fault_point
from .losses import TOPK_METHODS, compute_loss, raise_problems
from .methods import check_state_size, method_state


class Source(Protocol):
    """What the loop trains on (train/images.py, train/features.py)."""

    log_prefix: str  # of the log lines
    result_extra: dict  # added to result.json

    def accelerator(self): ...  # the Accelerator, with the process's runtime settings applied
    def model(self, num_classes: int) -> tuple[torch.nn.Module, list[dict]]: ...  # and its parameter groups
    def frozen_backbone(self, epoch: int) -> bool: ...  # passed to model(inputs, frozen_backbone=...)
    def train_loader(self, accelerator, sample_ids: np.ndarray): ...  # set_epoch, len, (inputs, ids) batches
    def eval_loader(self, accelerator, split: str, sample_ids: np.ndarray | None): ...  # None: the whole split
    def memo_loader(self, sample_ids: np.ndarray): ...  # for the main process alone
    def write_run_files(self, run: RunDir) -> None: ...  # the source's own files in the run directory


def run(cfg: Config, make_source: Callable[[Config, Dataset], Source]) -> dict[str, Any]:
    """Train, validate and test under ``cfg`` on the source ``make_source(cfg, dataset)``; returns result.json's
    content. The run directory is locked while this runs (``open_run_dir``)."""
    with contextlib.ExitStack() as cleanup:
        return _run(cfg, make_source, cleanup)


def _run(cfg: Config, make_source: Callable[[Config, Dataset], Source], cleanup: contextlib.ExitStack):
    # everything that can be checked is checked before the run directory is created or locked, so that a
    # failed start leaves nothing behind and the corrected command is not refused
    ds = open_dataset(cfg.data, verify=cfg.verify, progress=cfg.progress)
    check_splits(ds, cfg)
    train_ids, val_ids = split_train_val(ds.num_samples(cfg.train_split), cfg)
    source = make_source(cfg, ds)  # checks its inputs (weights, feature files) before the run directory exists
    check_state_size(cfg, len(train_ids), ds.num_classes)
    accelerator = source.accelerator()
    main = accelerator.is_main_process
    log = (lambda msg: print(f"{source.log_prefix} {msg}", flush=True)) if main else (lambda msg: None)
    dataset_name = cfg.dataset or ds.manifest.dataset
    method = cfg.loss.method
    # ---- model: same seed on every rank before building it (a weights file that does not fit fails here) ----
    seed_everything(cfg.seed)
    model, groups = source.model(ds.num_classes)
    if cfg.channels_last:  # the images follow (MultiLabelNet.features)
        model = model.to(memory_format=torch.channels_last)
    rundir, latest = open_run_dir(cfg, dataset_name, accelerator, cleanup)
    resume_state = None if latest is None else ckpt.read_state(latest)
    if main:
        source.write_run_files(rundir)

    # ---- labels; the analyses (eval/analysis.py) are made before any use_generation ----
    stores = label_stores(ds, cfg, train_ids, val_ids, rundir.labels, accelerator.process_index)
    precision = PrecisionTracker(stores.train) if cfg.analysis_entries > 0 else None
    memo = memo_loader = None
    if cfg.analysis_entries > 0 and main:
        memo = MemorizationTracker(stores.train, train_ids, cfg.analysis_entries, cfg.seed, rundir.analysis,
                                   resume_after_epoch=None if resume_state is None else resume_state["epoch"])
        memo_loader = source.memo_loader(memo.image_ids)

    # ROLE's estimates / EM+APL's pseudo-labels (train/methods.py): ROLE's are trained with the model
    extra = method_state(cfg, stores.train, train_ids)
    if extra is not None and extra.module is not None:
        model, extra.module, optimizer = accelerator.prepare(
            model, extra.module, make_optimizer(cfg, groups + extra.param_groups()))
    else:
        model, optimizer = accelerator.prepare(model, make_optimizer(cfg, groups))
    if extra is not None and extra.module is None:
        accelerator.register_for_checkpointing(extra)
    seed_everything(cfg.seed * 1000 + accelerator.process_index)
    train_loader = source.train_loader(accelerator, train_ids)
    val_loader = source.eval_loader(accelerator, cfg.train_split, val_ids)
    test_loader = source.eval_loader(accelerator, cfg.test_split, None)
    log(f"{dataset_name}: {ds.num_classes} classes, train {len(train_ids)} / val {len(val_ids)} / test "
        f"{len(stores.test_ids)}; method {method_id(method, cfg.boost_alpha)}{_delta_rel(cfg)}; "
        f"{accelerator.num_processes} process(es) on {accelerator.device}; loader {type(train_loader).__name__}; "
        f"run dir {rundir.path}")

    # EM+APL scores the training images after each epoch, in evaluation mode
    apl_loader = source.eval_loader(accelerator, cfg.train_split, train_ids) if method == "em_apl" else None
    start_epoch, best_map, best_epoch, stopped_early = 1, -math.inf, 0, False
    if resume_state is not None:
        accelerator.load_state(str(latest))
        start_epoch = resume_state["epoch"] + 1
        best_map, best_epoch = resume_state["best_val_map"], resume_state["best_epoch"]
        stopped_early = bool(resume_state.get("stopped_early", False))
        stores.train.use_generation(resume_state["label_generation"])
        if precision is not None and resume_state.get("precision"):
            precision.load_state(resume_state["precision"])
    if cfg.resume:
        stores.train.discard_logs_after(start_epoch - 1)
        if main:
            for warning in rundir.truncate_metrics(start_epoch - 1):
                log(f"warning: {warning}")
        log(f"resumed {rundir.path} after epoch {start_epoch - 1}" if resume_state is not None
            else f"{rundir.path} has no checkpoint yet: starting from epoch 1")
    accelerator.wait_for_everyone()

    hooks = Hooks(rundir.debug if cfg.debug_dump else None, accelerator)
    tb = _tensorboard(rundir) if main else None
    for epoch in range(start_epoch if not stopped_early else cfg.epochs + 1, cfg.epochs + 1):
        frozen = source.frozen_backbone(epoch)
        stats = train_epoch(epoch, model, optimizer, train_loader, stores.train, cfg, accelerator, frozen=frozen,
                            precision=precision, hooks=hooks, extra=extra)
        if method == "ll_cp":
            next_label_generation(stores.train, epoch, accelerator)
        if extra is not None:
            note = extra.end_epoch(epoch, lambda: predict(model, apl_loader, accelerator, train_ids))
            if note:
                log(note)
        if memo is not None:
            memo.score_epoch(epoch, lambda _ids: predict_logits(accelerator.unwrap_model(model), memo_loader,
                                                                 accelerator.device))
        hooks.end_epoch(epoch, model)
        val_res, _, _ = evaluate(model, val_loader, stores.val, accelerator, val_ids, cfg.map_convention)
        val_map = float(val_res.map)  # a fraction in [0, 1] everywhere on disk; printed as percent
        record = epoch_record(epoch, stats, val_map, accelerator, stores.train.generation, frozen)
        if precision is not None:
            record.update(precision.end_epoch(epoch, reduce=lambda c: accelerator.reduce(
                c.to(accelerator.device), reduction="sum")))
        improved = best_epoch == 0 or val_map > best_map  # the first epoch is best even when its mAP is NaN
        if improved:
            best_map, best_epoch = val_map, epoch
            # the module's own keys, also under compile (whose wrapper would prefix them with _orig_mod.)
            ckpt.save_best(accelerator, accelerator.unwrap_model(model, keep_torch_compile=False), rundir,
                           {"epoch": epoch, "val_map": val_map})
        stop = 100 * val_map < 100 * best_map - cfg.early_stop_drop
        # metrics first, then the checkpoint: a kill in between leaves a metrics line past the checkpoint,
        # which resume truncates and recomputes (the other order would lose the line)
        if main:
            rundir.append_metrics(record)
            if tb is not None:
                for k in ("train_loss", "val_map", "modified", "images_per_s"):
                    tb.add_scalar(k, record[k], epoch)
        ckpt.save_checkpoint(accelerator, rundir, epoch, {
            "epoch": epoch, "best_val_map": best_map, "best_epoch": best_epoch, "stopped_early": stop,
            "label_generation": stores.train.generation, "config": run_config(cfg, dataset_name),
            "precision": None if precision is None else precision.state(),
        })
        if main and method == "ll_cp":
            # generations no checkpoint refers to any more (only the newest checkpoint is kept)
            stores.train.remove_generations(keep={stores.train.generation})
        log(f"epoch {epoch}: loss {record['train_loss']:.4f}  val mAP {100 * val_map:.2f}"
            f"{'  (best)' if improved else ''}  modified {record['modified']}  {record['images_per_s']:.1f} img/s")
        if stop:
            log(f"early stop: val mAP {100 * val_map:.2f} is more than {cfg.early_stop_drop} points below the "
                f"best {100 * best_map:.2f}")
            stopped_early = True
            break

    if memo is not None:
        memo.finish(title=f"{dataset_name} {method} seed {cfg.seed}")

    # ---- test once with the best weights ----
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model, keep_torch_compile=False).load_state_dict(ckpt.load_best_weights(rundir))
    test_res, _, _ = evaluate(model, test_loader, stores.test, accelerator, stores.test_ids, cfg.map_convention)
    result = result_record(cfg, dataset_name, ds.manifest, best_epoch, best_map, test_res, stopped_early,
                           accelerator.num_processes) | source.result_extra
    if main:
        rundir.write_json(rundir.result, result)
        if tb is not None:
            tb.close()
    stores.train.close()
    log(f"test mAP {100 * result['test_map']:.2f} with the weights of epoch {best_epoch} -> {rundir.result}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# ------------------------------------------------------------------------------------------ one epoch


@dataclass
class EpochStats:
    """One rank's sums over an epoch's steps. The sums of the steps' tensors stay on the device (``loss_sum``
    float64, as a Python float would add them; ``modified`` int64; ``problems``, the loss's input checks,
    train/losses.py ``raise_problems``) and are read every ``log_every`` steps and by ``epoch_record``."""

    steps: int = 0
    images: int = 0
    loss_sum: torch.Tensor | float = 0.0
    modified: torch.Tensor | int = 0
    problems: torch.Tensor | None = None
    seconds: float = 0.0


class CorrectionBuffer:
    """LL-Cp's corrections of the steps since the last flush, kept on the device: each step's bool [B, K] mask
    (and its sample ids, on the host). ``flush`` moves them to the label store's log of the epoch with one host
    sync: every ``flush_every`` steps, and at the end of the epoch, before the merge. In the order of the steps,
    as step-by-step appends would have written them; a run killed between flushes loses nothing it needs, since
    a resumed run repeats the whole epoch and truncates its log (shards/corrections.py)."""

    def __init__(self, store: LabelStore, every: int, hooks: Hooks):
        self.store, self.every, self.hooks = store, every, hooks
        self._masks: list[torch.Tensor] = []
        self._ids: list[np.ndarray] = []

    def add(self, epoch: int, ids: np.ndarray, mask: torch.Tensor, problems: torch.Tensor | None) -> None:
        """Buffer a step's corrections; when this fills the buffer, ``problems`` (the running sum of the loss's
        input checks) is checked before the flush, so nothing made from invalid inputs reaches the store."""
        self._masks.append(mask)
        self._ids.append(ids)
        if len(self._masks) >= self.every:
            raise_problems(problems)
            self.flush(epoch)

    def flush(self, epoch: int) -> None:
        if not self._masks:
            return
        rows, cols = torch.nonzero(torch.cat(self._masks), as_tuple=True)
        ids = np.concatenate(self._ids)
        self._masks, self._ids = [], []
        if len(rows):
            sample_ids, class_ids = ids[rows.cpu().numpy()], cols.cpu().numpy()
            self.store.append_corrections(epoch, sample_ids, class_ids)
            self.hooks.corrections(sample_ids, class_ids)


def train_epoch(epoch: int, model, optimizer, loader, store: LabelStore, cfg: Config, accelerator, *,
                frozen: bool, precision: PrecisionTracker | None, hooks: Hooks, extra=None) -> EpochStats:
    """One pass over ``loader``'s batches (at most ``max_steps_per_epoch``); LL-Cp corrections go to ``store``'s
    log of this epoch, to be merged by ``next_label_generation``. ``extra``: the method's state
    (train/methods.py), which gives the loss its extra inputs.

    A step (``train_step``) never waits for the device. The host reads it every ``log_every`` steps (the
    deferred input checks of the loss, and the progress bar's loss when it is shown), every ``flush_every``
    steps (LL-Cp's corrections) and at the end of the epoch."""
    model.train()
    loader.set_epoch(epoch)
    n_steps = len(loader) if cfg.max_steps_per_epoch <= 0 else min(len(loader), cfg.max_steps_per_epoch)
    gather_fn = accelerator.gather if (cfg.loss.global_topk and accelerator.num_processes > 1) else None
    device = accelerator.device
    bar = _progress(cfg, accelerator, n_steps, epoch)
    show_loss = cfg.progress and accelerator.is_main_process
    buffer = CorrectionBuffer(store, cfg.flush_every, hooks) if cfg.loss.method == "ll_cp" else None
    stats, t0 = EpochStats(), time.time()
    stats.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    stats.modified = torch.zeros((), dtype=torch.int64, device=device)
    for step, (inputs, ids) in enumerate(loader):
        if step >= n_steps:
            break
        hooks.step(epoch, step, ids)
        train_step(model, optimizer, inputs, ids, store, epoch, cfg, accelerator, stats, frozen=frozen,
                   gather_fn=gather_fn, extra=extra, precision=precision, buffer=buffer)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0:  # the host reads the device: the checks, and the bar's loss
            raise_problems(stats.problems)
            if show_loss:
                rate = stats.images * accelerator.num_processes / max(time.time() - t0, 1e-9)
                bar.set_postfix(loss=f"{float(stats.loss_sum) / stats.steps:.4f}", img_s=f"{rate:.1f}")
    raise_problems(stats.problems)
    if buffer is not None:
        buffer.flush(epoch)
    bar.close()
    stats.seconds = time.time() - t0
    return stats


def train_step(model, optimizer, inputs, ids, store: LabelStore, epoch: int, cfg: Config, accelerator,
               stats: EpochStats, *, frozen: bool, gather_fn=None, extra=None, precision=None,
               buffer: CorrectionBuffer | None = None):
    """One optimisation step on the batch ``(inputs, ids)`` (``ids`` on the host), its sums added to ``stats``,
    its analysis counts to ``precision`` and (LL-Cp) its corrections to ``buffer``; returns the loss's
    ``LossOutput``. No host sync, unless ``buffer`` is full (every ``flush_every`` steps): the batch's labels go
    to the device without waiting, the loss's counts and checks stay there. The optimiser of
    ``mixed_precision=fp16`` (its gradient scaler) syncs on its own; bf16 and float32 do not.
    tests/test_train_step.py checks it on the CPU and, on a GPU, under ``torch.cuda.set_sync_debug_mode``."""
    device = accelerator.device
    target, unknown = (t.to(device, non_blocking=True) for t in store.targets(ids.numpy()))
    with accelerator.autocast():
        logits = model(inputs.to(device, non_blocking=True), frozen_backbone=frozen)
    extra_inputs = {} if extra is None else extra.loss_inputs(ids.numpy(), device)
    out = compute_loss(logits.float(), target, unknown, epoch, cfg.loss, gather_fn=gather_fn, check=False,
                       max_batch_size=cfg.batch_size, **extra_inputs)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(out.loss)
    optimizer.step()
    if out.problems is not None:
        stats.problems = out.problems if stats.problems is None else stats.problems + out.problems
    if precision is not None:
        # LL-Cp's precision is that of its permanent corrections (the paper's Figure 4, accumulated)
        precision.update(epoch, ids, out.corrections if cfg.loss.method == "ll_cp" else out.modified)
    if buffer is not None:
        # the permanent set, not the in-step one: under ll_selection=official they differ (module
        # docstring of train/losses.py)
        buffer.add(epoch, ids.numpy(), out.corrections, stats.problems)
    stats.steps, stats.images = stats.steps + 1, stats.images + len(ids)
    stats.loss_sum += out.loss.detach().double()
    stats.modified += out.num_modified
    return out


def next_label_generation(store: LabelStore, epoch: int, accelerator) -> None:
    """LL-Cp at the end of ``epoch``: every rank's log of the epoch becomes label generation ``epoch``, in use
    from epoch + 1 (collective: call on every rank)."""
    store.flush_corrections(epoch)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fault_point(f"merge:{epoch}")
        store.merge_corrections(epoch, accelerator.num_processes)
    accelerator.wait_for_everyone()
    store.use_generation(epoch)


def epoch_record(epoch: int, stats: EpochStats, val_map: float, accelerator, label_generation: int,
                 frozen: bool) -> dict[str, Any]:
    """The metrics.jsonl line of an epoch, summed over the ranks (collective: call on every rank)."""
    device = accelerator.device
    totals = accelerator.gather(torch.stack([
        torch.as_tensor(stats.loss_sum, dtype=torch.float64, device=device),
        torch.as_tensor(stats.steps, dtype=torch.float64, device=device),
        torch.as_tensor(stats.modified, device=device).to(torch.float64),
        torch.as_tensor(stats.images, dtype=torch.float64, device=device)])).view(-1, 4).sum(0)
    return {
        "epoch": epoch,
        "train_loss": float(totals[0] / max(totals[1], 1)),
        "val_map": val_map,
        "modified": int(totals[2]),
        "images": int(totals[3]),
        "time_s": round(stats.seconds, 2),
        "images_per_s": round(float(totals[3]) / max(stats.seconds, 1e-9), 2),
        "label_generation": label_generation,
        "frozen_backbone": frozen,
    }


# ------------------------------------------------------------------------------------------ the setup


def make_accelerator(cfg: Config, *, find_unused_parameters: bool = False):
    """The Accelerator: on the GPU unless ``cpu`` (or none is present); ``mixed_precision=auto`` is bf16 on a
    GPU that has it, else none."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    use_cpu = cfg.cpu or not torch.cuda.is_available()
    mixed_precision = cfg.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "no"
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    # compile: Accelerate compiles the prepared model (after DDP) and unwraps it for saving
    return Accelerator(cpu=use_cpu, mixed_precision=mixed_precision, kwargs_handlers=kwargs,
                       dynamo_backend="inductor" if cfg.compile else None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimiser over the source's parameter groups (each group carries its lr and weight decay)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(groups, lr=cfg.lr)


def run_config(cfg: Config, dataset_name: str) -> dict[str, Any]:
    """The config as the run directory keeps it: flat keys, ``dataset`` the run's dataset name."""
    return to_dict(cfg) | {"dataset": dataset_name}


def open_run_dir(cfg: Config, dataset_name: str, accelerator,
                 cleanup: contextlib.ExitStack) -> tuple[RunDir, Path | None]:
    """The run directory, locked by rank 0 until ``cleanup`` closes (two runs in one directory would
    interleave their checkpoints and metrics), with its config.yaml written; and its newest checkpoint when
    resuming (else None). Refused, on every rank, when another process holds the lock or when a new run
    would overwrite a started one."""
    run = RunDir(cfg.resume or Path(cfg.out) / (cfg.run_name or default_name(
        dataset_name, method_id(cfg.loss.method, cfg.boost_alpha), cfg.seed)))
    refusal = [None]
    if accelerator.is_main_process:
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            cleanup.enter_context(run.lock())
            if not cfg.resume and run.started:
                raise RunDirError(f"{run.path} already holds a run; pass resume={run.path} to continue it, or "
                                  "another run_name/out")
        except RunDirError as e:
            refusal = [str(e)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise RunDirError(refusal[0])
    latest = ckpt.latest_checkpoint(run) if cfg.resume else None
    if accelerator.is_main_process:
        run.write_config(run_config(cfg, dataset_name))
    accelerator.wait_for_everyone()
    return run, latest


def check_splits(ds: Dataset, cfg: Config) -> None:
    """The config's split names are splits of the dataset."""
    for key in ("train_split", "test_split"):
        name = getattr(cfg, key)
        if name not in ds.manifest.splits:
            raise ConfigError(f"{key}={name!r}: {ds.root / MANIFEST_NAME} has no such split; choose one of "
                              f"{', '.join(ds.manifest.splits)}")


def split_train_val(num_samples: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Cole et al.'s 80/20 cut of the official train split, then the optional training subset; both parts
    must hold samples."""
    train_ids, val_ids = protocols.train_val_split(num_samples, cfg.val_frac, cfg.split_seed)
    if len(train_ids) == 0 or len(val_ids) == 0:
        part = "validation" if len(val_ids) == 0 else "training"
        raise ConfigError(f"val_frac={cfg.val_frac}: leaves no {part} samples of the {num_samples} in split "
                          f"{cfg.train_split!r}; choose a val_frac that leaves both parts at least one sample")
    if cfg.train_fraction < 1.0:
        # nested subsets: the first fraction of one fixed permutation, so 10 % is inside 20 % ...
        perm = np.random.RandomState(cfg.split_seed + 1).permutation(len(train_ids))
        n = max(1, int(round(cfg.train_fraction * len(train_ids))))
        train_ids = np.sort(train_ids[perm[:n]])
    return train_ids, val_ids


@dataclass(frozen=True)
class LabelStores:
    train: LabelStore  # the protocol's observed labels (+ LL-Cp corrections) of the training cut
    val: LabelStore
    test: LabelStore
    test_ids: np.ndarray


def label_stores(ds: Dataset, cfg: Config, train_ids: np.ndarray, val_ids: np.ndarray, corrections_dir: Path,
                 rank: int) -> LabelStores:
    """The protocol applies to the whole official train file, before the 80/20 cut (Cole et al.). Validation
    uses the truth (``val_labels=clean``, as Cole et al.) or the protocol's labels (``observed``); the test
    uses the truth: protocol ``full`` for a completely labelled split, ``given`` (unlisted stays unknown)
    for a partially labelled one."""
    def truth(split: str) -> str:
        return protocols.FULL if ds.unlisted(split) == UNLISTED_NEGATIVE else protocols.GIVEN

    k, train_labels = ds.num_classes, ds.labels_path(cfg.train_split)
    train = LabelStore(train_labels, k, cfg.protocol, seed=cfg.split_seed, subset_ids=train_ids,
                       corrections_dir=corrections_dir, rank=rank)
    val_protocol = truth(cfg.train_split) if cfg.val_labels == "clean" else cfg.protocol
    val = LabelStore(train_labels, k, val_protocol, seed=cfg.split_seed, subset_ids=val_ids)
    test = LabelStore(ds.labels_path(cfg.test_split), k, truth(cfg.test_split))
    return LabelStores(train, val, test, np.arange(ds.num_samples(cfg.test_split)))


def result_record(cfg: Config, dataset_name: str, manifest, best_epoch: int, best_map: float, test_res,
                  stopped_early: bool, world_size: int) -> dict[str, Any]:
    """The content of result.json (read by `report`): test mAP with the best weights and how it was got.
    mAPs are fractions; partially labelled test sets (OpenImages) add the paper's G1..G5 groups, by the
    per-class number of training images whose label is known."""
    result = {
        "dataset": dataset_name,
        "method": method_id(cfg.loss.method, cfg.boost_alpha),
        "seed": cfg.seed,
        "protocol": cfg.protocol,
        "best_epoch": best_epoch,
        "best_val_map": best_map,
        "test_map": float(test_res.map),
        "test_per_class_ap": [None if not np.isfinite(a) else float(a) for a in test_res.per_class_ap],
        "map_convention": cfg.map_convention,
        "excluded_classes": [int(c) for c in test_res.excluded],
        "stopped_early": stopped_early,
        "world_size": world_size,
    }
    known = manifest.splits[cfg.train_split].known_per_class
    if manifest.splits[cfg.test_split].unlisted == UNLISTED_UNKNOWN and known:
        groups = metrics.class_groups(np.asarray(known), 5)
        result["groups"] = {k: (float(v) if np.isfinite(v) else None)
                            for k, v in metrics.group_map(test_res.per_class_ap, groups).items()}
    return result


def _progress(cfg: Config, accelerator, total: int, epoch: int):
    return progress_bar(total, f"epoch {epoch}", "batch", enabled=cfg.progress and accelerator.is_main_process,
                        leave=False)


def _delta_rel(cfg: Config) -> str:
    """The banner's note of the modification rate, for the methods that have one."""
    return f" (delta_rel {cfg.loss.delta_rel})" if cfg.loss.method in TOPK_METHODS else ""


def _tensorboard(run: RunDir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
        return None
    return SummaryWriter(str(run.tb))
