"""Checkpoints of a run directory (layout: eval/rundir.py): Accelerate state per epoch and the best weights.

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

from ..eval.rundir import TRAINER_STATE, RunDir
from ..shards.format import fsync_dir, write_json_atomic
from .hooks import fault_point


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def save_checkpoint(accelerator, run: RunDir, epoch: int, state: dict[str, Any]) -> Path:
    """Save the Accelerate state plus ``state`` as checkpoints/epoch-NNNN (collective: call on every rank)."""
    cdir = run.checkpoints
    final = run.epoch_checkpoint(epoch)
    tmp = cdir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        cdir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
        fault_point(f"checkpoint:{epoch}")  # crash test: die mid-write
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(cdir)
        write_json_atomic(run.latest, final.name)
        for old in cdir.glob("epoch-*"):
            if old.name != final.name:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(run: RunDir) -> Path | None:
    if not run.latest.is_file():
        return None
    path = run.checkpoints / run.latest.read_text(encoding="utf-8").strip()
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{run.latest} names {path.name}, which is incomplete; the run directory was damaged")
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))


def save_best(accelerator, model, run: RunDir, info: dict[str, Any]) -> None:
    """Weights of the best epoch so far (rank 0 writes; atomic via a temporary folder)."""
    cdir = run.checkpoints
    tmp = cdir / ".tmp-best"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        accelerator.save_model(model, str(tmp), safe_serialization=True)
        (tmp / "best.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        if run.best.exists():
            trash = cdir / ".old-best"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(run.best, trash)
            os.replace(tmp, run.best)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, run.best)
        fsync_dir(cdir)
    accelerator.wait_for_everyone()


def load_best_weights(run: RunDir) -> dict:
    from safetensors.torch import load_file

    best = run.best
    if not best.is_dir() and (run.checkpoints / ".old-best").is_dir():
        best = run.checkpoints / ".old-best"  # killed between the two renames of save_best
    files = sorted(best.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{best}: no saved best weights")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
