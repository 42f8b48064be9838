"""Cached backbone features: extract them once, then train heads on them in seconds.

    python -m train.features extract --data DIR --split train --arch efficientnet_lite0 --weights IMAGENET \\
        --image-size 224 --out FEATS/train.npy
    python -m train.features extract --data DIR --split test  ... --out FEATS/test.npy
    python -m train.features train --features-dir FEATS --config CFG.yaml [--config METHOD.yaml] [key=value ...]
    python -m train.features train --features-dir FEATS resume=RUN_DIR

``train`` is the trainer of ``train/loop.py`` with a frozen backbone whose outputs were computed ahead of
time: the same Config, LabelStore and protocols, the same 80/20 cut and training subset
(``train.loop.split_train_val``), the same losses (``train.losses.compute_loss``), LL-Cp corrections through
the LabelStore's generations, validation mAP after every epoch, the best epoch kept, early stop, one test
with the best head, and the same run-directory files (config.yaml, metrics.jsonl, result.json,
checkpoints/best/) so that ``report`` reads its runs like any other. What differs: only the linear head
learns (at ``lr * head_lr_mult``), there is no augmentation (features of the unflipped image), and it runs
in one process. ``analysis_entries > 0`` turns on the analyses: the memorisation tracker (Table 1) and
the precision of modification (Figure 4) in metrics.jsonl.

File format (docs/ANALYSIS.md): ``<split>.npy`` is a NumPy ``.npy`` array (N, D), float16 by default, whose
row i is sample id i of the split; each row is the global average pool of the backbone's last convolutional
map (``MultiLabelNet.features(images).mean((2, 3))``, exactly the head's input), for the image decoded and
squash-resized by the CPU loader in evaluation mode. ``<split>.json`` beside it says what produced it
(arch, weights and their sha256, image size, split, the dataset's manifest sha256, ...); it is written last
and is the mark of a complete file. ``train`` reads ``<train_split>.npy`` and ``<test_split>.npy`` from
``--features-dir`` and refuses files made from another dataset, backbone or image size than its config.

A resumed run (``resume=RUN_DIR``) restarts from epoch 1 in that directory: a head on cached features
trains in seconds and is deterministic, so nothing is kept from the interrupted attempt.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largeloss.ingest.argtypes import positive_int

FORMAT = "largeloss-features"
VERSION = 1
SIDECAR_KEYS = ("format", "version", "split", "num_samples", "dim", "dtype", "arch", "weights", "weights_sha256",
                "image_size", "pooling", "dataset", "manifest_sha256")


class FeaturesError(ValueError):
    """Bad or mismatched feature files; the message names the file and the fix."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar_path(npy: str | os.PathLike) -> Path:
    return Path(npy).with_suffix(".json")


# --------------------------------------------------------------------------------------------- extract


