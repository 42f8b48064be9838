"""Cached backbone features: extract them once, then train heads on them in seconds.

    python -m largeloss.train.features extract --data DIR --split train --arch efficientnet_lite0 \\
        --weights IMAGENET --image-size 224 --out FEATS/train.npy
    python -m largeloss.train.features extract --data DIR --split test  ... --out FEATS/test.npy
    python -m largeloss.train.features train --features-dir FEATS --config CFG.yaml [--config METHOD.yaml] \\
        [key=value ...]
    python -m largeloss.train.features train --features-dir FEATS resume=RUN_DIR

``train`` is the training loop of ``train/loop.py`` with ``FeatureSource``: a linear head on the outputs of a
frozen backbone computed ahead of time. Everything else is the end-to-end trainer's: the Config,
LabelStore and protocols, the 80/20 cut and training subset, the losses, LL-Cp corrections through the
LabelStore's generations, validation mAP after every epoch, the best epoch kept, early stop, one test
with the best head, checkpoints and exact resume (``resume=RUN_DIR`` continues after the last finished
epoch), the analyses (``analysis_entries > 0``) and the run directory (eval/rundir.py) that ``report``
reads, plus ``features.json``. What differs: only the head learns (at ``lr * head_lr_mult``, in float32),
the epoch order is ``np.random.default_rng([seed, epoch]).permutation(train_ids)``, there is no
augmentation (features of the unflipped image), and it runs in one process.

File format (docs/ANALYSIS.md): ``<split>.npy`` is a NumPy ``.npy`` array (N, D), float16 by default, whose
row i is sample id i of the split; each row is the global average pool of the backbone's last convolutional
map (``MultiLabelNet.features(images).mean((2, 3))``, exactly the head's input), for the image decoded and
squash-resized by the CPU loader in evaluation mode. ``<split>.json`` beside it says what produced it
(arch, weights and their sha256, image size, split, the dataset's manifest sha256, ...); it is written last
and is the mark of a complete file. ``train`` reads ``<train_split>.npy`` and ``<test_split>.npy`` from
``--features-dir`` and refuses files made from another dataset, backbone or image size than its config.
``extract --pooling none`` keeps the maps instead: ``<split>.npy`` is (N, D, h, w), the sidecar has
``"pooling": "none"`` and ``"map_size": [h, w]``, and the head applies ``MultiLabelNet``'s head to the map,
which is what BoostLU (``boost_alpha``) needs; pooled features refuse ``boost_alpha`` != 1.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..shards.progress import progress_bar
from .loop import make_accelerator, run
from .model import head_logits

FORMAT = "largeloss-features"
VERSION = 1
POOLINGS = ("gap", "none")
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
            progress: bool = True, pooling: str = "gap") -> dict[str, Any]:
    """Write ``out`` (N, D), or (N, D, h, w) with ``pooling="none"``, and its sidecar ``out`` with .json;
    returns the sidecar dict.

    ``batch_size`` defaults to 64 on a GPU and 4 on the CPU, where larger batches spend more time in page
    faults of fresh activation buffers than in convolutions."""
    from ..shards.loader import ShardLoader
    from ..shards.reader import open_dataset
    from .model import build_model, resolve_weights_file

    out = Path(out)
    if out.suffix != ".npy":
        raise FeaturesError(f"--out {out}: the features file must end in .npy (its sidecar is the .json beside it)")
    if dtype not in ("float16", "float32"):
        raise FeaturesError(f"--dtype must be float16 or float32, got {dtype!r}")
    if pooling not in POOLINGS:
        raise FeaturesError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
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
    bar = progress_bar(n, f"features {split}", "img", enabled=progress)
    try:
        with torch.no_grad():
            for images, ids in loader:
                f = model.features(images.to(dev)).float()
                f = (f.mean(dim=(2, 3)) if pooling == "gap" else f).cpu().numpy()
                ids = ids.numpy()
                if feats is None:
                    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, *f.shape[1:]))
                if seen[ids].any():
                    raise RuntimeError(f"features {split}: sample {ids[seen[ids]][0]} delivered twice by the loader")
                seen[ids] = True
                feats[ids] = f.astype(dtype)
                bar.update(len(ids))
        if not seen.all():
            raise RuntimeError(f"features {split}: {int((~seen).sum())} of {n} samples never came out of the loader "
                               f"(e.g. id {int(np.flatnonzero(~seen)[0])}); run `ingest verify {data}`")
        if feats is None:
            raise FeaturesError(f"{data}: split {split!r} has no samples")
        dim, map_size = int(feats.shape[1]), [int(v) for v in feats.shape[2:]]
        feats.flush()
        del feats
        os.replace(tmp, out)
    finally:
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
        # gap: the mean over the last conv map, the head's input in MultiLabelNet.forward; none: the map itself
        "pooling": pooling,
        **({"map_size": map_size} if pooling == "none" else {}),
        "dataset": ds.manifest.dataset,
        "dataset_dir": str(Path(data).resolve()),
        "manifest_sha256": sha256_file(Path(data) / "manifest.json"),
        "rows": "row i = sample id i of the split",
        "preprocess": "shards.jpeg.decode_image (squash resize, no flip), MultiLabelNet.normalize",
        "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1),
    }
    from ..shards.format import write_json_atomic

    write_json_atomic(sidecar_path(out), json.dumps(meta, indent=1))
    return meta


def read_features(npy: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The (N, D) array (memory-mapped, read-only) and its sidecar, checked against each other."""
    npy = Path(npy)
    side = sidecar_path(npy)
    if not npy.is_file():
        raise FeaturesError(f"{npy}: not found; write it with "
                            f"`python -m largeloss.train.features extract ... --out {npy}`")
    if not side.is_file():
        raise FeaturesError(f"{side}: sidecar not found; {npy} is incomplete or not from "
                            "`largeloss.train.features extract`: extract it again")
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FeaturesError(f"{side}:{e.lineno}: not valid JSON ({e.msg}); extract the features again") from None
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise FeaturesError(f"{side}: not a {FORMAT} sidecar (missing {missing or 'format'}); "
                            "extract the features again")
    if meta["version"] != VERSION:
        raise FeaturesError(f"{side}: version {meta['version']}, this code reads {VERSION}; extract the features again")
    arr = np.load(npy, mmap_mode="r")
    map_size = meta.get("map_size", []) if meta["pooling"] == "none" else []  # (h, w) of feature maps
    shape = (meta["num_samples"], meta["dim"], *map_size)
    if arr.shape != shape or str(arr.dtype) != meta["dtype"]:
        raise FeaturesError(f"{npy}: array {arr.shape} {arr.dtype}, the sidecar says {shape} {meta['dtype']}; "
                            "extract the features again")
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


