"""``report``: the paper's result tables from run directories written by the trainer.

    report RUN_OR_PARENT_DIR [...] [--table auto|datasets|groups] [--by KEY] [--csv F] [--json F] [--plot F.png]
           [--sweep KEY ...] [--plot-sweep F.png] [--plot-precision F.png]

A run directory holds ``config.yaml`` (the resolved config: ``dataset``, ``method``, ``seed``,
``protocol``, ...), ``metrics.jsonl`` (one JSON object per epoch: ``epoch``, ``train_loss``,
``val_map``, ``time_s``, ...) and, once the run has finished, ``result.json`` (``dataset``,
``method``, ``seed``, ``best_epoch``, ``best_val_map``, ``test_map``, ``test_per_class_ap``,
``map_convention``, ``excluded_classes`` and, for datasets with grouped evaluation, ``groups``
{G1..G5, All}). A directory that is none of these is searched for run directories below it.

Tables (Markdown on stdout):

- datasets (the layout of the paper's Table 2): a row per method, in the paper's order, then any
  other method alphabetically; a column per dataset (VOC, COCO, NUSWIDE, CUB, then the others), and
  beside each the best epoch(s). A cell is the test mAP at the epoch of best validation mAP, in
  percent: ``mean ± std (n seeds)`` over seeds, std with ddof = 1, or the value itself for one seed.
  When a dataset's runs use several label protocols, each protocol gets its own column; ``--by KEY``
  splits columns by any other config key (e.g. a LinearInit switch) the same way.
- groups (Table 3): a row per method (and dataset, if several), columns G1..G5, All, best epoch.

- sweep (``--sweep KEY``, Figure 5 / Figure 6 as a table): rows = methods, columns = the values of the config
  key (e.g. ``delta_rel``, ``train_fraction``), test mAP mean ± std over seeds, plus each method's mean best
  epoch; ``--plot-sweep`` draws it. Runs of ``train/sweep.py`` differ in every grid key: the other tables
  split their columns by the ``--sweep`` keys.

Analysis tables follow, for the runs that have the data (docs/ANALYSIS.md): Table 1 from
``analysis/memorization.json`` (eval/analysis.py), the precision of modification per epoch from the
``precision_modified`` records of metrics.jsonl (Figure 4; ``--plot-precision`` draws it), and Table 4
from ``pointing.json`` (eval/pointing.py).

``--table auto`` (the default) prints the groups table for runs whose result has ``groups`` and the
datasets table for the others. mAP values in result.json and metrics.jsonl are fractions in [0, 1]
(eval.metrics.MapResult.map); the tables, CSV and JSON give percent. Every table says which mAP
convention (eval.metrics: "exclude" or "cole") its runs used. Runs without result.json (crashed or
still running) are listed in their own section, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The paper's row order (Table 2), by the trainer's method keys; Table 3 uses the same keys.
METHOD_ORDER = ("full", "an", "wan", "lsan", "iu", "epr", "role", "ll_r", "ll_ct", "ll_cp")
METHOD_NAMES = {
    "full": "Full label",
    "an": "Naive AN",
    "wan": "WAN",
    "lsan": "LSAN",
    "iu": "Naive IU",
    "epr": "EPR",
    "role": "ROLE",
    "ll_r": "LL-R",
    "ll_ct": "LL-Ct",
    "ll_cp": "LL-Cp",
}
# The paper's column order, by the dataset names that ingest writes into the manifest.
DATASET_ORDER = ("voc2012", "coco2014", "nuswide", "cub", "openimages_v3")
DATASET_NAMES = {
    "voc2012": "VOC",
    "coco2014": "COCO",
    "nuswide": "NUSWIDE",
    "cub": "CUB",
    "openimages_v3": "OpenImages",
}
RUN_FILES = ("config.yaml", "metrics.jsonl", "result.json")
RESULT_KEYS = ("dataset", "method", "seed", "best_epoch", "best_val_map", "test_map", "map_convention")


class ReportError(Exception):
    """Input the report cannot use; the message names the file and what to do."""


@dataclass
class Run:
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

    def label(self) -> str:
        return f"{self.dataset}/{self.method}/seed{self.seed}"


# ------------------------------------------------------------------------------------ loading


def _read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the trainer writes this file "
                          "at the end of a run: re-run the evaluation or remove the file") from e
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_metrics(path: Path, finished: bool) -> tuple[list[dict], list[str]]:
    """Rows of metrics.jsonl. A run killed mid-write can leave a truncated last line: that line is
    skipped with a note when the run has no result.json; anywhere else a bad line is an error."""
    epochs: list[dict] = []
    notes: list[str] = []
    lines = path.read_text().splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not finished:
                notes.append(f"metrics.jsonl line {lineno} truncated (skipped)")
                continue
            raise ReportError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise ReportError(f"{path}:{lineno}: expected an object with an integer \"epoch\", got {line[:80]!r}")
        epochs.append(row)
    return epochs, notes


def _check_fraction(value, where: str) -> float:
    if value is None:
        return float("nan")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ReportError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if not math.isnan(value) and not 0.0 <= value <= 1.0:
        raise ReportError(f"{where}: mAP {value} is outside [0, 1]; runs store mAP as a fraction, not percent")
    return value


def load_run(path) -> Run:
    """Read one run directory; raise ReportError naming the file for anything malformed."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    if not any((path / f).exists() for f in RUN_FILES):
        raise ReportError(f"{path}: not a run directory (none of {', '.join(RUN_FILES)}); pass the "
                          "directory the trainer wrote, or a directory above such directories")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise ReportError(f"{cfg_path}: missing; every run directory holds the resolved config the "
                          "trainer saved at start")
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{cfg_path}: not valid YAML: {e}") from e
    if not isinstance(config, dict):
        raise ReportError(f"{cfg_path}: expected a mapping at the top level")
    ident = {}
    for key in ("dataset", "method", "seed"):
        if key not in config:
            raise ReportError(f"{cfg_path}: no top-level key {key!r}")
        value = config[key]
        # A config that nests the dataset section keeps its name under "name".
        if key == "dataset" and isinstance(value, dict) and "name" in value:
            value = value["name"]
        expected_type = int if key == "seed" else str
        if not isinstance(value, expected_type) or isinstance(value, bool):
            raise ReportError(f"{cfg_path}: {key!r} must be a {expected_type.__name__}, got {value!r}")
        ident[key] = value
    protocol = config.get("protocol")
    protocol = None if protocol is None else str(protocol)

    result = None
    res_path = path / "result.json"
    if res_path.exists():
        result = _read_json_object(res_path)
        missing = [k for k in RESULT_KEYS if k not in result]
        if missing:
            raise ReportError(f"{res_path}: missing key(s) {', '.join(missing)}")
        for key in ("dataset", "method", "seed"):
            if result[key] != ident[key]:
                raise ReportError(f"{res_path}: {key} = {result[key]!r} but {cfg_path} says {ident[key]!r}")
        for key in ("test_map", "best_val_map"):
            result[key] = _check_fraction(result[key], f"{res_path}: {key}")
        groups = result.get("groups")
        if groups is not None:
            if not isinstance(groups, dict) or "All" not in groups:
                raise ReportError(f"{res_path}: \"groups\" must be an object with G1..Gn and All")
            result["groups"] = {g: _check_fraction(v, f"{res_path}: groups.{g}") for g, v in groups.items()}

    epochs: list[dict] = []
    notes: list[str] = []
    met_path = path / "metrics.jsonl"
    if met_path.is_file():
        epochs, notes = _read_metrics(met_path, finished=result is not None)
        for row in epochs:
            if "val_map" in row:
                row["val_map"] = _check_fraction(row["val_map"], f"{met_path}: epoch {row['epoch']} val_map")
    elif result is not None:
        notes.append("no metrics.jsonl")
    return Run(path=path, config=config, dataset=ident["dataset"], method=ident["method"],
               seed=ident["seed"], protocol=protocol, epochs=epochs, result=result, notes=notes)


