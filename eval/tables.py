"""The paper's result tables from runs (eval/rundir.py ``Run``): the numbers and their Markdown.

- datasets (the layout of the paper's Table 2): a row per method, in the paper's order, then any
  other method alphabetically; a column per dataset (VOC, COCO, NUSWIDE, CUB, then the others), and
  beside each the best epoch(s). A cell is the test mAP at the epoch of best validation mAP, in
  percent: ``mean ± std (n seeds)`` over seeds, std with ddof = 1, or the value itself for one seed.
  When a dataset's runs use several label protocols, each protocol gets its own column; ``by`` keys
  split columns by any other config key (e.g. a LinearInit switch) the same way.
- groups (Table 3): a row per method (and dataset, if several), columns G1..G5, All, best epoch.
- sweep (Figure 5 / Figure 6 as a table): rows = methods, columns = the values of a config key, test mAP
  mean ± std over seeds, plus each method's mean best epoch.
- the analyses, for the runs that have the data (docs/ANALYSIS.md): Table 1 from
  ``analysis/memorization.json``, the precision of modification per epoch from the ``precision_modified``
  records of metrics.jsonl (Figure 4), and Table 4 from ``pointing.json``.

A ``Table`` holds its header and rows as strings and, per value cell, a record of the numbers behind
it (``cells``: what ``report --csv`` / ``--json`` write). Tables give percent; every table says which mAP
convention (eval.metrics: "exclude", "cole" or "openimages") its runs used, and which classes it left out.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from .rundir import Run


class ReportError(Exception):
    """Runs the tables cannot be made from; the message names the runs and what to do."""


# The paper's row order (Table 2), by the trainer's method keys; Table 3 uses the same keys.
METHOD_ORDER = ("full", "an", "wan", "lsan", "iu", "epr", "role", "ll_r", "ll_ct", "ll_cp",
                # the follow-up methods (issue 14), in the order of their papers
                "partial_bce", "em", "em_apl", "boostlu_ll_r", "boostlu_ll_ct", "boostlu_ll_cp", "gr_loss")
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
    "partial_bce": "Partial-BCE",
    "em": "EM",
    "em_apl": "EM + APL",
    "boostlu_ll_r": "BoostLU + LL-R",
    "boostlu_ll_ct": "BoostLU + LL-Ct",
    "boostlu_ll_cp": "BoostLU + LL-Cp",
    "gr_loss": "GR-Loss",
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


@dataclass
class Table:
    name: str  # "datasets" | "groups" | "sweep" | "memorization" | "precision" | "pointing"
    title: str
    header: list[str]
    rows: list[list[str]]
    cells: list[dict]  # one record per (row, value column): the numbers behind the strings
    footer: list[str]


def method_key(method: str):
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def dataset_key(dataset: str):
    return (DATASET_ORDER.index(dataset), "") if dataset in DATASET_ORDER else (len(DATASET_ORDER), dataset)


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def config_value(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def summary_pct(values: list[float]) -> tuple[float, float]:
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
    mean, std = summary_pct(values)
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
    extra += [f"{k}={config_value(run.config, k)}" for k in by]
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


#: why a convention leaves a class out of the mean (eval/metrics.py); "cole" leaves none out
EXCLUDED_BECAUSE = {"exclude": "without a known test positive", "openimages": "without a known test label"}


def _convention_footer(runs: list[Run], column_of) -> list[str]:
    by_col: dict[str, set] = {}
    excluded: dict[tuple[str, str], set] = {}
    for r in runs:
        col, convention = column_of(r), r.result["map_convention"]
        by_col.setdefault(col, set()).add(convention)
        excluded.setdefault((col, convention), set()).update(int(k) for k in r.result.get("excluded_classes") or [])
    conventions = set().union(*by_col.values())
    if len(conventions) == 1:
        lines = [f"mAP convention: {conventions.pop()}."]
    else:
        lines = ["mAP convention: " + "; ".join(f"{c}: {'/'.join(sorted(v))}" for c, v in by_col.items()) + "."]
    for (col, convention), ks in excluded.items():
        if ks:
            shown = ", ".join(map(str, sorted(ks)[:20])) + (", ..." if len(ks) > 20 else "")
            why = EXCLUDED_BECAUSE.get(convention, "left out of the mean")
            lines.append(f"{col}: {len(ks)} class(es) {why} excluded: {shown}.")
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
        col_sort.setdefault(column_of(r), (dataset_key(r.dataset), str(r.protocol),
                                           [str(config_value(r.config, k)) for k in by]))
    columns = sorted(col_sort, key=lambda c: col_sort[c])
    methods = sorted({r.method for r in runs}, key=method_key)
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
                mean, std = summary_pct(values)
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
    datasets = sorted({r.dataset for r in runs}, key=dataset_key)
    many = len(datasets) > 1
    keyed: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        keyed.setdefault((r.dataset, r.method), []).append(r)
    _check_unique({f"{m} on {d}": rs for (d, m), rs in keyed.items()}, "method/dataset")

    header = (["Dataset"] if many else []) + ["Method"] + group_names + ["best epoch"]
    rows, cells = [], []
    for d, m in sorted(keyed, key=lambda k: (dataset_key(k[0]), method_key(k[1]))):
        rs = sorted(keyed[(d, m)], key=lambda r: r.seed)
        row = ([dataset_name(d)] if many else []) + [method_name(m)]
        for g in group_names:
            values = [r.groups[g] if g in r.groups else float("nan") for r in rs]
            row.append(format_cell(values, digits))
            mean, std = summary_pct(values)
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


def render_unfinished(runs: list[Run]) -> str:
    """Markdown list of runs without result.json (crashed, killed or still running)."""
    pending = [r for r in runs if not r.finished]
    if not pending:
        return ""
    lines = ["### Unfinished runs (no result.json)", "",
             "| Run | Dataset | Method | Seed | Epochs logged | Last val mAP | Notes |",
             "| :-- | :-- | :-- | --: | --: | --: | :-- |"]
    for r in sorted(pending, key=lambda r: (dataset_key(r.dataset), method_key(r.method), r.seed)):
        last = r.last_val_map
        last_s = "" if last is None or math.isnan(last) else f"{100 * last:.1f}"
        lines.append(f"| {_md_escape(str(r.path))} | {dataset_name(r.dataset)} | {method_name(r.method)} | "
                     f"{r.seed} | {len(r.epochs)} | {last_s} | {_md_escape('; '.join(r.notes))} |")
    return "\n".join(lines) + "\n"


def value_key(v):
    """Sort config values numerically when they are numbers, else as strings."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    try:
        return (0, float(str(v)), "")
    except ValueError:
        return (1, 0.0, str(v))


