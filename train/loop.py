"""The training loop: one readable function, Accelerate for everything distributed.

Per epoch: train on the 80 % cut of the official train split with the protocol's observed labels
(plus LL-Cp corrections), validate on the held-out 20 % (clean labels by default), keep the best
weights, stop early when validation mAP falls ``early_stop_drop`` points below the best; then test once
with the best weights. LL-Cp corrections found in epoch t are merged into a new label generation at the
end of epoch t and used from epoch t+1 (the paper's semantics).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largeloss.eval import metrics
from largeloss.eval.analysis import MemorizationTracker, PrecisionTracker, predict_logits
from largeloss.shards import protocols
from largeloss.shards.format import UNLISTED_UNKNOWN
from largeloss.shards.labelstore import LabelStore
from largeloss.shards.reader import open_dataset
from largeloss.train import checkpoint as ckpt
from largeloss.train.config import Config, loss_config, to_dict, to_yaml
from largeloss.train.losses import compute_loss
from largeloss.train.model import build_model, param_groups, resolve_weights_file


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, flush=True)


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    use_cpu = cfg.cpu or not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "no"
    # LinearInit runs the frozen backbone without gradient: DDP must tolerate parameters without grads
    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=cfg.linear_init_epochs > 0)]
    return Accelerator(cpu=use_cpu, mixed_precision=mp, kwargs_handlers=kwargs)


def split_train_val(num_samples: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Cole et al.'s 80/20 cut of the official train split, then the optional training subset."""
    train_ids, val_ids = protocols.train_val_split(num_samples, cfg.val_frac, cfg.split_seed)
    if cfg.train_fraction < 1.0:
        # nested subsets: the first fraction of one fixed permutation, so 10 % is inside 20 % ...
        perm = np.random.RandomState(cfg.split_seed + 1).permutation(len(train_ids))
        n = max(1, int(round(cfg.train_fraction * len(train_ids))))
        train_ids = np.sort(train_ids[perm[:n]])
    return train_ids, val_ids


def build_loader(cfg: Config, accelerator, split: str, sample_ids: np.ndarray | None, train: bool):
    from largeloss.shards.loader import ShardLoader

    kind = cfg.loader
    if kind in ("auto", "dali"):
        from largeloss.shards import dali as dali_loader

        if kind == "dali" or dali_loader.available(accelerator.device):
            return dali_loader.DaliLoader(  # plan_workers: same batches as the CPU loader would give
                cfg.data, split, sample_ids=sample_ids,
                batch_size=cfg.batch_size if train else cfg.eval_batch_size,
                image_size=cfg.image_size, train=train, rank=accelerator.process_index,
                world_size=accelerator.num_processes, seed=cfg.seed, device=accelerator.device,
                plan_workers=cfg.num_workers,
            )
    return ShardLoader(
        cfg.data, split, sample_ids=sample_ids,
        batch_size=cfg.batch_size if train else cfg.eval_batch_size,
        image_size=cfg.image_size, train=train, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=cfg.num_workers, seed=cfg.seed,
    )


def labels_as_int8(target: torch.Tensor, unknown: torch.Tensor) -> np.ndarray:
    """(AN target, unknown mask) -> +1 / -1 / 0 for evaluation."""
    lab = np.where(target.numpy() > 0.5, 1, -1).astype(np.int8)
    lab[unknown.numpy()] = 0
    return lab