def _is_run_dir(path: Path) -> bool:
    return any((path / f).exists() for f in RUN_FILES)


def find_runs(paths) -> list[Run]:
    """Every run under ``paths``: each is a run directory or a directory with run directories below
    it (searched recursively, not into run directories themselves, nor into hidden directories)."""
    run_dirs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"{p}: no such directory")
        if not p.is_dir():
            raise ReportError(f"{p}: is a file; pass a run directory or a directory of runs")
        if _is_run_dir(p):
            run_dirs.append(p)
            continue
        found = []
        for root, dirs, _files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if _is_run_dir(Path(root)):
                found.append(Path(root))
                dirs[:] = []
        if not found:
            raise ReportError(f"{p}: not a run directory (none of {', '.join(RUN_FILES)}) and no run "
                              "directories below it")
        run_dirs.extend(found)
    seen: set[Path] = set()
    runs = []
    for d in run_dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            runs.append(load_run(d))
    return runs


# ------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    name: str  # "datasets" | "groups"
    title: str
    header: list[str]
    rows: list[list[str]]
    cells: list[dict]  # one record per (row, value column): the numbers behind the strings
    footer: list[str]


def _method_key(method: str):
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _dataset_key(dataset: str):
    return (DATASET_ORDER.index(dataset), "") if dataset in DATASET_ORDER else (len(DATASET_ORDER), dataset)


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def _config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; NaN for one value) in percent."""
    pct = [100.0 * v for v in values]
    if any(math.isnan(v) for v in pct):
        return float("nan"), float("nan")
    mean = statistics.fmean(pct)
    std = statistics.stdev(pct) if len(pct) > 1 else float("nan")
    return mean, std


def format_cell(values: list[float], digits: int = 1) -> str:
    """``82.6`` for one seed, ``82.6 ± 0.3 (3 seeds)`` for several; values are fractions."""
    if not values:
        return ""
    mean, std = _summary(values)
    if math.isnan(mean):
        return "n/a"
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({len(values)} seeds)"


def _column_label(run: Run, split_protocol: bool, by: list[str]) -> str:
    parts = [dataset_name(run.dataset)]
    extra = []
    if split_protocol and run.protocol is not None:
        extra.append(run.protocol)
    extra += [f"{k}={_config_value(run.config, k)}" for k in by]
    return parts[0] + (f" ({', '.join(extra)})" if extra else "")


def _check_unique(groups: dict, what: str) -> None:
    for key, runs in groups.items():
        by_seed: dict[int, Run] = {}
        for r in runs:
            if r.seed in by_seed:
                raise ReportError(f"two runs of {what} {key} with seed {r.seed}: {by_seed[r.seed].path} and "
                                  f"{r.path}; pass only one of them (or split columns with --by KEY)")
            by_seed[r.seed] = r
        conventions = {r.result["map_convention"] for r in runs}
        if len(conventions) > 1:
            raise ReportError(f"runs of {what} {key} use different mAP conventions {sorted(conventions)}: "
                              + ", ".join(str(r.path) for r in runs))


def _convention_footer(runs: list[Run], column_of) -> list[str]:
    by_col: dict[str, set] = {}
    excluded: dict[str, set] = {}
    for r in runs:
        col = column_of(r)
        by_col.setdefault(col, set()).add(r.result["map_convention"])
        excluded.setdefault(col, set()).update(int(k) for k in r.result.get("excluded_classes") or [])
    conventions = set().union(*by_col.values())
    if len(conventions) == 1:
        lines = [f"mAP convention: {conventions.pop()}."]
    else:
        lines = ["mAP convention: " + "; ".join(f"{c}: {'/'.join(sorted(v))}" for c, v in by_col.items()) + "."]
    for col, ks in excluded.items():
        if ks:
            shown = ", ".join(map(str, sorted(ks)[:20])) + (", ..." if len(ks) > 20 else "")
            lines.append(f"{col}: {len(ks)} class(es) without a known test positive excluded: {shown}.")
    return lines


def datasets_table(runs: list[Run], by: list[str] = (), digits: int = 1) -> Table:
    """Table 2 layout from finished runs: rows = methods, columns = datasets (+ best epochs)."""
    runs = [r for r in runs if r.finished]
    # the full-label upper bound (method "full", protocol "full") is a row of its dataset's column, as in
    # the paper's Table 2; only the other methods' protocols split a dataset into several columns
    protocols: dict[str, set] = {}
    for r in runs:
        if r.method != "full":
            protocols.setdefault(r.dataset, set()).add(r.protocol)
    by = list(by)

    def column_of(r: Run) -> str:
        return _column_label(r, len(protocols.get(r.dataset, ())) > 1 and r.method != "full", by)

    col_sort = {}
    for r in runs:
        col_sort.setdefault(column_of(r), (_dataset_key(r.dataset), str(r.protocol),
                                           [str(_config_value(r.config, k)) for k in by]))
    columns = sorted(col_sort, key=lambda c: col_sort[c])
    methods = sorted({r.method for r in runs}, key=_method_key)
    cell_runs: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        cell_runs.setdefault((r.method, column_of(r)), []).append(r)
    _check_unique({f"{m} on {c}": rs for (m, c), rs in cell_runs.items()}, "method/column")

    header = ["Method"]
    for c in columns:
        header += [c, f"{c} best epoch"]
    rows, cells = [], []
    for m in methods:
        row = [method_name(m)]
        for c in columns:
            rs = sorted(cell_runs.get((m, c), []), key=lambda r: r.seed)
            values = [r.result["test_map"] for r in rs]
            row += [format_cell(values, digits), ", ".join(str(r.result["best_epoch"]) for r in rs)]
            if rs:
                mean, std = _summary(values)
                cells.append({"table": "datasets", "method": m, "method_name": method_name(m),
                              "dataset": rs[0].dataset, "column": c, "n_seeds": len(rs),
                              "seeds": [r.seed for r in rs], "map_pct_mean": mean, "map_pct_std": std,
                              "best_epochs": [r.result["best_epoch"] for r in rs],
                              "convention": rs[0].result["map_convention"], "runs": [str(r.path) for r in rs]})
        rows.append(row)
    footer = ["Test mAP (%) at the epoch of best validation mAP; mean ± sample std over seeds."]
    footer += _convention_footer(runs, column_of)
    return Table("datasets", "Test mAP by dataset (paper Table 2 layout)", header, rows, cells, footer)


def groups_table(runs: list[Run], digits: int = 1) -> Table:
    """Table 3 layout from finished runs with ``groups``: rows = methods, columns = G1..Gn, All."""
    runs = [r for r in runs if r.finished and r.groups]
    if not runs:
        raise ReportError("no finished run has \"groups\" in its result.json (grouped evaluation is "
                          "written for OpenImages); use --table datasets")
    group_names = sorted({g for r in runs for g in r.groups if g != "All"},
                         key=lambda g: (len(g), g)) + ["All"]
    datasets = sorted({r.dataset for r in runs}, key=_dataset_key)
    many = len(datasets) > 1
    keyed: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        keyed.setdefault((r.dataset, r.method), []).append(r)
    _check_unique({f"{m} on {d}": rs for (d, m), rs in keyed.items()}, "method/dataset")

    header = (["Dataset"] if many else []) + ["Method"] + group_names + ["best epoch"]
    rows, cells = [], []
    for d, m in sorted(keyed, key=lambda k: (_dataset_key(k[0]), _method_key(k[1]))):
        rs = sorted(keyed[(d, m)], key=lambda r: r.seed)
        row = ([dataset_name(d)] if many else []) + [method_name(m)]
        for g in group_names:
            values = [r.groups[g] if g in r.groups else float("nan") for r in rs]
            row.append(format_cell(values, digits))
            mean, std = _summary(values)
            cells.append({"table": "groups", "method": m, "method_name": method_name(m), "dataset": d,
                          "column": g, "n_seeds": len(rs), "seeds": [r.seed for r in rs],
                          "map_pct_mean": mean, "map_pct_std": std,
                          "best_epochs": [r.result["best_epoch"] for r in rs],
                          "convention": rs[0].result["map_convention"], "runs": [str(r.path) for r in rs]})
        row.append(", ".join(str(r.result["best_epoch"]) for r in rs))
        rows.append(row)
    footer = ["Test mAP (%) per class group at the epoch of best validation mAP; G1 holds the classes "
              "known on the fewest training images; mean ± sample std over seeds."]
    footer += _convention_footer(runs, lambda r: dataset_name(r.dataset))
    return Table("groups", "Test mAP by class group (paper Table 3 layout)", header, rows, cells, footer)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_markdown(table: Table) -> str:
    first_value = 2 if table.header[:2] == ["Dataset", "Method"] else 1
    align = [":--" if i < first_value else "--:" for i in range(len(table.header))]
    lines = [f"### {table.title}", ""]
    lines.append("| " + " | ".join(map(_md_escape, table.header)) + " |")
    lines.append("| " + " | ".join(align) + " |")
    for row in table.rows:
        lines.append("| " + " | ".join(map(_md_escape, row)) + " |")
    lines.append("")
    lines += table.footer
    return "\n".join(lines) + "\n"


def _last_val(run: Run) -> float | None:
    vals = [e["val_map"] for e in run.epochs if "val_map" in e]
    return vals[-1] if vals else None


def render_unfinished(runs: list[Run]) -> str:
    """Markdown list of runs without result.json (crashed, killed or still running)."""
    pending = [r for r in runs if not r.finished]
    if not pending:
        return ""
    lines = ["### Unfinished runs (no result.json)", "",
             "| Run | Dataset | Method | Seed | Epochs logged | Last val mAP | Notes |",
             "| :-- | :-- | :-- | --: | --: | --: | :-- |"]
    for r in sorted(pending, key=lambda r: (_dataset_key(r.dataset), _method_key(r.method), r.seed)):
        last = _last_val(r)
        last_s = "" if last is None or math.isnan(last) else f"{100 * last:.1f}"
        lines.append(f"| {_md_escape(str(r.path))} | {dataset_name(r.dataset)} | {method_name(r.method)} | "
                     f"{r.seed} | {len(r.epochs)} | {last_s} | {_md_escape('; '.join(r.notes))} |")
    return "\n".join(lines) + "\n"


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
        rec["last_val_map"] = _last_val(r)
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


def plot_val_map(runs: list[Run], path) -> None:
    """Validation mAP (%) per epoch of every run, one panel per dataset; unfinished runs dashed, the
    best epoch of a finished run marked. Uses the Agg canvas directly (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    datasets = sorted({r.dataset for r in runs}, key=_dataset_key)
    if not datasets:
        raise ReportError("nothing to plot: no runs")
    fig = Figure(figsize=(5.5 * len(datasets), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, d in zip(axes, datasets):
        for r in sorted((r for r in runs if r.dataset == d), key=lambda r: (_method_key(r.method), r.seed)):
            pts = [(e["epoch"], 100 * e["val_map"]) for e in r.epochs if "val_map" in e]
            if not pts:
                continue
            label = f"{method_name(r.method)} s{r.seed}" + ("" if r.finished else " (unfinished)")
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
                              linestyle="-" if r.finished else "--", label=label)
            if r.finished:
                best = [p for p in pts if p[0] == r.result["best_epoch"]]
                if best:
                    ax.plot([best[0][0]], [best[0][1]], marker="o", markersize=8, fillstyle="none",
                            color=line.get_color())
        ax.set_title(dataset_name(d))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation mAP (%)")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


# --------------------------------------------------------- sweeps and analyses (train/sweep.py, eval/analysis.py,
# eval/pointing.py): tables printed only for runs that have the corresponding data


MEMORIZATION_FILE = Path("analysis") / "memorization.json"  # eval.analysis.MemorizationTracker.finish
POINTING_FILE = Path("pointing.json")  # eval.pointing
PRECISION_KEYS = ("precision_modified", "precision_modified_cum")  # eval.analysis.PrecisionTracker


def _optional_json(path: Path) -> dict | None:
    return _read_json_object(path) if path.is_file() else None


def _value_key(v):
    """Sort config values numerically when they are numbers, else as strings."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    try:
        return (0, float(str(v)), "")
    except ValueError:
        return (1, 0.0, str(v))


def _row_label(r: Run, many_datasets: bool, by: list[str]) -> str:
    label = method_name(r.method)
    extra = [f"{k}={_config_value(r.config, k)}" for k in by]
    if extra:
        label += f" ({', '.join(extra)})"
    return f"{dataset_name(r.dataset)} {label}" if many_datasets else label


def sweep_table(runs: list[Run], key: str, by=(), digits: int = 1) -> Table:
    """Figure 5 / Figure 6 as a table: rows = methods (+ ``by`` keys), columns = the values of config
    ``key``; a cell is the test mAP, mean ± std over seeds; a second row per method gives the mean best
    epoch. Runs that differ in another key land in one cell and are refused (split them with ``by``)."""
    runs = [r for r in runs if r.finished]
    if not runs:
        raise ReportError(f"sweep table for {key!r}: no finished runs")
    missing = [r for r in runs if _config_value(r.config, key) is None]
    if missing:
        raise ReportError(f"{missing[0].path / 'config.yaml'}: has no key {key!r}; pass a config key of the runs")
    by = list(by)
    many = len({r.dataset for r in runs}) > 1
    values = sorted({_config_value(r.config, key) for r in runs}, key=_value_key)
    cell_runs: dict[tuple[str, object], list[Run]] = {}
    row_sort: dict[str, tuple] = {}
    for r in runs:
        label = _row_label(r, many, by)
        row_sort.setdefault(label, (_dataset_key(r.dataset), _method_key(r.method),
                                    [str(_config_value(r.config, k)) for k in by]))
        cell_runs.setdefault((label, _config_value(r.config, key)), []).append(r)
    _check_unique({f"{lab} at {key}={v}": rs for (lab, v), rs in cell_runs.items()}, "row/value")
    header = ["Method"] + [f"{key}={v}" for v in values]
    rows, cells = [], []
    for label in sorted(row_sort, key=lambda lab: row_sort[lab]):
        row, epochs_row = [label], [f"{label}: best epoch"]
        for v in values:
            rs = sorted(cell_runs.get((label, v), []), key=lambda r: r.seed)
            maps = [r.result["test_map"] for r in rs]
            row.append(format_cell(maps, digits))
            epochs_row.append(f"{statistics.fmean(r.result['best_epoch'] for r in rs):.1f}" if rs else "")
            if rs:
                mean, std = _summary(maps)
                cells.append({"table": "sweep", "method": rs[0].method, "method_name": label,
                              "dataset": rs[0].dataset, "column": f"{key}={v}", "n_seeds": len(rs),
                              "seeds": [r.seed for r in rs], "map_pct_mean": mean, "map_pct_std": std,
                              "best_epochs": [r.result["best_epoch"] for r in rs],
                              "convention": rs[0].result["map_convention"], "runs": [str(r.path) for r in rs]})
        rows += [row, epochs_row]
    footer = [f"Test mAP (%) at the epoch of best validation mAP against {key}; mean ± sample std over seeds; "
              "\"best epoch\" rows: the mean epoch of best validation mAP."]
    footer += _convention_footer(runs, lambda r: f"{key}={_config_value(r.config, key)}")
    return Table("sweep", f"Test mAP against {key} (paper Figure 5 / 6)", header, rows, cells, footer)


def memorization_table(runs: list[Run], digits: int = 1) -> Table | None:
    """Table 1 from the runs' analysis/memorization.json: per (dataset, method), the share (%) of TP / TN /
    FN entries whose highest loss falls in epoch 1 (warmup) or later (regular), mean ± std over seeds."""
    found: dict[tuple[str, str], list[tuple[Run, dict]]] = {}
    for r in runs:
        m = _optional_json(r.path / MEMORIZATION_FILE)
        if m is not None:
            found.setdefault((r.dataset, r.method), []).append((r, m))
    if not found:
        return None
    many = len({d for d, _ in found}) > 1
    types = ("TP", "TN", "FN")
    header = ["Method / highest loss phase"] + list(types) + ["entries (TP / TN / FN)"]
    rows, cells = [], []
    for (d, meth) in sorted(found, key=lambda k: (_dataset_key(k[0]), _method_key(k[1]))):
        items = sorted(found[(d, meth)], key=lambda x: x[0].seed)
        label = (f"{dataset_name(d)} " if many else "") + method_name(meth)
        for phase, pkey in (("warmup (epoch 1)", "warmup_pct"), ("regular (epoch > 1)", "regular_pct")):
            row = [f"{label}: {phase}"]
            for t in types:
                vals = [m["table"][t][pkey] for _, m in items if m["table"][t][pkey] is not None]
                row.append(format_cell([v / 100.0 for v in vals], digits))
                mean, std = _summary([v / 100.0 for v in vals]) if vals else (float("nan"), float("nan"))
                cells.append({"table": "memorization", "dataset": d, "method": meth, "phase": pkey[:-4], "type": t,
                              "n_seeds": len(vals), "pct_mean": mean, "pct_std": std,
                              "runs": [str(r.path) for r, _ in items]})
            row.append(" / ".join(str(sum(m["table"][t]["n"] for _, m in items)) for t in types))
            rows.append(row)
    footer = ["Share (%) of tracked training entries whose highest loss (BCE against the training target, scored "
              "at the end of each epoch) falls in epoch 1 or later; TP observed positive, TN / FN unobserved and "
              "truly negative / positive; mean ± sample std over seeds; entries summed over seeds."]
    return Table("memorization", "Distribution of the highest loss occurrence (paper Table 1 layout)",
                 header, rows, cells, footer)


def pointing_table(runs: list[Run], digits: int = 1) -> Table | None:
    """Table 4 from the runs' pointing.json: pointing-game accuracy (%), rows = methods, columns = datasets."""
    found: dict[tuple[str, str], list[tuple[Run, dict]]] = {}
    for r in runs:
        p = _optional_json(r.path / POINTING_FILE)
        if p is not None:
            found.setdefault((r.method, r.dataset), []).append((r, p))
    if not found:
        return None
    datasets = sorted({d for _, d in found}, key=_dataset_key)
    methods = sorted({m for m, _ in found}, key=_method_key)
    header = ["Method"] + [dataset_name(d) for d in datasets]
    rows, cells, modes = [], [], set()
    for m in methods:
        row = [method_name(m)]
        for d in datasets:
            items = sorted(found.get((m, d), []), key=lambda x: x[0].seed)
            vals = [p["pointing_accuracy"] for _, p in items if p.get("pointing_accuracy") is not None]
            modes.update(f"{p.get('mode')} on {p.get('split')} ({p.get('images_evaluated')} images)" for _, p in items)
            row.append(format_cell(vals, digits))
            if vals:
                mean, std = _summary(vals)
                cells.append({"table": "pointing", "dataset": d, "method": m, "n_seeds": len(vals),
                              "pct_mean": mean, "pct_std": std, "runs": [str(r.path) for r, _ in items]})
        rows.append(row)
    footer = ["Pointing game (%): per class hits / (hits + misses) of the CAM maximum inside a box of the class, "
              "mean over classes; mean ± sample std over seeds.", "Evaluated: " + "; ".join(sorted(modes)) + "."]
    return Table("pointing", "Pointing game (paper Table 4 layout)", header, rows, cells, footer)


def _precision_series(r: Run) -> dict[int, float]:
    """epoch -> precision of modification of one run: accumulated for LL-Cp (its modifications are the
    permanent corrections), per epoch for the others, as in the paper's Figure 4."""
    key = "precision_modified_cum" if r.method == "ll_cp" else "precision_modified"
    return {e["epoch"]: float(e[key]) for e in r.epochs if e.get(key) is not None}


def precision_table(runs: list[Run], digits: int = 1) -> Table | None:
    """Figure 4 as a table: precision of modification (%) per epoch, rows = methods, mean ± std over seeds."""
    series: dict[tuple[str, str], list[tuple[Run, dict]]] = {}
    for r in runs:
        s = _precision_series(r)
        if s:
            series.setdefault((r.dataset, r.method), []).append((r, s))
    if not series:
        return None
    many = len({d for d, _ in series}) > 1
    epochs = sorted({e for items in series.values() for _, s in items for e in s})
    header = ["Method"] + [f"epoch {e}" for e in epochs]
    rows, cells = [], []
    for (d, m) in sorted(series, key=lambda k: (_dataset_key(k[0]), _method_key(k[1]))):
        items = sorted(series[(d, m)], key=lambda x: x[0].seed)
        row = [(f"{dataset_name(d)} " if many else "") + method_name(m) + (" (accumulated)" if m == "ll_cp" else "")]
        for e in epochs:
            vals = [s[e] for _, s in items if e in s]
            row.append(format_cell(vals, digits))
            if vals:
                mean, std = _summary(vals)
                cells.append({"table": "precision", "dataset": d, "method": m, "epoch": e, "n_seeds": len(vals),
                              "pct_mean": mean, "pct_std": std})
        rows.append(row)
    footer = ["Precision of modification (%): of the unobserved entries the large-loss scheme rejected or corrected, "
              "the share that are truly positive; per epoch for LL-R / LL-Ct, accumulated over epochs for LL-Cp; "
              "mean ± sample std over the seeds that reached the epoch."]
    return Table("precision", "Precision of modification (paper Figure 4 data)", header, rows, cells, footer)


def analysis_tables(runs: list[Run], digits: int = 1) -> list[Table]:
    return [t for t in (memorization_table(runs, digits), precision_table(runs, digits), pointing_table(runs, digits))
            if t is not None]


def _figure(ncols: int, nrows: int = 1, width: float = 5.5, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def plot_sweep(runs: list[Run], keys: list[str], path, by=()) -> None:
    """Figure 5 / 6: per sweep key, test mAP (top) and the mean best epoch (bottom) against the key's values,
    one line per method (mean ± std over seeds as error bars)."""
    if not keys:
        raise ReportError("--plot-sweep needs at least one --sweep KEY")
    fig, axes = _figure(len(keys), 2, height=3.6)
    for j, key in enumerate(keys):
        table = sweep_table(runs, key, list(by) + [k for k in keys if k != key and k not in by])
        ax_map, ax_ep = axes[0][j], axes[1][j]
        by_label: dict[str, list[dict]] = {}
        for c in table.cells:
            by_label.setdefault(c["method_name"], []).append(c)
        for label, cs in by_label.items():
            cs = sorted(cs, key=lambda c: _value_key(c["column"].split("=", 1)[1]))
            xs = [float(c["column"].split("=", 1)[1]) for c in cs]
            ax_map.errorbar(xs, [c["map_pct_mean"] for c in cs],
                            yerr=[0.0 if math.isnan(c["map_pct_std"]) else c["map_pct_std"] for c in cs],
                            marker="o", capsize=3, label=label)
            ax_ep.plot(xs, [statistics.fmean(c["best_epochs"]) for c in cs], marker="o", label=label)
        ax_map.set_ylabel("test mAP (%)")
        ax_ep.set_ylabel("best epoch (mean)")
        for ax in (ax_map, ax_ep):
            ax.set_xlabel(key)
            ax.grid(alpha=0.3)
        ax_map.set_title(f"test mAP against {key}")
        ax_map.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_precision(runs: list[Run], path) -> None:
    """Figure 4: precision of modification (%) per epoch, one panel per dataset, one line per method
    (mean over seeds, band = ± std); LL-Cp accumulated."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        s = _precision_series(r)
        if s:
            groups.setdefault(r.dataset, {}).setdefault(r.method, []).append(s)
    if not groups:
        raise ReportError("--plot-precision: no run has precision_modified in metrics.jsonl (train with analysis_entries > 0)")
    datasets = sorted(groups, key=_dataset_key)
    fig, axes = _figure(len(datasets))
    for ax, d in zip(axes[0], datasets):
        for m in sorted(groups[d], key=_method_key):
            seeds = groups[d][m]
            epochs = sorted({e for s in seeds for e in s})
            mean = [statistics.fmean(100 * s[e] for s in seeds if e in s) for e in epochs]
            std = [statistics.stdev([100 * s[e] for s in seeds if e in s]) if sum(e in s for s in seeds) > 1 else 0.0
                   for e in epochs]
            (line,) = ax.plot(epochs, mean, marker="o", label=method_name(m) + (" (accumulated)" if m == "ll_cp" else "")
                              + f", {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
            ax.fill_between(epochs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(f"precision of modification: {dataset_name(d)}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("truly positive among modified (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


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


def build_tables(runs: list[Run], table: str = "auto", by=(), digits: int = 1) -> list[Table]:
    finished = [r for r in runs if r.finished]
    if table == "datasets":
        return [datasets_table(finished, by, digits)] if finished else []
    if table == "groups":
        return [groups_table(finished, digits)]
    tables = []
    plain = [r for r in finished if not r.groups]
    grouped = [r for r in finished if r.groups]
    if plain:
        tables.append(datasets_table(plain, by, digits))
    if grouped:
        tables.append(groups_table(grouped, digits))
    return tables


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
    except (ReportError, OSError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
