"""Run directory and checkpoints.

Layout of a run directory::

    config.yaml                 the resolved config (also inside every checkpoint)
    metrics.jsonl               one JSON object per finished epoch
    result.json                 written once, after the test evaluation with the best weights
    labels/                     LL-Cp corrections (shards/labelstore.py: per-rank logs, CSR generations)
    checkpoints/epoch-NNNN/     Accelerate `save_state` (model, optimiser, RNG states of every rank)
                                + trainer_state.json (epoch done, label generation, best so far, config)
    checkpoints/LATEST          name of the newest complete checkpoint
    checkpoints/best/           the best model's weights (model.safetensors) + best.json

A checkpoint is written under a temporary name, fsynced and renamed, then LATEST is replaced
atomically: a kill at any point leaves the previous checkpoint usable. Older epoch checkpoints are
removed once LATEST points past them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from largeloss.shards.format import UNLISTED_UNKNOWN, fsync_dir, write_json_atomic

STATE_NAME = "trainer_state.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(accelerator, run_dir: Path, epoch: int, state: dict[str, Any]) -> Path:
    """Save the Accelerate state plus ``state`` as checkpoints/epoch-NNNN (collective: call on every rank)."""
    cdir = checkpoints_dir(run_dir)
    name = f"epoch-{epoch:04d}"
    tmp = cdir / f".tmp-{name}"
    if accelerator.is_main_process:
        cdir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    final = cdir / name
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1), encoding="utf-8")
        if os.environ.get("LARGELOSS_KILL_AT") == f"checkpoint:{epoch}":  # crash test: die mid-write
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(cdir)
        write_json_atomic(cdir / "LATEST", name)
        for old in cdir.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = checkpoints_dir(run_dir) / "LATEST"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text(encoding="utf-8").strip()
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete; the run directory was damaged")
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE_NAME).read_text(encoding="utf-8"))


def save_best(accelerator, model, run_dir: Path, info: dict[str, Any]) -> None:
    """Weights of the best epoch so far (rank 0 writes; atomic via a temporary folder)."""
    cdir = checkpoints_dir(run_dir)
    tmp = cdir / ".tmp-best"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        accelerator.save_model(model, str(tmp), safe_serialization=True)
        (tmp / "best.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        old = cdir / "best"
        if old.exists():
            trash = cdir / ".old-best"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(old, trash)
            os.replace(tmp, old)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, old)
        fsync_dir(cdir)
    accelerator.wait_for_everyone()


def load_best_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    best = checkpoints_dir(run_dir) / "best"
    if not best.is_dir() and (checkpoints_dir(run_dir) / ".old-best").is_dir():
        best = checkpoints_dir(run_dir) / ".old-best"  # killed between the two renames of save_best
    files = sorted(best.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{best}: no saved best weights")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def result_record(cfg, dataset_name: str, manifest, best_epoch: int, best_map: float, test_res,
                  stopped_early: bool, world_size: int) -> dict[str, Any]:
    """The content of result.json (read by `report`): test mAP with the best weights and how it was got.
    mAPs are fractions; partially labelled test sets (OpenImages) add the paper's G1..G5 groups, by the
    per-class number of training images whose label is known."""
    import numpy as np

    from largeloss.eval import metrics

    result = {
        "dataset": dataset_name,
        "method": cfg.method,
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


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """On resume, drop metrics of epochs after the checkpoint (they will be recomputed)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    write_json_atomic(path, "".join(line + "\n" for line in keep))