def extract(data: str | os.PathLike, split: str, arch: str, weights: str, image_size: int, out: str | os.PathLike,
            *, batch_size: int | None = None, dtype: str = "float16", num_workers: int = 0, device: str | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Write ``out`` (N, D) and its sidecar ``out`` with .json; returns the sidecar dict.

    ``batch_size`` defaults to 64 on a GPU and 4 on the CPU, where larger batches spend more time in page
    faults of fresh activation buffers than in convolutions (1000 images at 224 px: 67 s of CPU with 16,
    40 s with 4)."""
    from largeloss.shards.loader import ShardLoader
    from largeloss.shards.reader import open_dataset
    from largeloss.train.model import build_model, resolve_weights_file

    out = Path(out)
    if out.suffix != ".npy":
        raise FeaturesError(f"--out {out}: the features file must end in .npy (its sidecar is the .json beside it)")
    if dtype not in ("float16", "float32"):
        raise FeaturesError(f"--dtype must be float16 or float32, got {dtype!r}")
    ds = open_dataset(data)
    n = ds.num_samples(split)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(arch, ds.num_classes, weights).to(dev).eval()
    batch_size = batch_size or (64 if dev.type == "cuda" else 4)
    wfile = resolve_weights_file(arch, weights)
    loader = ShardLoader(data, split, batch_size=batch_size, image_size=image_size, train=False,
                         num_workers=num_workers)
    loader.set_epoch(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    feats = None
    seen = np.zeros(n, dtype=bool)
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"features {split}", unit="img", dynamic_ncols=True)
    try:
        with torch.no_grad():
            for images, ids in loader:
                f = model.features(images.to(dev)).float().mean(dim=(2, 3)).cpu().numpy()
                ids = ids.numpy()
                if feats is None:
                    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, f.shape[1]))
                if seen[ids].any():
                    raise RuntimeError(f"features {split}: sample {ids[seen[ids]][0]} delivered twice by the loader")
                seen[ids] = True
                feats[ids] = f.astype(dtype)
                if bar is not None:
                    bar.update(len(ids))
        if not seen.all():
            raise RuntimeError(f"features {split}: {int((~seen).sum())} of {n} samples never came out of the loader "
                               f"(e.g. id {int(np.flatnonzero(~seen)[0])}); run `ingest verify {data}`")
        if feats is None:
            raise FeaturesError(f"{data}: split {split!r} has no samples")
        dim = int(feats.shape[1])
        feats.flush()
        del feats
        os.replace(tmp, out)
    finally:
        if bar is not None:
            bar.close()
        if tmp.exists():
            tmp.unlink()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "split": split,
        "num_samples": n,
        "dim": dim,
        "dtype": dtype,
        "arch": arch,
        "weights": weights,
        "weights_sha256": None if wfile is None else sha256_file(wfile),
        "image_size": int(image_size),
        "pooling": "gap",  # mean over the last conv map, the head's input in MultiLabelNet.forward
        "dataset": ds.manifest.dataset,
        "dataset_dir": str(Path(data).resolve()),
        "manifest_sha256": sha256_file(Path(data) / "manifest.json"),
        "rows": "row i = sample id i of the split",
        "preprocess": "shards.jpeg.decode_image (squash resize, no flip), MultiLabelNet.normalize",
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
    }
    from largeloss.shards.format import write_json_atomic

    write_json_atomic(sidecar_path(out), json.dumps(meta, indent=1))
    return meta


def read_features(npy: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The (N, D) array (memory-mapped, read-only) and its sidecar, checked against each other."""
    npy = Path(npy)
    side = sidecar_path(npy)
    if not npy.is_file():
        raise FeaturesError(f"{npy}: not found; write it with `python -m train.features extract ... --out {npy}`")
    if not side.is_file():
        raise FeaturesError(f"{side}: sidecar not found; {npy} is incomplete or not from `train.features extract`: "
                            "extract it again")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FeaturesError(f"{side}:{e.lineno}: not valid JSON ({e.msg}); extract the features again") from None
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise FeaturesError(f"{side}: not a {FORMAT} sidecar (missing {missing or 'format'}); extract the features again")
    if meta["version"] != VERSION:
        raise FeaturesError(f"{side}: version {meta['version']}, this code reads {VERSION}; extract the features again")
    arr = np.load(npy, mmap_mode="r")
    if arr.shape != (meta["num_samples"], meta["dim"]) or str(arr.dtype) != meta["dtype"]:
        raise FeaturesError(f"{npy}: array {arr.shape} {arr.dtype}, the sidecar says ({meta['num_samples']}, "
                            f"{meta['dim']}) {meta['dtype']}; extract the features again")
    return arr, meta


def check_features(meta: dict[str, Any], where: Path, cfg, ds, split: str, manifest_sha: str) -> None:
    """Refuse features that do not belong to this config's dataset split, backbone and image size."""
    problems = []
    if meta["split"] != split:
        problems.append(f"split {meta['split']!r}, the run needs {split!r}")
    if meta["manifest_sha256"] != manifest_sha:
        problems.append(f"manifest sha256 {meta['manifest_sha256'][:12]}.. differs from {cfg.data}/manifest.json "
                        f"({manifest_sha[:12]}..): another dataset or another ingest of it")
    if meta["num_samples"] != ds.num_samples(split):
        problems.append(f"{meta['num_samples']} samples, {cfg.data} split {split!r} has {ds.num_samples(split)}")
    for key in ("arch", "weights", "image_size"):
        if meta[key] != getattr(cfg, key):
            problems.append(f"{key}={meta[key]!r} but the config says {key}={getattr(cfg, key)!r} "
                            f"(set {key}={meta[key]} or extract again)")
    if problems:
        raise FeaturesError(f"{where}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------- train


def _scores(head: torch.nn.Module, feats: np.ndarray, ids: np.ndarray, device, chunk: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            x = torch.from_numpy(np.asarray(feats[ids[s:s + chunk]], dtype=np.float32)).to(device)
            out.append(torch.sigmoid(head(x)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, head.out_features), np.float32)


def _logits(head: torch.nn.Module, feats: np.ndarray, ids: np.ndarray, device, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            x = torch.from_numpy(np.asarray(feats[ids[s:s + chunk]], dtype=np.float32)).to(device)
            out.append(head(x).cpu().numpy())
    return ids, np.concatenate(out)


def _evaluate(head, feats, ids, store, cfg, device):
    from largeloss.eval import metrics
    from largeloss.train.loop import labels_as_int8

    scores = _scores(head, feats, ids, device, cfg.eval_batch_size)
    target, unknown = store.targets(ids)
    return metrics.mean_average_precision(scores, labels_as_int8(target, unknown), convention=cfg.map_convention)


def _save_head(head: torch.nn.Module, run_dir: Path, info: dict) -> None:
    """checkpoints/best/head.safetensors (keys head.weight / head.bias: the head of a MultiLabelNet) + best.json."""
    from safetensors.torch import save_file

    from largeloss.shards.format import fsync_dir

    cdir = run_dir / "checkpoints"
    tmp = cdir / ".tmp-best"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              str(tmp / "head.safetensors"))
    (tmp / "best.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    best = cdir / "best"
    if best.exists():
        shutil.rmtree(best)
    os.replace(tmp, best)
    fsync_dir(cdir)


def _clear_run_dir(run_dir: Path) -> None:
    """A restarted run starts from nothing: drop what the interrupted attempt wrote (not config.yaml)."""
    for name in ("metrics.jsonl", "result.json"):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("checkpoints", "labels", "analysis"):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)


def train_on_features(cfg, features_dir: str | os.PathLike) -> dict[str, Any]:
    """Train a linear head on cached features under ``cfg`` (a resolved train.config.Config); see the module docstring."""
    from largeloss.eval.analysis import MemorizationTracker, PrecisionTracker
    from largeloss.shards.format import write_json_atomic
    from largeloss.shards.labelstore import LabelStore
    from largeloss.shards.reader import open_dataset
    from largeloss.train.config import loss_config, to_yaml
    from largeloss.train.losses import compute_loss
    from largeloss.train.loop import seed_everything, split_train_val

    features_dir = Path(features_dir)
    ds = open_dataset(cfg.data)
    k = ds.num_classes
    dataset_name = cfg.dataset or ds.manifest.dataset
    cfg = dataclasses.replace(cfg, dataset=dataset_name)
    manifest_sha = sha256_file(Path(cfg.data) / "manifest.json")
    feats, metas = {}, {}
    for split in dict.fromkeys((cfg.train_split, cfg.test_split)):
        path = features_dir / f"{split}.npy"
        feats[split], metas[split] = read_features(path)
        check_features(metas[split], path, cfg, ds, split, manifest_sha)
    dims = {metas[s]["dim"] for s in metas}
    if len(dims) != 1:
        raise FeaturesError(f"{features_dir}: the splits' features have different widths {sorted(dims)}")
    dim = dims.pop()

    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.out) / (cfg.run_name or f"{dataset_name}-{cfg.method}-s{cfg.seed}")
    if cfg.resume:
        print(f"[features] {run_dir}: cached-feature runs restart from epoch 1 when resumed", flush=True)
        _clear_run_dir(run_dir)
    elif (run_dir / "config.yaml").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass resume={run_dir} to redo it, or another run_name/out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    write_json_atomic(run_dir / "features.json", json.dumps(
        {"features_dir": str(features_dir.resolve()), "splits": metas}, indent=1))

    train_ids, val_ids = split_train_val(ds.num_samples(cfg.train_split), cfg)
    labels_path = ds.labels_path(cfg.train_split)
    train_store = LabelStore(labels_path, k, cfg.protocol, seed=cfg.split_seed, subset_ids=train_ids,
                             corrections_dir=run_dir / "labels")
    unlisted = ds.manifest.splits[cfg.train_split].unlisted
    val_protocol = ("full" if unlisted == "negative" else "given") if cfg.val_labels == "clean" else cfg.protocol
    val_store = LabelStore(labels_path, k, val_protocol, seed=cfg.split_seed, subset_ids=val_ids)
    test_unlisted = ds.manifest.splits[cfg.test_split].unlisted
    test_store = LabelStore(ds.labels_path(cfg.test_split), k, "full" if test_unlisted == "negative" else "given")
    test_ids = np.arange(ds.num_samples(cfg.test_split))

    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    seed_everything(cfg.seed)
    head = torch.nn.Linear(dim, k).to(device)
    lr = cfg.lr * cfg.head_lr_mult  # the head's learning rate in the end-to-end trainer
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    loss_cfg = loss_config(cfg)
    analysis = cfg.analysis_entries > 0
    memo = (MemorizationTracker(train_store, train_ids, cfg.analysis_entries, cfg.seed, run_dir / "analysis")
            if analysis else None)
    precision = PrecisionTracker(train_store) if analysis else None
    train_feats = feats[cfg.train_split]
    print(f"[features] {dataset_name}: {k} classes, train {len(train_ids)} / val {len(val_ids)} / test "
          f"{len(test_ids)}; method {cfg.method} (delta_rel {cfg.delta_rel}); head {dim}->{k} on {device}; "
          f"run dir {run_dir}", flush=True)

    best_map, best_epoch, stopped_early = -math.inf, 0, False
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        # the epoch's order is a pure function of (seed, epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(train_ids)
        n_steps = math.ceil(len(order) / cfg.batch_size)
        if cfg.max_steps_per_epoch > 0:
            n_steps = min(n_steps, cfg.max_steps_per_epoch)
        t0, loss_sum, n_modified, seen = time.time(), 0.0, 0, 0
        for step in range(n_steps):
            ids = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = torch.from_numpy(np.asarray(train_feats[ids], dtype=np.float32)).to(device)
            target, unknown = train_store.targets(ids)
            out = compute_loss(head(x), target.to(device), unknown.to(device), epoch, loss_cfg)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            if out.num_modified > 0:
                rows, cols = torch.nonzero(out.modified, as_tuple=True)
                if cfg.method == "ll_cp":
                    train_store.append_corrections(epoch, ids[rows.cpu().numpy()], cols.cpu().numpy())
            if precision is not None:
                precision.update(epoch, ids, out.modified)
            loss_sum += float(out.loss.detach())
            n_modified += out.num_modified
            seen += len(ids)
        train_time = time.time() - t0
        if cfg.method == "ll_cp":
            train_store.flush_corrections(epoch)
            train_store.merge_corrections(epoch, 1)
            train_store.use_generation(epoch)
            train_store.remove_generations(keep={train_store.generation})
        head.eval()
        if memo is not None:
            memo.score_epoch(epoch, lambda image_ids: _logits(head, train_feats, image_ids, device, cfg.eval_batch_size))
        val_map = float(_evaluate(head, train_feats, val_ids, val_store, cfg, device).map)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(n_steps, 1),
            "val_map": val_map,
            "modified": int(n_modified),
            "images": int(seen),
            "time_s": round(train_time, 3),
            "images_per_s": round(seen / max(train_time, 1e-9), 1),
            "label_generation": train_store.generation,
            "frozen_backbone": True,
        }
        if precision is not None:
            record.update(precision.end_epoch(epoch))
        improved = best_epoch == 0 or val_map > best_map  # the first epoch is best even when its mAP is NaN
        if improved:
            best_map, best_epoch = val_map, epoch
            _save_head(head, run_dir, {"epoch": epoch, "val_map": val_map})
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[features] epoch {epoch}: loss {record['train_loss']:.4f}  val mAP {100 * val_map:.2f}"
              f"{'  (best)' if improved else ''}  modified {record['modified']}", flush=True)
        if 100 * val_map < 100 * best_map - cfg.early_stop_drop:
            print(f"[features] early stop: val mAP {100 * val_map:.2f} is more than {cfg.early_stop_drop} points "
                  f"below the best {100 * best_map:.2f}", flush=True)
            stopped_early = True
            break

    if memo is not None:
        memo.finish(title=f"{dataset_name} {cfg.method} seed {cfg.seed}")
    from largeloss.train.checkpoint import load_best_weights

    state = load_best_weights(run_dir)
    head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    head.eval()
    test_res = _evaluate(head, feats[cfg.test_split], test_ids, test_store, cfg, device)
    from largeloss.train.checkpoint import result_record

    result = result_record(cfg, dataset_name, ds.manifest, best_epoch, best_map, test_res, stopped_early, 1)
    result.update({"trainer": "features", "features_dir": str(features_dir.resolve())})
    write_json_atomic(run_dir / "result.json", json.dumps(result, indent=1))
    train_store.close()
    print(f"[features] test mAP {100 * result['test_map']:.2f} with the head of epoch {best_epoch} -> "
          f"{run_dir / 'result.json'}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser("extract", help="write <split>.npy + <split>.json of a dataset split")
    e.add_argument("--data", required=True, metavar="DIR", help="dataset directory written by `ingest`")
    e.add_argument("--split", default="train")
    e.add_argument("--arch", default="efficientnet_lite0")
    e.add_argument("--weights", default="IMAGENET")
    e.add_argument("--image-size", type=positive_int, default=224)
    e.add_argument("--out", required=True, metavar="FILE.npy")
    e.add_argument("--batch-size", type=positive_int, default=None, help="default 64 on a GPU, 4 on the CPU")
    e.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    e.add_argument("--num-workers", type=int, default=0, help="loader worker processes (default 0: decode in-process)")
    e.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    e.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("train", help="train a linear head on cached features (trainer config + key=value)")
    t.add_argument("--features-dir", required=True, metavar="DIR", help="folder with <split>.npy + <split>.json")
    return p


def main(argv=None) -> int:
    from largeloss.train.config import ConfigError
    from largeloss.train.model import WeightsError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "extract":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            meta = extract(args.data, args.split, args.arch, args.weights, args.image_size, args.out,
                           batch_size=args.batch_size, dtype=args.dtype, num_workers=args.num_workers,
                           device=args.device, progress=not args.no_progress)
            print(f"[features] {args.out}: {meta['num_samples']} x {meta['dim']} {meta['dtype']} "
                  f"({meta['seconds']} s)")
            return 0
        from largeloss.train.main import parse_args

        cfg = parse_args(rest)
        train_on_features(cfg, args.features_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FeaturesError, WeightsError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