def _row_label(r: Run, many_datasets: bool, by: list[str]) -> str:
    label = method_name(r.method)
    extra = [f"{k}={config_value(r.config, k)}" for k in by]
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
    missing = [r for r in runs if config_value(r.config, key) is None]
    if missing:
        raise ReportError(f"{missing[0].path / 'config.yaml'}: has no key {key!r}; pass a config key of the runs")
    by = list(by)
    many = len({r.dataset for r in runs}) > 1
    values = sorted({config_value(r.config, key) for r in runs}, key=value_key)
    cell_runs: dict[tuple[str, object], list[Run]] = {}
    row_sort: dict[str, tuple] = {}
    for r in runs:
        label = _row_label(r, many, by)
        row_sort.setdefault(label, (dataset_key(r.dataset), method_key(r.method),
                                    [str(config_value(r.config, k)) for k in by]))
        cell_runs.setdefault((label, config_value(r.config, key)), []).append(r)
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
                mean, std = summary_pct(maps)
                cells.append({"table": "sweep", "method": rs[0].method, "method_name": label,
                              "dataset": rs[0].dataset, "column": f"{key}={v}", "n_seeds": len(rs),
                              "seeds": [r.seed for r in rs], "map_pct_mean": mean, "map_pct_std": std,
                              "best_epochs": [r.result["best_epoch"] for r in rs],
                              "convention": rs[0].result["map_convention"], "runs": [str(r.path) for r in rs]})
        rows += [row, epochs_row]
    footer = [f"Test mAP (%) at the epoch of best validation mAP against {key}; mean ± sample std over seeds; "
              "\"best epoch\" rows: the mean epoch of best validation mAP."]
    footer += _convention_footer(runs, lambda r: f"{key}={config_value(r.config, key)}")
    return Table("sweep", f"Test mAP against {key} (paper Figure 5 / 6)", header, rows, cells, footer)


