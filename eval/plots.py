"""Figures of the report (Agg canvas, no pyplot, no display): validation mAP per epoch, the sweeps
(Figure 5 / 6) and the precision of modification (Figure 4)."""
from __future__ import annotations

import math
import statistics

from .rundir import Run
from .tables import (
    ReportError,
    dataset_key,
    dataset_name,
    method_key,
    method_name,
    precision_series,
    sweep_table,
    value_key,
)


def plot_val_map(runs: list[Run], path) -> None:
    """Validation mAP (%) per epoch of every run, one panel per dataset; unfinished runs dashed, the
    best epoch of a finished run marked."""
    from matplotlib.ticker import MaxNLocator

    datasets = sorted({r.dataset for r in runs}, key=dataset_key)
    if not datasets:
        raise ReportError("nothing to plot: no runs")
    fig, axes = _figure(len(datasets))
    for ax, d in zip(axes[0], datasets):
        for r in sorted((r for r in runs if r.dataset == d), key=lambda r: (method_key(r.method), r.seed)):
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
            cs = sorted(cs, key=lambda c: value_key(c["column"].split("=", 1)[1]))
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
        s = precision_series(r)
        if s:
            groups.setdefault(r.dataset, {}).setdefault(r.method, []).append(s)
    if not groups:
        raise ReportError(
            "--plot-precision: no run has precision_modified in metrics.jsonl (train with analysis_entries > 0)"
        )
    datasets = sorted(groups, key=dataset_key)
    fig, axes = _figure(len(datasets))
    for ax, d in zip(axes[0], datasets):
        for m in sorted(groups[d], key=method_key):
            seeds = groups[d][m]
            epochs = sorted({e for s in seeds for e in s})
            mean = [statistics.fmean(100 * s[e] for s in seeds if e in s) for e in epochs]
            std = [statistics.stdev([100 * s[e] for s in seeds if e in s]) if sum(e in s for s in seeds) > 1 else 0.0
                   for e in epochs]
            (line,) = ax.plot(epochs, mean, marker="o",
                              label=method_name(m) + (" (accumulated)" if m.endswith("ll_cp") else "")
                              + f", {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
            ax.fill_between(epochs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(f"precision of modification: {dataset_name(d)}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("truly positive among modified (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
