"""The run directory: its layout, written by the trainers and read by ``report``, the sweep and the pointing game.

Layout of a run directory (``RunDir`` names every path)::

    config.yaml                 the resolved config as flat keys (train/config.py ``to_dict``), ``dataset`` set
                                to the run's dataset name; also inside every checkpoint
    metrics.jsonl               one JSON object per finished epoch (``epoch``, ``train_loss``, ``val_map``, ...)
    result.json                 written once, after the test evaluation with the best weights (``RESULT_KEYS``)
    features.json               runs on cached features (train/features.py): where the features came from
    labels/                     LL-Cp corrections (shards/labelstore.py: per-rank logs, CSR generations)
    analysis/                   the memorisation tracker's output (eval/analysis.py), memorization.json first
    checkpoints/epoch-NNNN/     Accelerate ``save_state`` (model, optimiser, RNG states of every rank)
                                + trainer_state.json (epoch done, label generation, best so far, config)
    checkpoints/LATEST          name of the newest complete checkpoint
    checkpoints/best/           the best model's weights (model.safetensors) + best.json
    pointing.json, pointing/    the pointing game's result and overlays (train/pointing.py)
    debug/                      ``debug_dump=true`` (tests): per rank and epoch, the ids, corrections, weights
    tb/                         TensorBoard event files, when tensorboard is installed
    .lock                       flock held by the trainer's rank 0 while it runs (the holder's pid inside)

mAP values in result.json and metrics.jsonl are fractions in [0, 1]. A directory holding any of
``RUN_FILES`` is a run directory; ``find_runs`` finds them below other directories. Reading checks the
files and raises ``RunDirError`` naming the file and what to do.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from ..shards.format import lock_file, write_json_atomic

RUN_FILES = ("config.yaml", "metrics.jsonl", "result.json")
RESULT_KEYS = ("dataset", "method", "seed", "best_epoch", "best_val_map", "test_map", "map_convention")
TRAINER_STATE = "trainer_state.json"


class RunDirError(ValueError):
    """A run directory that cannot be read; the message names the file and what to do."""


def method_id(method: str, boost_alpha: float | None = 1.0) -> str:
    """A run's method as result.json, run names and reports know it: the loss method, ``boostlu_<method>`` when
    the model has a BoostLU head (config ``boost_alpha`` other than 1)."""
    return method if boost_alpha in (None, 1, 1.0) else f"boostlu_{method}"


def default_name(dataset: str, method: str, seed: int) -> str:
    """The run directory's name when the config gives no ``run_name``."""
    return f"{dataset}-{method}-s{seed}"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # ---- paths ----
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def features(self) -> Path:
        return self.path / "features.json"

    @property
    def labels(self) -> Path:
        return self.path / "labels"

    @property
    def analysis(self) -> Path:
        return self.path / "analysis"

    @property
    def memorization(self) -> Path:
        return self.analysis / "memorization.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / "LATEST"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch-{epoch:04d}"

    @property
    def pointing(self) -> Path:
        return self.path / "pointing.json"

    @property
    def pointing_overlays(self) -> Path:
        return self.path / "pointing"

    @property
    def debug(self) -> Path:
        return self.path / "debug"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    # ---- state ----
    def is_run(self) -> bool:
        return any((self.path / f).exists() for f in RUN_FILES)

    @property
    def started(self) -> bool:
        """The trainer has written its config: a run to resume, or a finished one."""
        return self.config.is_file()

    @property
    def finished(self) -> bool:
        return self.result.is_file()

    # ---- writing (rank 0 of the trainer) ----
    def lock(self) -> IO[str]:
        """Lock the run directory (which must exist) until the returned file is closed; ``RunDirError`` naming
        the holder's pid when another process has it."""
        return lock_file(self.lock_path, lambda holder: RunDirError(
            f"{self.path}: in use by another training ({holder}, lock {self.lock_path}); wait for it to finish, "
            "or pass another run_name/out"))

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, last_epoch: int) -> list[str]:
        """On resume, drop the metrics of epochs after the checkpoint (they will be recomputed), and a last
        line torn by a kill or a full disk; returns a warning per line dropped for being torn."""
        if not self.metrics.is_file():
            return []
        rows, notes = _read_metrics(self.metrics, finished=False)
        write_json_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows if r["epoch"] <= last_epoch))
        return [f"{self.metrics}: {note}" for note in notes]

    def write_json(self, path: Path, obj: dict[str, Any]) -> None:
        """``result.json``, ``features.json``, ``pointing.json``: written whole, atomically."""
        write_json_atomic(path, json.dumps(obj, indent=1))

    # ---- reading ----
    def read_config(self) -> dict:
        if not self.config.is_file():
            raise RunDirError(f"{self.config}: missing; every run directory holds the resolved config the "
                              "trainer saved at start")
        try:
            config = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise RunDirError(f"{self.config}: not valid YAML: {e}") from e
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config}: expected a mapping at the top level")
        return config

    def read_optional(self, path: Path) -> dict | None:
        """A JSON object file of the run (memorization.json, pointing.json), None when absent."""
        return read_json_object(path) if path.is_file() else None


