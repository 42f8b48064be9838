"""``report``: the paper's result tables from run directories written by the trainer.

    report RUN_OR_PARENT_DIR [...] [--table auto|datasets|groups] [--by KEY] [--csv F] [--json F] [--plot F.png]
           [--sweep KEY ...] [--plot-sweep F.png] [--plot-precision F.png]

Reads the run directories (eval/rundir.py; a directory that is no run directory is searched for run
directories below it) and prints the tables of eval/tables.py as Markdown on stdout:

- datasets (Table 2 layout) and groups (Table 3 layout, for runs whose result has ``groups``);
  ``--table auto`` (the default) prints each for the runs it fits. ``--by KEY`` splits dataset columns
  by a config key.
- sweep (``--sweep KEY``, Figure 5 / Figure 6 as a table); ``--plot-sweep`` draws it. Runs of
  ``train/sweep.py`` differ in every grid key: the other tables split their columns by the ``--sweep`` keys.
- the analysis tables, for the runs that have the data (docs/ANALYSIS.md): Table 1, the precision of
  modification (Figure 4; ``--plot-precision`` draws it) and Table 4.

mAP values in result.json and metrics.jsonl are fractions in [0, 1] (eval.metrics.MapResult.map); the
tables, CSV and JSON give percent. Runs without result.json (crashed or still running) are listed in
their own section, never dropped. ``--csv`` writes the table cells in long format, ``--json`` the tables
and a record per run, ``--plot`` the validation mAP per epoch of every run (eval/plots.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from .plots import plot_precision, plot_sweep, plot_val_map
from .rundir import Run, RunDirError, find_runs
from .tables import (
    ReportError,
    Table,
    analysis_tables,
    build_tables,
    method_name,
    render_markdown,
    render_unfinished,
    sweep_table,
)


def run_record(r: Run) -> dict:
    """One run as a JSON-ready record (the ``runs`` list of --json)."""
    rec = {"path": str(r.path), "dataset": r.dataset, "method": r.method, "seed": r.seed,
           "protocol": r.protocol, "status": "finished" if r.finished else "unfinished",
           "epochs_logged": len(r.epochs), "notes": r.notes}
    if r.finished:
        res = r.result
        rec.update({"best_epoch": res["best_epoch"], "best_val_map": res["best_val_map"],
                    "test_map": res["test_map"], "map_convention": res["map_convention"],
                    "excluded_classes": res.get("excluded_classes", []), "groups": res.get("groups")})
    else:
        rec["last_val_map"] = r.last_val_map
    return rec


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def write_json(path, tables: list[Table], runs: list[Run]) -> None:
    doc = {"tables": [{"name": t.name, "title": t.title, "header": t.header, "rows": t.rows,
                       "cells": t.cells, "footer": t.footer} for t in tables],
           "runs": [run_record(r) for r in runs]}
    Path(path).write_text(json.dumps(_nan_to_none(doc), indent=2, allow_nan=False) + "\n")


CSV_FIELDS = ("table", "dataset", "column", "method", "method_name", "n_seeds", "seeds", "map_pct_mean",
              "map_pct_std", "best_epochs", "convention", "runs")


def write_csv(path, tables: list[Table], runs: list[Run]) -> None:
    """Long format: one row per table cell; unfinished runs follow with table = "unfinished"."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for t in tables:
            for c in t.cells:
                row = dict(c)
                for k in ("seeds", "best_epochs", "runs"):
                    row[k] = ";".join(map(str, c[k]))
                for k in ("map_pct_mean", "map_pct_std"):
                    row[k] = "" if math.isnan(c[k]) else f"{c[k]:.4f}"
                w.writerow(row)
        for r in runs:
            if not r.finished:
                w.writerow({"table": "unfinished", "dataset": r.dataset, "method": r.method,
                            "method_name": method_name(r.method), "n_seeds": 0, "seeds": r.seed,
                            "runs": str(r.path)})

# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="report", description="Result tables (paper Table 2 / Table 3 layout) from run directories.")
    p.add_argument("paths", nargs="+", help="run directories, or directories with run directories below")
    p.add_argument("--table", choices=("auto", "datasets", "groups"), default="auto",
                   help="auto: groups table for runs with grouped eval, datasets table for the others")
    p.add_argument("--by", action="append", default=[], metavar="KEY",
                   help="also split dataset columns by this config key (dotted for nested keys); repeatable")
    p.add_argument("--digits", type=int, default=1, help="decimals in the tables (default 1, as in the paper)")
    p.add_argument("--csv", metavar="FILE", help="write the table cells (long format) as CSV")
    p.add_argument("--json", metavar="FILE", help="write tables and per-run records as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot validation mAP per epoch of every run")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY",
                   help="also print test mAP against this config key (Figure 5 / 6 as a table); repeatable")
    p.add_argument("--plot-sweep", metavar="FILE.png", help="plot test mAP and best epoch against each --sweep key")
    p.add_argument("--plot-precision", metavar="FILE.png",
                   help="plot the precision of modification per epoch (Figure 4; runs trained with analysis on)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = find_runs(args.paths)
        # sweep runs differ in the sweep keys: every table splits by the sweep keys it does not plot
        by = list(args.by) + [k for k in args.sweep if k not in args.by]
        # with --sweep the sweep tables replace the per-dataset one unless --table asks for it
        tables = [] if args.sweep and args.table == "auto" else build_tables(runs, args.table, by, args.digits)
        tables += [sweep_table(runs, key, [k for k in by if k != key], args.digits) for key in args.sweep]
        extra = analysis_tables(runs, args.digits)
        parts = [render_markdown(t) for t in tables + extra]
        if not tables:
            parts.append("No finished runs (none has result.json).\n")
        unfinished = render_unfinished(runs)
        if unfinished:
            parts.append(unfinished)
        print("\n".join(parts), end="")
        if args.csv:
            write_csv(args.csv, tables, runs)
        if args.json:
            write_json(args.json, tables + extra, runs)
        if args.plot:
            plot_val_map(runs, args.plot)
        if args.plot_sweep:
            plot_sweep(runs, args.sweep, args.plot_sweep, args.by)
        if args.plot_precision:
            plot_precision(runs, args.plot_precision)
    except (ReportError, RunDirError, OSError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
