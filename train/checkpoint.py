"""Checkpoints of a run directory (layout: eval/rundir.py): Accelerate state per epoch and the best weights.

A checkpoint is written under a temporary name, fsynced and renamed, then LATEST is replaced
atomically: a kill at any point leaves the previous checkpoint usable. Older epoch checkpoints are
removed once LATEST points past them. A write that fails (a full disk) removes the partial folder and
raises ``CheckpointError`` naming the file it was writing; LATEST still names the previous checkpoint.

Every checkpoint folder (epoch-NNNN/ and best/) holds ``checksums.json``: the sha256 of each other file
in it, trainer_state.json included. Reading a checkpoint (``verify_folder``) checks that the files are
exactly those, with those hashes, so a damaged, missing or extra file is a ``CheckpointError`` naming it,
never weights, optimizer state or a label generation number silently changed. A folder without
checksums.json (written before it existed) is used unverified, with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..eval.rundir import TRAINER_STATE, RunDir
from ..shards.format import file_sha256, fsync_dir, write_json_atomic
from .hooks import fault_error, fault_point


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


logger = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"


def _write_checksums(folder: Path) -> None:
    sums = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")


#: checkpoint folders this process has verified, with the (name, size, mtime) of each of their files then: a
#: resume reads the newest checkpoint twice (``config.resume_config``, then the loop), and hashing it again
#: costs its whole size in reads on every rank; a file changed since (its size or mtime) is hashed again
_verified: dict[str, tuple] = {}


def _stat_key(folder: Path) -> tuple:
    return tuple(sorted((p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)
                        for p in folder.rglob("*") if p.is_file() for st in [p.stat()]))


def verify_folder(folder: Path) -> None:
    """Check a checkpoint folder against its checksums.json (see the module docstring); a folder this process
    verified before is hashed again only if one of its files changed size or mtime since."""
    damaged = "the checkpoint is damaged: restore the file, or start the run again"
    sums_path = folder / CHECKSUMS
    seen = _stat_key(folder)
    if _verified.get(str(folder.resolve())) == seen:
        return
    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        # written before checksums existed: usable, as corrections.py's version-1 generations, so that such
        # runs can still resume and be evaluated; every checkpoint written now has the file
        logger.warning("%s: no %s (written before checkpoints had checksums): not verified", folder, CHECKSUMS)
        return
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{sums_path}: not valid JSON ({e}); {damaged}") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CheckpointError(f"{sums_path}: expected an object of file name -> sha256; {damaged}")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {CHECKSUMS}
    for name in sorted(set(sums) | present):
        path = folder / name
        if name not in present:
            raise CheckpointError(f"{path}: missing; {damaged}")
        if name not in sums:
            raise CheckpointError(f"{path}: not listed in {sums_path}; {damaged}")
        if file_sha256(path) != sums[name]:
            raise CheckpointError(f"{path}: sha256 differs from {sums_path}; {damaged}")
    _verified[str(folder.resolve())] = seen


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _write_failed(folder: Path, e: BaseException) -> CheckpointError:
    """The one-line error of a failed write into ``folder``, naming the file being written (the newest in the
    folder when the exception does not say); the partial folder is removed. torch reports a full disk as
    "basic_ios::clear: iostream error" or "unexpected pos": a nearly full file system is named as such."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns) \
        if folder.is_dir() else []
    path = getattr(e, "filename", None) or (files[-1] if files else folder)
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if isinstance(e, OSError) and e.errno:
        reason = os.strerror(e.errno)
    elif _free_bytes(folder.parent) < 1 << 20:
        reason = f"No space left on device ({detail})"
    else:
        reason = detail
    shutil.rmtree(folder, ignore_errors=True)
    return CheckpointError(f"{path}: writing the checkpoint failed: {reason}; the previous checkpoint is kept: "
                           "free space, then resume the run")


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def _all_or_none(accelerator, error: CheckpointError | None) -> None:
    """Collective, in place of a barrier: every rank learns whether any rank failed its part of a write, and
    every rank raises (its own error, or one naming the first failure). A rank that raised alone would leave
    the others waiting at the next barrier for ever (rank 0 alone writes most checkpoint files)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        failed = [m for m in gather_object([None if error is None else str(error)]) if m is not None]
    else:
        failed = [] if error is None else [str(error)]
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{failed[0]} (reported by another process)")


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
    error = None
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as e:
        error = _write_failed(tmp, e)
    _all_or_none(accelerator, error)
    if accelerator.is_main_process:
        try:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            fault_point(f"checkpoint:{epoch}")  # crash test: die mid-write
            fault_error(f"checkpoint:{epoch}", tmp / TRAINER_STATE)  # a full disk, on rank 0 only
            _write_checksums(tmp)
            _fsync_tree(tmp)
        except OSError as e:
            error = _write_failed(tmp, e)
        if error is None:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(cdir)
            write_json_atomic(run.latest, final.name)
            for old in cdir.glob("epoch-*"):
                if old.name != final.name:
                    shutil.rmtree(old)
    _all_or_none(accelerator, error)
    return final


def latest_checkpoint(run: RunDir) -> Path | None:
    """The checkpoint LATEST names, verified (``verify_folder``); None before the first one."""
    if not run.latest.is_file():
        return None
    name = run.latest.read_bytes().decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"epoch-\d{4,}", name):
        raise CheckpointError(f"{run.latest}: expected the name of a checkpoint such as epoch-0003; the run "
                              "directory was damaged: write the name of the newest checkpoints/epoch-* folder into it")
    path = run.checkpoints / name
    if not path.is_dir():
        raise CheckpointError(f"{run.latest} names {path}, which does not exist; the run directory was damaged")
    verify_folder(path)
    return path


#: trainer_state.json's keys and their types (best_val_map is NaN, a float, when validation had no positives)
STATE_KEYS = {"epoch": int, "best_val_map": float, "best_epoch": int, "label_generation": int, "config": dict}


def read_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged") from None
    bad = [k for k, t in STATE_KEYS.items() if not isinstance(state, dict) or isinstance(state.get(k), bool)
           or not isinstance(state.get(k), (t, int) if t is float else t)]
    if bad:
        raise CheckpointError(f"{path}: missing or mistyped {', '.join(bad)}; the checkpoint is damaged")
    return state


def save_best(accelerator, model, run: RunDir, info: dict[str, Any]) -> None:
    """Weights of the best epoch so far (rank 0 writes; atomic via a temporary folder)."""
    cdir = run.checkpoints
    tmp = cdir / ".tmp-best"
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            accelerator.save_model(model, str(tmp), safe_serialization=True)
            (tmp / "best.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
            _write_checksums(tmp)
            _fsync_tree(tmp)
        except (OSError, RuntimeError) as e:
            error = _write_failed(tmp, e)
        if error is None:
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
    _all_or_none(accelerator, error)


def load_best_weights(run: RunDir) -> dict:
    from safetensors.torch import load_file

    best = run.best
    if not best.is_dir() and (run.checkpoints / ".old-best").is_dir():
        best = run.checkpoints / ".old-best"  # killed between the two renames of save_best
    if not best.is_dir():
        raise CheckpointError(f"{best}: no saved best weights; the run has not saved a best model yet")
    verify_folder(best)
    files = sorted(best.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{best}: no saved best weights; the run directory was damaged")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state
