"""Pointing game (paper Table 4) of trained runs: load each run's best model, play eval/pointing.py's game.

    python -m largeloss.train.pointing RUN_DIR [RUN_DIR ...] [--data DIR] [--split test] [--overlays N]
        [--mode upsample|grid] [--max-images N]

The game (CAM, point, hit) is defined in eval/pointing.py. Here: every run's best weights
(``checkpoints/best``); a run trained on cached features (``train.features``) keeps only its head, and its
CAMs use the frozen backbone of its config (``arch`` / ``weights``); runs that share that backbone and input
size are evaluated in one pass over the images. Writes ``RUN_DIR/pointing.json`` (fractions in [0, 1];
``report`` prints percent) and, with ``--overlays N``, PNGs of the first N images under ``RUN_DIR/pointing/``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..eval.pointing import MODES, PointingError, Tally, batches, class_activation_maps, draw_overlays, score_batch
from ..eval.rundir import RunDir, RunDirError, find_run_dirs


@dataclass
class RunModel:
    path: Path
    config: dict[str, Any]
    head_only: bool  # trained on cached features: the backbone is the pretrained one of the config
    state: dict[str, torch.Tensor]


def load_run_model(run_dir: str | os.PathLike) -> RunModel:
    from .checkpoint import CheckpointError, load_best_weights

    run = RunDir(run_dir)
    if not run.config.is_file():
        raise PointingError(f"{run.config}: not found; pass a run directory written by the trainer")
    config = run.read_config()
    if not all(k in config for k in ("arch", "weights", "image_size", "data")):
        raise PointingError(f"{run.config}: needs arch, weights, image_size and data")
    try:
        state = load_best_weights(run)
    except CheckpointError as e:
        raise PointingError(str(e)) from None
    if "head.weight" not in state:
        raise PointingError(f"{run.path}: the best weights hold no head.weight; not a MultiLabelNet checkpoint")
    head_only = all(k.startswith("head.") for k in state)
    return RunModel(run.path, config, head_only, state)


def _build(run: RunModel, num_classes: int, device) -> torch.nn.Module:
    from .model import build_model

    cfg = run.config
    if run.head_only:
        model = build_model(cfg["arch"], num_classes, cfg["weights"])
        missing, unexpected = model.load_state_dict(run.state, strict=False)
        if unexpected or any(k.startswith("head.") for k in missing):
            raise PointingError(f"{run.path}: head weights do not fit {cfg['arch']} with {num_classes} classes "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    else:
        model = build_model(cfg["arch"], num_classes, "none")
        try:
            model.load_state_dict(run.state)
        except RuntimeError as e:
            raise PointingError(
                f"{run.path}: best weights do not fit {cfg['arch']} with {num_classes} classes: {e}"
            ) from None
    return model.to(device).eval()


def _groups(runs: list[RunModel]) -> list[list[RunModel]]:
    """Runs that can share one backbone pass: head-only runs with the same frozen backbone and input size."""
    groups: dict[tuple, list[RunModel]] = {}
    for r in runs:
        key = (("frozen", r.config["arch"], r.config["weights"], int(r.config["image_size"])) if r.head_only
               else ("run", str(r.path)))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def pointing_game(run_dirs, *, data: str | None = None, split: str = "test", mode: str = "upsample",
                  overlays: int = 0, batch_size: int = 16, max_images: int | None = None,
                  device: str | None = None, write: bool = True) -> dict[str, dict[str, Any]]:
    """Play the game for every run; returns {run dir: pointing.json content} and writes the files."""
    from ..shards.reader import open_dataset

    if mode not in MODES:
        raise PointingError(f"--mode must be one of {MODES}, got {mode!r}")
    runs = [load_run_model(p) for p in run_dirs]
    if not runs:
        raise PointingError("no run directories given")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results: dict[str, dict[str, Any]] = {}
    for group in _groups(runs):
        first = group[0]
        data_dir = data or first.config["data"]
        if not (Path(data_dir) / "manifest.json").is_file():
            raise PointingError(f"{first.path}: dataset {data_dir} not found; pass --data DIR")
        ds = open_dataset(data_dir)
        k = ds.num_classes
        if split not in ds.split_names:
            raise PointingError(f"{data_dir}: no split {split!r} (it has {ds.split_names})")
        size = int(first.config["image_size"])
        backbone = _build(first, k, dev)
        heads = [(r, (r.state["head.weight"] if r.head_only else backbone.head.weight).detach().float().to(dev))
                 for r in group]
        tallies = {str(r.path): Tally(k) for r in group}
        drawn = 0
        if overlays and write:
            for r in group:
                RunDir(r.path).pointing_overlays.mkdir(exist_ok=True)
        with torch.no_grad():
            for images, items in batches(ds, split, size, batch_size, max_images):
                fmap = backbone.features(images.to(dev)).float()
                for r, weight in heads:
                    cams = class_activation_maps(fmap, weight)
                    pts, hits_of = score_batch(cams, items, size, mode, tallies[str(r.path)])
                    if write and drawn < overlays:
                        draw_overlays(RunDir(r.path).pointing_overlays, images, cams, items, pts, hits_of, size,
                                      ds.class_names, limit=overlays - drawn)
                drawn += len(items)
        for r in group:
            res = tallies[str(r.path)].result(ds.class_names)
            res.update({"run": str(r.path), "data": str(data_dir), "split": split, "mode": mode, "image_size": size,
                        "max_images": max_images, "head_only": r.head_only,
                        "point": "CAM maximum (upsampled to SxS unless mode=grid), pixel centre mapped to the "
                                 "original image; hit if inside any box of the class, edges included"})
            results[str(r.path)] = res
            if write:
                RunDir(r.path).write_json(RunDir(r.path).pointing, res)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m largeloss.train.pointing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories with runs below")
    p.add_argument("--data", help="dataset directory (default: the one in each run's config.yaml)")
    p.add_argument("--split", default="test")
    p.add_argument("--mode", choices=MODES, default="upsample")
    p.add_argument("--overlays", type=int, default=0, metavar="N", help="save CAM overlays of the first N images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="evaluate only the first N images with boxes")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    from ..shards.format import FormatError

    try:
        results = pointing_game(find_run_dirs(args.runs), data=args.data, split=args.split, mode=args.mode,
                                overlays=args.overlays, batch_size=args.batch_size, max_images=args.max_images,
                                device=args.device)
    except (PointingError, RunDirError, FormatError, OSError) as e:
        print(f"pointing: error: {e}", file=sys.stderr)
        return 1
    for path, res in results.items():
        acc = res["pointing_accuracy"]
        shown = "n/a" if acc is None or math.isnan(acc) else f"{100 * acc:.1f}"
        print(f"{path}: pointing game {shown} % ({res['hits']} hits, {res['misses']} misses, "
              f"{res['images_evaluated']} images) -> {RunDir(path).pointing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
