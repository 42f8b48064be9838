"""Fuzz: random byte changes in every kind of file the trainer trusts, and what each one ends in.

Makes a small dataset (`ingest demo`, 64 + 24 images) and a finished 2-epoch LL-Cp run on it (small_cnn), then,
per kind of file, runs ``--trials`` trials: one byte of one file of that kind (chosen with a seeded RNG) is
XORed with a random non-zero value, the check of that kind runs, and the byte is restored. Each trial ends in

- ``verify``: ``ingest verify`` (shards.reader.verify) reports problems (dataset files);
- ``error``: a one-line error naming a file under the dataset or run directory (label generations:
  LabelStore.use_generation; checkpoint files: what resume and the test evaluation read);
- ``no effect``: no error, and everything training uses is equal to the original: the labels of every split,
  every sample's decoded pixels, the LL-Cp corrections, the checkpoint's files and state (a change in JSON
  whitespace, or in a manifest field nothing reads);
- ``SILENT``: no error and something training uses changed, or ``crash``: an exception that is not a one-line
  error naming a file. The default test (tests/test_fuzz.py) fails on either.

    python tests/bench/fuzz.py --trials 200          # per kind; prints the outcome counts
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if "largeloss" not in sys.modules:  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["largeloss"] = _pkg

from largeloss.eval.rundir import RunDir  # noqa: E402
from largeloss.shards.format import FormatError  # noqa: E402
from largeloss.shards.jpeg import decode_rgb  # noqa: E402
from largeloss.shards.labels import read_labels  # noqa: E402
from largeloss.shards.labelstore import LabelStore  # noqa: E402
from largeloss.shards.reader import open_dataset, verify  # noqa: E402
from largeloss.train import checkpoint as ckpt  # noqa: E402
from largeloss.train.checkpoint import CheckpointError  # noqa: E402

KINDS = ("tar", "idx", "labels.arrow", "manifest.json", "label generation", "checkpoint")
OUTCOMES = ("verify", "error", "no effect", "SILENT", "crash")
TINY = ["arch=small_cnn", "weights=none", "image_size=64", "batch_size=8", "eval_batch_size=16", "num_workers=0",
        "progress=false", "lr=3e-3", "head_lr_mult=1", "early_stop_drop=100"]


def make_inputs(tmp: Path) -> tuple[Path, Path]:
    """The dataset and the finished LL-Cp run the trials change."""
    from largeloss.ingest.cli import main as ingest_main
    from largeloss.train.main import main as train_main

    data, out = tmp / "data", tmp / "runs"
    assert ingest_main(["demo", "--out", str(data), "--n-train", "64", "--n-test", "24", "--no-progress"]) == 0
    methods = ROOT / "configs" / "methods"
    assert train_main(["--config", str(ROOT / "configs/demo.yaml"), "--config", str(methods / "ll_cp.yaml"),
                       f"data={data}", f"out={out}", "epochs=2", "max_steps_per_epoch=2", "run_name=run",
                       *TINY]) == 0
    return data, out / "run"


def files_of(kind: str, data: Path, run: Path) -> list[Path]:
    if kind in ("tar", "idx"):
        return sorted(data.glob(f"*/*.{kind}"))
    if kind == "labels.arrow":
        return sorted(data.glob("*/labels.arrow"))
    if kind == "manifest.json":
        return [data / "manifest.json"]
    if kind == "label generation":
        return sorted(p for p in (run / "labels").glob("gen-*/*") if p.is_file())
    return sorted(p for p in (run / "checkpoints").rglob("*") if p.is_file())


def _dataset_view(data: Path):
    """What training uses of the dataset: labels of every split and every sample's decoded pixels."""
    ds = open_dataset(data)
    out = {}
    for split in ds.split_names:
        labels = read_labels(ds.labels_path(split), ds.num_classes)
        pixels = [decode_rgb(s.jpeg, 64) for s in ds.iter_samples(split)]
        out[split] = (labels.pos_offsets.tolist(), labels.pos_values.tolist(), labels.neg_offsets.tolist(),
                      labels.neg_values.tolist(), [(p.shape, p.tobytes()) for p in pixels])
    return out