def read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the trainer writes this file "
                          "at the end of a run: re-run the evaluation or remove the file") from e
    if not isinstance(obj, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------ runs for reports


@dataclass
class Run:
    """One run directory as the report reads it."""

    path: Path
    config: dict
    dataset: str
    method: str
    seed: int
    protocol: str | None
    epochs: list[dict]  # metrics.jsonl, one dict per epoch, in file order
    result: dict | None  # result.json; None for a run that has not finished
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def groups(self) -> dict | None:
        return self.result.get("groups") if self.result else None

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path)

    @property
    def last_val_map(self) -> float | None:
        vals = [e["val_map"] for e in self.epochs if "val_map" in e]
        return vals[-1] if vals else None

    def label(self) -> str:
        return f"{self.dataset}/{self.method}/seed{self.seed}"


def _read_metrics(path: Path, finished: bool) -> tuple[list[dict], list[str]]:
    """Rows of metrics.jsonl. A run killed mid-write can leave a truncated last line: that line is
    skipped with a note when the run has no result.json; anywhere else a bad line is an error."""
    epochs: list[dict] = []
    notes: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not finished:
                notes.append(f"metrics.jsonl line {lineno} truncated (skipped)")
                continue
            raise RunDirError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise RunDirError(f"{path}:{lineno}: expected an object with an integer \"epoch\", got {line[:80]!r}")
        epochs.append(row)
    return epochs, notes


def _check_fraction(value, where: str) -> float:
    if value is None:
        return float("nan")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RunDirError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isnan(value) and not 0.0 <= value <= 1.0:
        raise RunDirError(f"{where}: mAP {value} is outside [0, 1]; runs store mAP as a fraction, not percent")
    return value


def _read_result(rd: RunDir, ident: dict) -> dict:
    result = read_json_object(rd.result)
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise RunDirError(f"{rd.result}: missing key(s) {', '.join(missing)}")
    for key in ("dataset", "method", "seed"):
        if result[key] != ident[key]:
            raise RunDirError(f"{rd.result}: {key} = {result[key]!r} but {rd.config} says {ident[key]!r}")
    for key in ("test_map", "best_val_map"):
        result[key] = _check_fraction(result[key], f"{rd.result}: {key}")
    groups = result.get("groups")
    if groups is not None:
        if not isinstance(groups, dict) or "All" not in groups:
            raise RunDirError(f"{rd.result}: \"groups\" must be an object with G1..Gn and All")
        result["groups"] = {g: _check_fraction(v, f"{rd.result}: groups.{g}") for g, v in groups.items()}
    return result


def load_run(path) -> Run:
    """Read one run directory; raise RunDirError naming the file for anything malformed."""
    rd = RunDir(path)
    if not rd.path.is_dir():
        raise RunDirError(f"{rd.path}: not a directory")
    if not rd.is_run():
        raise RunDirError(f"{rd.path}: not a run directory (none of {', '.join(RUN_FILES)}); pass the "
                          "directory the trainer wrote, or a directory above such directories")
    config = rd.read_config()
    ident = {}
    for key in ("dataset", "method", "seed"):
        if key not in config:
            raise RunDirError(f"{rd.config}: no top-level key {key!r}")
        value = config[key]
        # A config that nests the dataset section keeps its name under "name".
        if key == "dataset" and isinstance(value, dict) and "name" in value:
            value = value["name"]
        expected_type = int if key == "seed" else str
        if not isinstance(value, expected_type) or isinstance(value, bool):
            raise RunDirError(f"{rd.config}: {key!r} must be a {expected_type.__name__}, got {value!r}")
        ident[key] = value
    ident["method"] = method_id(ident["method"], config.get("boost_alpha"))
    protocol = config.get("protocol")
    result = _read_result(rd, ident) if rd.result.exists() else None
    epochs: list[dict] = []
    notes: list[str] = []
    if rd.metrics.is_file():
        epochs, notes = _read_metrics(rd.metrics, finished=result is not None)
        for row in epochs:
            if "val_map" in row:
                row["val_map"] = _check_fraction(row["val_map"], f"{rd.metrics}: epoch {row['epoch']} val_map")
    elif result is not None:
        notes.append("no metrics.jsonl")
    return Run(path=rd.path, config=config, dataset=ident["dataset"], method=ident["method"], seed=ident["seed"],
               protocol=None if protocol is None else str(protocol), epochs=epochs, result=result, notes=notes)


def find_run_dirs(paths) -> list[Path]:
    """Every run directory under ``paths``: each is a run directory or a directory with run directories
    below it (searched recursively, not into run directories themselves, nor into hidden directories)."""
    run_dirs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise RunDirError(f"{p}: no such directory")
        if not p.is_dir():
            raise RunDirError(f"{p}: is a file; pass a run directory or a directory of runs")
        if RunDir(p).is_run():
            run_dirs.append(p)
            continue
        found = []
        for root, dirs, _files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if RunDir(Path(root)).is_run():
                found.append(Path(root))
                dirs[:] = []
        if not found:
            raise RunDirError(f"{p}: not a run directory (none of {', '.join(RUN_FILES)}) and no run "
                              "directories below it")
        run_dirs.extend(found)
    seen: set[Path] = set()
    unique = []
    for d in run_dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            unique.append(d)
    return unique


def find_runs(paths) -> list[Run]:
    """``load_run`` of every run directory under ``paths`` (see ``find_run_dirs``)."""
    return [load_run(d) for d in find_run_dirs(paths)]