class FeatureHead(torch.nn.Module):
    """The linear head of a MultiLabelNet on cached features; its state dict (``head.weight``, ``head.bias``) is
    a MultiLabelNet's head, as the pointing game expects of a head-only run. On pooled rows [B, D] it is the
    linear layer; on feature maps [B, D, h, w] (``--pooling none``) it is ``MultiLabelNet``'s head, BoostLU
    included (``boost_alpha``)."""

    def __init__(self, dim: int, num_classes: int, boost_alpha: float = 1.0):
        super().__init__()
        self.head = torch.nn.Linear(dim, num_classes)
        self.boost_alpha = float(boost_alpha)

    def forward(self, features: torch.Tensor, frozen_backbone: bool = True) -> torch.Tensor:
        # float32 whatever the run's mixed precision: the head is all there is to compute
        with torch.autocast(features.device.type, enabled=False):
            if features.dim() == 4:
                return head_logits(self.head, features, self.boost_alpha)
            return self.head(features)


class FeatureBatches:
    """Batches ``(float32 [B, D] feature rows, int64 [B] sample ids)`` of ``sample_ids`` in order, or, with
    ``shuffle_seed``, in the order ``np.random.default_rng([shuffle_seed, epoch]).permutation(sample_ids)``:
    a pure function of (seed, epoch)."""

    def __init__(self, feats: np.ndarray, sample_ids: np.ndarray, batch_size: int, shuffle_seed: int | None = None):
        self.feats, self.sample_ids, self.batch_size, self.shuffle_seed = feats, sample_ids, batch_size, shuffle_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.sample_ids) / self.batch_size)

    def __iter__(self):
        order = self.sample_ids
        if self.shuffle_seed is not None:
            order = np.random.default_rng([self.shuffle_seed, self.epoch]).permutation(order)
        for start in range(0, len(order), self.batch_size):
            ids = order[start:start + self.batch_size]
            yield torch.from_numpy(np.asarray(self.feats[ids], dtype=np.float32)), torch.from_numpy(ids)