def _generation_view(data: Path, run: Path):
    gen = ckpt.read_state(ckpt.latest_checkpoint(RunDir(run)))["label_generation"]
    with LabelStore(data / "train" / "labels.arrow", 10, "single_positive", corrections_dir=run / "labels") as store:
        store.use_generation(gen)
        return [a.tolist() for a in store.corrections_for_analysis()]


def _checkpoint_view(run: Path):
    rd = RunDir(run)
    latest = ckpt.latest_checkpoint(rd)
    files = {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(rd.checkpoints.rglob("*"))
             if p.is_file() and p.name != ckpt.CHECKSUMS}
    best = {k: v.numpy().tobytes() for k, v in ckpt.load_best_weights(rd).items()}
    return latest.name, ckpt.read_state(latest), files, best


def check(kind: str, data: Path, run: Path):
    """The view of ``kind`` that training uses; raises what a damaged file raises."""
    if kind == "label generation":
        return _generation_view(data, run)
    if kind == "checkpoint":
        return _checkpoint_view(run)
    return _dataset_view(data)


def _names_a_file(message: str, data: Path, run: Path) -> bool:
    return "\n" not in message and (str(data) in message or str(run) in message)


def trial(kind: str, path: Path, data: Path, run: Path, original, rng: np.random.Generator) -> tuple[str, str]:
    raw = path.read_bytes()
    pos = int(rng.integers(len(raw)))
    _put(path, pos, raw[pos] ^ int(rng.integers(1, 256)))
    where = f"{path.name}@{pos}"
    try:
        if kind in ("tar", "idx", "labels.arrow", "manifest.json"):
            problems = verify(data)
            if problems:
                unnamed = [p for p in problems if not _names_a_file(p, data, run)]
                return ("crash", f"{where}: {unnamed[0]}") if unnamed else ("verify", f"{where}: {problems[0]}")
        try:
            view = check(kind, data, run)
        except (CheckpointError, FormatError, ValueError) as e:
            return ("error" if _names_a_file(str(e), data, run) else "crash"), f"{where}: {e}"
        return ("no effect" if view == original else "SILENT"), where
    except Exception as e:  # noqa: BLE001 -- a fuzz trial reports any other exception as a crash
        return "crash", f"{where}: {type(e).__name__}: {e}"
    finally:
        _put(path, pos, raw[pos])


def _put(path: Path, pos: int, value: int) -> None:
    """One byte, in place: truncating a file that a reader has mapped would kill it with SIGBUS."""
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(bytes([value]))


def fuzz(data: Path, run: Path, trials: int, seed: int = 0, kinds=KINDS) -> dict[str, Counter]:
    """Outcome counts per kind, and the first example of each (kind, outcome) under key ``examples``."""
    rng = np.random.default_rng(seed)
    counts: dict[str, Counter] = {}
    examples: dict[tuple[str, str], str] = {}
    for kind in kinds:
        files = files_of(kind, data, run)
        assert files, kind
        original = check(kind, data, run)
        counts[kind] = Counter()
        for _ in range(trials):
            outcome, detail = trial(kind, files[int(rng.integers(len(files)))], data, run, original, rng)
            counts[kind][outcome] += 1
            examples.setdefault((kind, outcome), detail)
    counts["examples"] = examples  # type: ignore[assignment]
    return counts


def table(counts: dict[str, Counter]) -> str:
    lines = ["| file kind | trials | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 2) + "|"]
    for kind in KINDS:
        if kind in counts:
            c = counts[kind]
            lines.append(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=50, help="trials per kind of file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        data, run = make_inputs(Path(tmp))
        t1 = time.time()
        counts = fuzz(data, run, args.trials, args.seed)
        print(table(counts))
        for (kind, outcome), detail in counts["examples"].items():
            print(f"  e.g. {kind} -> {outcome}: {detail[:300]}")
        print(json.dumps({"setup_s": round(t1 - t0, 1), "fuzz_s": round(time.time() - t1, 1)}))
    bad = sum(c["SILENT"] + c["crash"] for k, c in counts.items() if k != "examples")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