@torch.no_grad()
def predict(model, loader, accelerator, expected: np.ndarray, sparse_store: LabelStore | None = None):
    """Score every sample in ``expected`` exactly once across ranks and workers (checked with sample ids).

    Returns (sample ids sorted, scores): dense scores [N, K] gathered from all ranks; or, with
    ``sparse_store`` (partially labelled sets: OpenImages test has ~13 known of 5,000 labels per image),
    only the scores of the known entries, kept per rank and gathered once at the end as flat arrays
    (class ids, scores, is_positive), so the N x K matrix (2.5 GB for OpenImages test) never exists.
    """
    model.eval()
    all_ids, all_scores, known = [], [], []
    for images, ids in loader:
        images = images.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        scores = torch.sigmoid(logits.float())
        if sparse_store is not None:
            rows, cols, is_pos = sparse_store.known_entries(ids.numpy())
            vals = scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)]
            known.append((cols.astype(np.int32), vals.cpu().numpy(), is_pos))
        ids = ids.to(accelerator.device)
        # ranks may hold batches that differ by one sample: pad, gather, drop the padding (id -1)
        ids = accelerator.pad_across_processes(ids, dim=0, pad_index=-1)
        if sparse_store is None:
            scores = accelerator.pad_across_processes(scores, dim=0, pad_index=0)
            ids, scores = accelerator.gather((ids, scores))
            all_scores.append(scores[ids >= 0].cpu())
        else:
            ids = accelerator.gather(ids)
        all_ids.append(ids[ids >= 0].cpu())
    ids = torch.cat(all_ids).numpy() if all_ids else np.zeros(0, dtype=np.int64)
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
        raise RuntimeError(f"evaluation saw {len(ids) - len(uniq)} samples twice across ranks/workers")
    if not np.array_equal(uniq, np.sort(expected)):
        missing = np.setdiff1d(expected, uniq)
        raise RuntimeError(f"evaluation scored {len(uniq)} samples, expected {len(expected)} (missing e.g. {missing[:5]})")
    if sparse_store is not None:
        local = tuple(np.concatenate(parts) if known else np.zeros(0, dt)
                      for parts, dt in zip(zip(*known) if known else ((), (), ()), (np.int32, np.float32, bool)))
        from accelerate.utils import gather_object

        gathered = gather_object([local])  # one (cols, scores, is_pos) per rank, in rank order
        flat = tuple(np.concatenate([g[i] for g in gathered]) for i in range(3))
        return uniq, flat
    scores = torch.cat(all_scores).numpy() if all_scores else np.zeros((0, 0), dtype=np.float32)
    return uniq, scores[first]


def evaluate(model, loader, store: LabelStore, accelerator, expected: np.ndarray, convention: str):
    if store.unlisted == UNLISTED_UNKNOWN:
        # partial labels: AP from the known entries only (eval/metrics.py's flat path)
        ids, (cols, vals, is_pos) = predict(model, loader, accelerator, expected, sparse_store=store)
        return metrics.mean_average_precision_flat(cols, vals, is_pos, store.num_classes, convention), ids, None
    ids, scores = predict(model, loader, accelerator, expected)
    target, unknown = store.targets(ids)
    res = metrics.mean_average_precision(scores, labels_as_int8(target, unknown), convention=convention)
    return res, ids, scores


def set_cpu_threads(cfg: Config, accelerator) -> None:
    """On CPU, leave the loader workers their cores: oversubscribed OpenMP threads spin against the
    workers (measured on 2 shared cores: 53 img/s with 1 thread vs 21 img/s with 2 on the demo)."""
    if accelerator.device.type != "cpu":
        return
    n = cfg.cpu_threads
    if n <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // accelerator.num_processes - cfg.num_workers)
    torch.set_num_threads(n)