def _with_file(runs: list[Run], path_of, key_of) -> dict[tuple, list[tuple[Run, dict]]]:
    """The runs that have the JSON file ``path_of(run directory)``, with its content, grouped by ``key_of(run)``."""
    found: dict[tuple, list[tuple[Run, dict]]] = {}
    for r in runs:
        doc = r.dir.read_optional(path_of(r.dir))
        if doc is not None:
            found.setdefault(key_of(r), []).append((r, doc))
    return found


def memorization_table(runs: list[Run], digits: int = 1) -> Table | None:
    """Table 1 from the runs' analysis/memorization.json: per (dataset, method), the share (%) of TP / TN /
    FN entries whose highest loss falls in epoch 1 (warmup) or later (regular), mean ± std over seeds."""
    found = _with_file(runs, lambda d: d.memorization, lambda r: (r.dataset, r.method))
    if not found:
        return None
    many = len({d for d, _ in found}) > 1
    types = ("TP", "TN", "FN")
    header = ["Method / highest loss phase"] + list(types) + ["entries (TP / TN / FN)"]
    rows, cells = [], []
    for (d, meth) in sorted(found, key=lambda k: (dataset_key(k[0]), method_key(k[1]))):
        items = sorted(found[(d, meth)], key=lambda x: x[0].seed)
        label = (f"{dataset_name(d)} " if many else "") + method_name(meth)
        for phase, pkey in (("warmup (epoch 1)", "warmup_pct"), ("regular (epoch > 1)", "regular_pct")):
            row = [f"{label}: {phase}"]
            for t in types:
                vals = [m["table"][t][pkey] for _, m in items if m["table"][t][pkey] is not None]
                row.append(format_cell([v / 100.0 for v in vals], digits))
                mean, std = summary_pct([v / 100.0 for v in vals]) if vals else (float("nan"), float("nan"))
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
    found = _with_file(runs, lambda d: d.pointing, lambda r: (r.method, r.dataset))
    if not found:
        return None
    datasets = sorted({d for _, d in found}, key=dataset_key)
    methods = sorted({m for m, _ in found}, key=method_key)
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
                mean, std = summary_pct(vals)
                cells.append({"table": "pointing", "dataset": d, "method": m, "n_seeds": len(vals),
                              "pct_mean": mean, "pct_std": std, "runs": [str(r.path) for r, _ in items]})
        rows.append(row)
    footer = ["Pointing game (%): per class hits / (hits + misses) of the CAM maximum inside a box of the class, "
              "mean over classes; mean ± sample std over seeds.", "Evaluated: " + "; ".join(sorted(modes)) + "."]
    return Table("pointing", "Pointing game (paper Table 4 layout)", header, rows, cells, footer)


def precision_series(r: Run) -> dict[int, float]:
    """epoch -> precision of modification of one run: accumulated for LL-Cp (its modifications are the
    permanent corrections), per epoch for the others, as in the paper's Figure 4."""
    key = "precision_modified_cum" if r.method.endswith("ll_cp") else "precision_modified"
    return {e["epoch"]: float(e[key]) for e in r.epochs if e.get(key) is not None}


def precision_table(runs: list[Run], digits: int = 1) -> Table | None:
    """Figure 4 as a table: precision of modification (%) per epoch, rows = methods, mean ± std over seeds."""
    series: dict[tuple[str, str], list[tuple[Run, dict]]] = {}
    for r in runs:
        s = precision_series(r)
        if s:
            series.setdefault((r.dataset, r.method), []).append((r, s))
    if not series:
        return None
    many = len({d for d, _ in series}) > 1
    epochs = sorted({e for items in series.values() for _, s in items for e in s})
    header = ["Method"] + [f"epoch {e}" for e in epochs]
    rows, cells = [], []
    for (d, m) in sorted(series, key=lambda k: (dataset_key(k[0]), method_key(k[1]))):
        items = sorted(series[(d, m)], key=lambda x: x[0].seed)
        accumulated = " (accumulated)" if m.endswith("ll_cp") else ""
        row = [(f"{dataset_name(d)} " if many else "") + method_name(m) + accumulated]
        for e in epochs:
            vals = [s[e] for _, s in items if e in s]
            row.append(format_cell(vals, digits))
            if vals:
                mean, std = summary_pct(vals)
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