class FeatureSource:
    """Cached features under a linear head: the source of ``train/loop.py`` for ``train`` (one process)."""

    log_prefix = "[features]"

    def __init__(self, cfg, ds, features_dir: str | os.PathLike):
        features_dir = Path(features_dir)
        manifest_sha = sha256_file(Path(cfg.data) / "manifest.json")
        self.feats, metas = {}, {}
        for split in dict.fromkeys((cfg.train_split, cfg.test_split)):
            path = features_dir / f"{split}.npy"
            self.feats[split], metas[split] = read_features(path)
            check_features(metas[split], path, cfg, ds, split, manifest_sha)
        dims = {metas[s]["dim"] for s in metas}
        if len(dims) != 1:
            raise FeaturesError(f"{features_dir}: the splits' features have different widths {sorted(dims)}")
        self.dim = dims.pop()
        poolings = {metas[s]["pooling"] for s in metas}
        if len(poolings) != 1:
            raise FeaturesError(f"{features_dir}: the splits' features were pooled differently {sorted(poolings)}")
        if cfg.boost_alpha != 1.0 and poolings != {"none"}:
            raise FeaturesError(f"{features_dir}: boost_alpha={cfg.boost_alpha} (BoostLU) boosts the class activation "
                                "maps, which pooled features no longer have; extract feature maps with "
                                "`--pooling none` into another folder and pass that as --features-dir")
        self.cfg = cfg
        self.result_extra = {"trainer": "features", "features_dir": str(features_dir.resolve())}
        self.run_record = {"features_dir": str(features_dir.resolve()), "splits": metas}

    def accelerator(self):
        accelerator = make_accelerator(self.cfg)
        if accelerator.num_processes > 1:
            raise FeaturesError("`python -m largeloss.train.features train` runs in one process; start it with "
                                "python, not accelerate launch")
        return accelerator

    def model(self, num_classes: int):
        head, cfg = FeatureHead(self.dim, num_classes, self.cfg.boost_alpha), self.cfg
        # the head's parameter group of the end-to-end trainer (train/model.py param_groups)
        return head, [{"params": list(head.parameters()), "lr": cfg.lr * cfg.head_lr_mult,
                       "weight_decay": cfg.weight_decay, "name": "head"}]

    def frozen_backbone(self, epoch: int) -> bool:
        return True

    def train_loader(self, accelerator, sample_ids: np.ndarray) -> FeatureBatches:
        return FeatureBatches(self.feats[self.cfg.train_split], sample_ids, self.cfg.batch_size, self.cfg.seed)

    def eval_loader(self, accelerator, split: str, sample_ids: np.ndarray | None) -> FeatureBatches:
        ids = np.arange(len(self.feats[split])) if sample_ids is None else sample_ids
        return FeatureBatches(self.feats[split], ids, self.cfg.eval_batch_size)

    def memo_loader(self, sample_ids: np.ndarray) -> FeatureBatches:
        return FeatureBatches(self.feats[self.cfg.train_split], sample_ids, self.cfg.eval_batch_size)

    def write_run_files(self, run) -> None:
        run.write_json(run.features, self.run_record)


def train_on_features(cfg, features_dir: str | os.PathLike) -> dict[str, Any]:
    """Train a linear head on cached features under ``cfg`` (a resolved train.config.Config); see the module
    docstring."""
    return run(cfg, lambda cfg, ds: FeatureSource(cfg, ds, features_dir))


# ------------------------------------------------------------------------------------------------- CLI


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m largeloss.train.features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser("extract", help="write <split>.npy + <split>.json of a dataset split")
    e.add_argument("--data", required=True, metavar="DIR", help="dataset directory written by `ingest`")
    e.add_argument("--split", default="train")
    e.add_argument("--arch", default="efficientnet_lite0")
    e.add_argument("--weights", default="IMAGENET")
    e.add_argument("--image-size", type=_positive, default=224)
    e.add_argument("--out", required=True, metavar="FILE.npy")
    e.add_argument("--batch-size", type=_positive, default=None, help="default 64 on a GPU, 4 on the CPU")
    e.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    e.add_argument("--pooling", choices=POOLINGS, default="gap",
                   help="gap: (N, D) pooled rows; none: (N, D, h, w) feature maps, for BoostLU (boost_alpha)")
    e.add_argument("--num-workers", type=int, default=0, help="loader worker processes (default 0: decode in-process)")
    e.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    e.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("train", help="train a linear head on cached features (trainer config + key=value)")
    t.add_argument("--features-dir", required=True, metavar="DIR", help="folder with <split>.npy + <split>.json")
    return p


def main(argv=None) -> int:
    from .main import bad_input_errors, parse_args

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "extract":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            meta = extract(args.data, args.split, args.arch, args.weights, args.image_size, args.out,
                           batch_size=args.batch_size, dtype=args.dtype, num_workers=args.num_workers,
                           device=args.device, progress=not args.no_progress, pooling=args.pooling)
            shape = " x ".join(map(str, [meta["num_samples"], meta["dim"], *meta.get("map_size", [])]))
            print(f"[features] {args.out}: {shape} {meta['dtype']} "
                  f"({meta['seconds']} s)")
            return 0
        cfg = parse_args(rest)
        train_on_features(cfg, args.features_dir)
    except (FeaturesError, FileNotFoundError, *bad_input_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