def run(cfg: Config) -> dict[str, Any]:
    accelerator = make_accelerator(cfg)
    set_cpu_threads(cfg, accelerator)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    ds = open_dataset(cfg.data)
    resolve_weights_file(cfg.arch, cfg.weights)  # a missing weight file fails before the run directory exists
    K = ds.num_classes
    dataset_name = cfg.dataset or ds.manifest.dataset
    cfg = dataclasses.replace(cfg, dataset=dataset_name)  # the resolved config names its dataset
    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.out) / (cfg.run_name or f"{dataset_name}-{cfg.method}-s{cfg.seed}")

    resume_state: dict[str, Any] | None = None
    latest = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and latest is not None:
        resume_state = ckpt.read_state(latest)
    elif not cfg.resume and (run_dir / "config.yaml").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume={run_dir} to continue it, or another run_name/out"
        )
    accelerator.wait_for_everyone()  # every rank has checked the run directory before rank 0 writes to it
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    accelerator.wait_for_everyone()

    # ---- labels: protocol on the whole official train file, then the 80/20 cut (Cole et al.) ----
    n_train_split = ds.num_samples(cfg.train_split)
    train_ids, val_ids = split_train_val(n_train_split, cfg)
    train_labels = ds.labels_path(cfg.train_split)
    train_store = LabelStore(
        train_labels, K, cfg.protocol, seed=cfg.split_seed, subset_ids=train_ids,
        corrections_dir=run_dir / "labels", rank=accelerator.process_index,
    )
    val_protocol = "full" if cfg.val_labels == "clean" and ds.manifest.splits[cfg.train_split].unlisted == "negative" else (
        "given" if cfg.val_labels == "clean" else cfg.protocol
    )
    val_store = LabelStore(train_labels, K, val_protocol, seed=cfg.split_seed, subset_ids=val_ids)
    test_unlisted = ds.manifest.splits[cfg.test_split].unlisted
    test_store = LabelStore(ds.labels_path(cfg.test_split), K, "full" if test_unlisted == "negative" else "given")
    test_ids = np.arange(ds.num_samples(cfg.test_split))

    # ---- analysis (eval/analysis.py): the only code that reads training truth, apart from the loss path.
    # Created before any use_generation: the memorisation entries are drawn from the uncorrected labels.
    analysis = cfg.analysis_entries > 0
    precision = PrecisionTracker(train_store) if analysis else None
    memo = memo_loader = None
    if analysis and accelerator.is_main_process:
        from largeloss.shards.loader import ShardLoader

        memo = MemorizationTracker(train_store, train_ids, cfg.analysis_entries, cfg.seed, run_dir / "analysis",
                                   resume_after_epoch=None if resume_state is None else resume_state["epoch"])
        memo_loader = ShardLoader(cfg.data, cfg.train_split, sample_ids=memo.image_ids, batch_size=cfg.eval_batch_size,
                                  image_size=cfg.image_size, train=False, num_workers=cfg.num_workers)

    # ---- model: same seed on every rank before building it, then per rank ----
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, K, cfg.weights)
    groups = param_groups(model, cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    else:
        optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    seed_everything(cfg.seed * 1000 + accelerator.process_index)

    loss_cfg = loss_config(cfg)
    gather_fn = accelerator.gather if (cfg.global_topk and accelerator.num_processes > 1) else None

    train_loader = build_loader(cfg, accelerator, cfg.train_split, train_ids, train=True)
    val_loader = build_loader(cfg, accelerator, cfg.train_split, val_ids, train=False)
    test_loader = build_loader(cfg, accelerator, cfg.test_split, None, train=False)
    _log(accelerator, f"[largeloss] {dataset_name}: {K} classes, train {len(train_ids)} / val {len(val_ids)} / "
         f"test {len(test_ids)}; method {cfg.method} (delta_rel {cfg.delta_rel}); {accelerator.num_processes} "
         f"process(es) on {accelerator.device}; loader {type(train_loader).__name__}; run dir {run_dir}")

    start_epoch, best_map, best_epoch, stopped_early = 1, -math.inf, 0, False
    if resume_state is not None:
        accelerator.load_state(str(latest))
        start_epoch = resume_state["epoch"] + 1
        best_map, best_epoch = resume_state["best_val_map"], resume_state["best_epoch"]
        stopped_early = bool(resume_state.get("stopped_early", False))
        train_store.use_generation(resume_state["label_generation"])
        if precision is not None and resume_state.get("precision"):
            precision.load_state(resume_state["precision"])
        train_store.discard_logs_after(resume_state["epoch"])
        if accelerator.is_main_process:
            ckpt.truncate_metrics(run_dir, resume_state["epoch"])
        _log(accelerator, f"[largeloss] resumed {run_dir} after epoch {resume_state['epoch']}")
    elif cfg.resume:
        _log(accelerator, f"[largeloss] {run_dir} has no checkpoint yet: starting from epoch 1")
        train_store.discard_logs_after(0)
    accelerator.wait_for_everyone()

    tb = _tensorboard(run_dir) if accelerator.is_main_process else None
    for epoch in range(start_epoch if not stopped_early else cfg.epochs + 1, cfg.epochs + 1):
        frozen = epoch <= cfg.linear_init_epochs
        model.train()
        train_loader.set_epoch(epoch)
        n_steps = len(train_loader) if cfg.max_steps_per_epoch <= 0 else min(len(train_loader), cfg.max_steps_per_epoch)
        bar = _progress(cfg, accelerator, n_steps, epoch)
        t0, seen, loss_sum, n_modified, n_loss_terms = time.time(), 0, 0.0, 0, 0
        seen_ids: list[np.ndarray] = []
        made: list[np.ndarray] = []  # debug_dump: the (sample, class) corrections this rank proposed
        for step, (images, ids) in enumerate(train_loader):
            if step >= n_steps:
                break
            _fault_point(f"step:{epoch}:{step}")
            if cfg.debug_dump:
                seen_ids.append(ids.numpy().copy())
            images = images.to(accelerator.device, non_blocking=True)
            target, unknown = train_store.targets(ids.numpy())
            target, unknown = target.to(accelerator.device), unknown.to(accelerator.device)
            with accelerator.autocast():
                logits = model(images, frozen_backbone=frozen)
            out = compute_loss(logits.float(), target, unknown, epoch, loss_cfg, gather_fn=gather_fn)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out.loss)
            optimizer.step()
            if precision is not None:
                precision.update(epoch, ids, out.modified)
            if cfg.method == "ll_cp" and out.num_modified > 0:
                rows, cols = torch.nonzero(out.modified, as_tuple=True)
                corr = (ids.numpy()[rows.cpu().numpy()], cols.cpu().numpy())
                train_store.append_corrections(epoch, *corr)
                if cfg.debug_dump:
                    made.append(np.stack(corr, axis=1))
            seen += len(ids)
            loss_sum += float(out.loss.detach())
            n_modified += out.num_modified
            n_loss_terms += 1
            if bar is not None:
                bar.update(1)
                if step % 5 == 0:
                    bar.set_postfix(loss=f"{loss_sum / n_loss_terms:.4f}", img_s=f"{seen * accelerator.num_processes / max(time.time() - t0, 1e-9):.1f}")
        if bar is not None:
            bar.close()
        train_time = time.time() - t0

        # ---- LL-Cp: every rank's log of this epoch becomes the next label generation ----
        if cfg.method == "ll_cp":
            train_store.flush_corrections(epoch)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _fault_point(f"merge:{epoch}")
                train_store.merge_corrections(epoch, accelerator.num_processes)
            accelerator.wait_for_everyone()
            train_store.use_generation(epoch)
        if memo is not None:
            memo.score_epoch(epoch, lambda _ids: predict_logits(accelerator.unwrap_model(model), memo_loader, accelerator.device))

        if cfg.debug_dump:
            _dump_debug(run_dir, epoch, accelerator, model, seen_ids, made)
        val_res, _, _ = evaluate(model, val_loader, val_store, accelerator, val_ids, cfg.map_convention)
        val_map = float(val_res.map)  # a fraction in [0, 1] everywhere on disk; printed as percent
        totals = accelerator.gather(torch.tensor([loss_sum, n_loss_terms, n_modified, seen], dtype=torch.float64, device=accelerator.device)).view(-1, 4).sum(0)
        record = {
            "epoch": epoch,
            "train_loss": float(totals[0] / max(totals[1], 1)),
            "val_map": val_map,
            "modified": int(totals[2]),
            "images": int(totals[3]),
            "time_s": round(train_time, 2),
            "images_per_s": round(float(totals[3]) / max(train_time, 1e-9), 2),
            "label_generation": train_store.generation,
            "frozen_backbone": frozen,
        }
        if precision is not None:
            record.update(precision.end_epoch(epoch, reduce=lambda c: accelerator.reduce(
                torch.as_tensor(c, device=accelerator.device), reduction="sum").cpu().numpy()))
        improved = best_epoch == 0 or val_map > best_map  # the first epoch is best even when its mAP is NaN
        if improved:
            best_map, best_epoch = val_map, epoch
            ckpt.save_best(accelerator, model, run_dir, {"epoch": epoch, "val_map": val_map})
        stop = 100 * val_map < 100 * best_map - cfg.early_stop_drop
        # metrics first, then the checkpoint: a kill in between leaves a metrics line past the checkpoint,
        # which resume truncates and recomputes (the other order would lose the line)
        if accelerator.is_main_process:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if tb is not None:
                for k in ("train_loss", "val_map", "modified", "images_per_s"):
                    tb.add_scalar(k, record[k], epoch)
        state = {
            "epoch": epoch, "best_val_map": best_map, "best_epoch": best_epoch, "stopped_early": stop,
            "label_generation": train_store.generation, "config": to_dict(cfg),
            "precision": None if precision is None else precision.state(),
        }
        ckpt.save_checkpoint(accelerator, run_dir, epoch, state)
        if accelerator.is_main_process and cfg.method == "ll_cp":
            # generations no checkpoint refers to any more (only the newest checkpoint is kept)
            train_store.remove_generations(keep={train_store.generation})
        _log(accelerator, f"[largeloss] epoch {epoch}: loss {record['train_loss']:.4f}  val mAP {100 * val_map:.2f}"
             f"{'  (best)' if improved else ''}  modified {record['modified']}  {record['images_per_s']:.1f} img/s")
        if stop:
            _log(accelerator, f"[largeloss] early stop: val mAP {100 * val_map:.2f} is more than {cfg.early_stop_drop} points below the best {100 * best_map:.2f}")
            stopped_early = True
            break

    if memo is not None:
        memo.finish(title=f"{dataset_name} {cfg.method} seed {cfg.seed}")

    # ---- test once with the best weights ----
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).load_state_dict(ckpt.load_best_weights(run_dir))
    test_res, _, _ = evaluate(model, test_loader, test_store, accelerator, test_ids, cfg.map_convention)
    result = ckpt.result_record(cfg, dataset_name, ds.manifest, best_epoch, best_map, test_res, stopped_early,
                                accelerator.num_processes)
    if accelerator.is_main_process:
        from largeloss.shards.format import write_json_atomic

        write_json_atomic(run_dir / "result.json", json.dumps(result, indent=1))
        if tb is not None:
            tb.close()
    _log(accelerator, f"[largeloss] test mAP {100 * result['test_map']:.2f} with the weights of epoch {best_epoch} -> {run_dir / 'result.json'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _dump_debug(run_dir: Path, epoch: int, accelerator, model, seen_ids: list[np.ndarray], made: list[np.ndarray]) -> None:
    """debug_dump=true (tests): every rank writes the sample ids it trained on in this epoch, the LL-Cp
    corrections it proposed and its weights, so a test can check exact-once coverage, that the merge lost
    no correction, and identical replicas across ranks."""
    net = accelerator.unwrap_model(model)
    vec = torch.cat([p.detach().double().flatten().cpu() for p in net.parameters()]).numpy()
    out = run_dir / "debug"
    out.mkdir(parents=True, exist_ok=True)
    ids = np.concatenate(seen_ids) if seen_ids else np.zeros(0, dtype=np.int64)
    corrections = np.concatenate(made) if made else np.zeros((0, 2), dtype=np.int64)
    np.savez(out / f"e{epoch:04d}-r{accelerator.process_index}.npz", ids=ids, weights=vec, corrections=corrections)


def _fault_point(where: str) -> None:
    """Fault injection for the crash/resume tests: LARGELOSS_KILL_AT=<where> kills this process with SIGKILL
    when it reaches that point (e.g. "step:2:3" = epoch 2 before step 3, "merge:2" = before the LL-Cp merge
    of epoch 2, "checkpoint:2" = inside the checkpoint write of epoch 2). Unset in normal use."""
    if os.environ.get("LARGELOSS_KILL_AT") == where:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _progress(cfg: Config, accelerator, total: int, epoch: int):
    if not (cfg.progress and accelerator.is_main_process):
        return None
    import sys

    from tqdm.auto import tqdm

    # redirected to a file (nohup, a cluster's log): a line every 30 s instead of ten a second
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True, leave=False,
                mininterval=interval)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
        return None
    return SummaryWriter(str(run_dir / "tb"))
