"""The paper's diagnostics of training: memorisation (section 3.2, Table 1, Figure 1) and the precision of
modification (section 4.3, Figure 4). ANALYSIS ONLY: this is the one place besides evaluation that reads the
truth of training labels (``LabelStore.truth_for_analysis``), and nothing here feeds the loss.

Entry types (docs/ARCHITECTURE.md section 2; label encoding +1 / -1 / 0)
------------------------------------------------------------------------
An *entry* is one (training sample, class) pair. With the observed labels of the run's protocol and the
truth of the source:

- ``TP``: observed positive (its truth is positive: protocols only ever observe true labels);
- ``TN``: unobserved and truly negative (an assumed negative that is right);
- ``FN``: unobserved and truly positive (an assumed negative that is wrong: the label noise of AN).

Observed negatives (partial-label protocols) are clean and take no part in Table 1; unobserved entries
whose truth is itself unknown (OpenImages) cannot be typed and are left out too.

Memorisation tracker (Table 1, Figure 1)
----------------------------------------
A fixed random subset of entries is drawn once, stratified by type so that the rare false negatives are
well represented: ``num_entries // 3`` each of TP and FN and the rest TN, uniformly without replacement
within each type (a type with fewer entries contributes all of them). For large training sets the draw
is made among at most ``max_images`` images, themselves drawn uniformly. The draw depends only on
(store, sample_ids, num_entries, seed, max_images).

At the end of every epoch the images holding tracked entries (``image_ids``) are scored without
augmentation and ``update(epoch, ids, logits)`` records, per tracked entry, the BCE of its logit against
its *training* target: ``LabelStore.targets`` (the AN target, plus LL-Cp corrections where the run makes
them), never the truth. Several updates of one entry in one epoch are averaged. ``finish()`` writes, under
``out_dir``:

- ``memorization.json``: per type the number of entries, how many have their highest loss in epoch 1
  (the paper's "warmup" phase) or later ("regular"), the shares in percent, the histogram of the epoch of
  the highest loss, and the mean loss per type per epoch;
- ``table1.md``: Table 1's layout (rows Warmup / Regular, columns TP / TN / FN, percent);
- ``memorization.png``: Figure 1's kind of plot: mean loss per type per epoch, and a few single entries;
- ``memorization_entries.npz``: the tracked entries (sample, class, type) and their loss per epoch.

The highest loss of an entry is taken over the epochs at which it was scored; a tie goes to the earliest
epoch. An entry missing from some recorded epoch (a sample the loader skipped) is left out of the table
and counted as ``incomplete``.

Precision of modification (Figure 4)
------------------------------------
``PrecisionTracker.update(epoch, ids, modified)`` takes the loss's mask of modified entries of a batch
(``LossOutput.modified``; for LL-Cp the trainer passes its permanent corrections, ``LossOutput.corrections``,
which under ``ll_selection=official`` are fewer than the entries modified in the step); ``end_epoch``
returns the record to log into metrics.jsonl: of the entries modified in the epoch, the number and the
share that are truly positive (``precision_modified``), and the same accumulated over all epochs so far
(``..._cum``). The paper plots the per-epoch precision for LL-R /
LL-Ct and the accumulated one for LL-Cp, whose modifications are the permanent corrections (in LL-Cp an
entry is modified at most once, so the accumulated count is the size of the corrections set; see
``corrections_precision``). Entries whose truth is unknown are counted apart and left out of the ratio.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..shards.format import write_json_atomic

__all__ = [
    "TYPES",
    "MemorizationTracker",
    "PrecisionTracker",
    "bce_with_logits",
    "entry_types",
    "corrections_precision",
    "render_table1",
    "predict_logits",
]

#: entry types, in the paper's column order; the int8 code of a type is its index here
TYPES = ("TP", "TN", "FN")
_UNTYPED = -1  # observed negative, or unobserved with unknown truth
STATE_NAME = "memorization_entries.npz"
_SCAN_CHUNK = 2048  # images typed at a time while drawing the subset (bounds the dense [chunk, K] buffers)


def bce_with_logits(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-entry binary cross-entropy on logits in float64, the stable form of
    ``-(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))`` = ``max(x, 0) - x y + log(1 + exp(-|x|))``
    (what ``torch.nn.functional.binary_cross_entropy_with_logits`` computes)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    return np.maximum(x, 0.0) - x * y + np.log1p(np.exp(-np.abs(x)))


def entry_types(target: np.ndarray, unknown: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """int8 type codes [B, K] (index into ``TYPES``; -1 untyped) from the training view of a batch
    (``LabelStore.targets``: AN target, unknown mask) and its truth (+1 / -1 / 0)."""
    target = np.asarray(target)
    unknown = np.asarray(unknown, dtype=bool)
    truth = np.asarray(truth)
    if not (target.shape == unknown.shape == truth.shape):
        raise ValueError(
            f"entry_types: shapes differ: target {target.shape}, unknown {unknown.shape}, truth {truth.shape}"
        )
    out = np.full(target.shape, _UNTYPED, dtype=np.int8)
    # An LL-Cp correction reads as target 1 and not unknown: it is typed like an observed positive.
    # An observed negative (target 0, not unknown) stays untyped.
    observed_pos = (target > 0.5) & ~unknown
    out[observed_pos] = 0
    out[unknown & (truth == -1)] = 1
    out[unknown & (truth == 1)] = 2
    return out


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _fmt_pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def render_table1(summary: dict, title: str = "Distribution of the highest loss occurrence (paper Table 1)") -> str:
    """Markdown of Table 1 from ``memorization.json``'s ``table`` (shares in percent)."""
    table = summary["table"]
    lines = [f"### {title}", "", "| Highest loss phase | TP | TN | FN |", "| :-- | --: | --: | --: |"]
    for phase, key in (("Warmup (epoch 1)", "warmup_pct"), ("Regular (epoch > 1)", "regular_pct")):
        lines.append(f"| {phase} | " + " | ".join(_fmt_pct(table[t][key]) for t in TYPES) + " |")
    lines.append("| entries | " + " | ".join(str(table[t]["n"]) for t in TYPES) + " |")
    lines.append("")
    lines.append(f"Epochs recorded: {summary['epochs'][0]}..{summary['epochs'][-1]}; loss = BCE against the "
                 "training target (AN), scored at the end of each epoch; TP observed positive, TN/FN unobserved "
                 "and truly negative/positive.")
    return "\n".join(lines) + "\n"


def predict_logits(model, loader, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [N], logits float32 [N, K]) of every batch of ``loader`` (which yields (uint8 images, ids)),
    the model in eval mode and without gradient: the scoring for ``MemorizationTracker.score_epoch``. Call it
    on one process with the unwrapped model (``accelerator.unwrap_model``): it makes no collective call."""
    import torch

    was_training = model.training
    model.eval()
    ids_all, logits_all = [], []
    try:
        with torch.no_grad():
            for images, ids in loader:
                if device is not None:
                    images = images.to(device, non_blocking=True)
                ids_all.append(np.asarray(_to_numpy(ids), dtype=np.int64).reshape(-1))
                logits_all.append(np.asarray(_to_numpy(model(images)), dtype=np.float32))
    finally:
        model.train(was_training)
    if not ids_all:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(ids_all), np.concatenate(logits_all)


class MemorizationTracker:
    """Loss of a fixed random subset of training entries at every epoch (see the module docstring).

    ``store`` is the run's training LabelStore, ``sample_ids`` the training images (e.g. the 80 % cut),
    ``out_dir`` where ``finish`` writes. ``resume_after_epoch``: continue a tracker saved by ``save`` in
    ``out_dir`` (the same draw is checked), keeping only the epochs up to that one.
    """

    def __init__(self, store, sample_ids, num_entries: int, seed: int, out_dir: str | os.PathLike, *,
                 max_images: int = 20000, resume_after_epoch: int | None = None):
        if isinstance(num_entries, bool) or not isinstance(num_entries, (int, np.integer)) or num_entries < 3:
            raise ValueError(
                f"MemorizationTracker: num_entries must be an integer >= 3 (one per type), got {num_entries!r}"
            )
        if max_images < 1:
            raise ValueError(f"MemorizationTracker: max_images must be >= 1, got {max_images}")
        self.store = store
        self.num_entries = int(num_entries)
        self.seed = int(seed)
        self.max_images = int(max_images)
        self.out_dir = Path(out_dir)
        ids = np.unique(np.asarray(_to_numpy(sample_ids), dtype=np.int64))
        generation = getattr(store, "generation", -1)
        if generation != -1:
            # the draw types entries by the protocol's labels: with LL-Cp corrections applied a resumed run
            # would type (and so draw) differently from the run it continues
            raise ValueError(f"MemorizationTracker: the store already uses corrections generation {generation}; "
                             "create the tracker before LabelStore.use_generation (right after building the store)")
        if not len(ids):
            raise ValueError("MemorizationTracker: no training sample ids")
        self.sample, self.cls, self.type = self._draw(ids)
        if not len(self.sample):
            raise ValueError("MemorizationTracker: the training images have no entry of type TP, TN or FN")
        #: the images to score at the end of every epoch (sorted, unique)
        self.image_ids = np.unique(self.sample)
        # tracked entries of image_ids[i] are sample[_bounds[i]:_bounds[i + 1]] (entries sorted by sample)
        self._bounds = np.searchsorted(self.sample, np.append(self.image_ids, self.image_ids[-1] + 1), side="left")
        self._sum: dict[int, np.ndarray] = {}
        self._count: dict[int, np.ndarray] = {}
        if resume_after_epoch is not None:
            self._load(int(resume_after_epoch))

    # ------------------------------------------------------------------------------- the draw

    def _draw(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0x6D656D])  # a stream of its own: "mem"
        if len(ids) > self.max_images:
            ids = np.sort(rng.choice(ids, size=self.max_images, replace=False))
        quota = {0: self.num_entries // 3, 2: self.num_entries // 3}
        quota[1] = self.num_entries - quota[0] - quota[2]
        k = self.store.num_classes
        # Uniform sampling without replacement per type, in one pass: every entry gets a random key and
        # each type keeps its `quota` smallest keys (the keys are drawn in a fixed order: chunk by chunk).
        kept: dict[int, tuple[np.ndarray, np.ndarray]] = {t: (np.zeros(0), np.zeros(0, np.int64)) for t in quota}
        for start in range(0, len(ids), _SCAN_CHUNK):
            chunk = ids[start:start + _SCAN_CHUNK]
            target, unknown = self.store.targets(chunk)
            truth = self.store.truth_for_analysis(chunk)
            types = entry_types(target.numpy(), unknown.numpy(), truth).reshape(-1)
            keys = rng.random(types.shape[0])
            flat = (chunk[:, None] * k + np.arange(k)[None, :]).reshape(-1)
            for t, q in quota.items():
                sel = types == t
                all_keys = np.concatenate([kept[t][0], keys[sel]])
                all_flat = np.concatenate([kept[t][1], flat[sel]])
                if len(all_keys) > q:
                    keep = np.argsort(all_keys, kind="stable")[:q]
                    all_keys, all_flat = all_keys[keep], all_flat[keep]
                kept[t] = (all_keys, all_flat)
        flat = np.concatenate([kept[t][1] for t in (0, 1, 2)])
        code = np.concatenate([np.full(len(kept[t][1]), t, np.int8) for t in (0, 1, 2)])
        order = np.argsort(flat, kind="stable")  # entries sorted by (sample, class)
        flat, code = flat[order], code[order]
        return flat // k, flat % k, code

    # ----------------------------------------------------------------------------- recording

    @property
    def epochs(self) -> list[int]:
        return sorted(self._sum)

    def update(self, epoch: int, ids, logits) -> int:
        """Record the loss of the tracked entries of a batch: ``ids`` int [B] sample ids, ``logits``
        float [B, K] (torch or numpy). Samples without tracked entries are ignored. Returns the number
        of entries recorded. The target is the training one (``store.targets``); truth is not read."""
        epoch = int(epoch)
        if epoch < 1:
            raise ValueError(f"MemorizationTracker.update: epochs are 1-based, got {epoch}")
        ids = np.asarray(_to_numpy(ids), dtype=np.int64).reshape(-1)
        logits = np.asarray(_to_numpy(logits))
        if logits.shape != (len(ids), self.store.num_classes):
            raise ValueError(f"MemorizationTracker.update: logits shape {logits.shape}, expected "
                             f"({len(ids)}, {self.store.num_classes})")
        pos = np.searchsorted(self.image_ids, ids)
        pos = np.minimum(pos, len(self.image_ids) - 1)
        hit = self.image_ids[pos] == ids
        if not hit.any():
            return 0
        rows = np.flatnonzero(hit)
        first = self._bounds[pos[rows]]
        counts = self._bounds[pos[rows] + 1] - first
        entry = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        row = np.repeat(rows, counts)
        target, _ = self.store.targets(ids[rows])
        target = target.numpy()
        local = np.repeat(np.arange(len(rows)), counts)
        loss = bce_with_logits(logits[row, self.cls[entry]], target[local, self.cls[entry]])
        if epoch not in self._sum:
            self._sum[epoch] = np.zeros(len(self.sample), np.float64)
            self._count[epoch] = np.zeros(len(self.sample), np.int32)
        np.add.at(self._sum[epoch], entry, loss)
        np.add.at(self._count[epoch], entry, 1)
        return int(len(entry))

    def score_epoch(self, epoch: int, predict_logits: Callable[[np.ndarray], tuple]) -> None:
        """Score ``image_ids`` for ``epoch`` and save the state: ``predict_logits(image_ids)`` returns
        (ids, logits) for those images (any order, each once), e.g. a no-augmentation forward pass."""
        ids, logits = predict_logits(self.image_ids)
        self.update(epoch, ids, logits)
        missing = int((self._count[epoch] == 0).sum()) if epoch in self._count else len(self.sample)
        if missing:
            raise RuntimeError(f"MemorizationTracker: epoch {epoch}: {missing} tracked entries were not scored; "
                               "predict_logits must return every id of image_ids")
        self.save()

    def loss_matrix(self) -> tuple[list[int], np.ndarray]:
        """(epochs, float64 [E_entries, n_epochs]): the mean loss per entry and epoch; NaN where not scored."""
        epochs = self.epochs
        out = np.full((len(self.sample), len(epochs)), np.nan)
        for j, e in enumerate(epochs):
            c = self._count[e]
            out[c > 0, j] = self._sum[e][c > 0] / c[c > 0]
        return epochs, out

    # ------------------------------------------------------------------------------ results

    def summary(self) -> dict:
        """Table 1 and the per-epoch curves as a JSON-ready dict (see the module docstring)."""
        epochs, losses = self.loss_matrix()
        if not epochs or epochs[0] != 1:
            raise ValueError(f"MemorizationTracker: epoch 1 was not recorded (epochs {epochs}); Table 1 compares "
                             "epoch 1 with the later ones. A resumed run needs resume_after_epoch")
        complete = ~np.isnan(losses).any(axis=1)
        # nanargmax on complete rows = argmax; ties go to the first (earliest) epoch
        peak = np.full(len(self.sample), -1, np.int64)
        if complete.any():
            peak[complete] = np.asarray(epochs)[np.argmax(losses[complete], axis=1)]
        table, curves = {}, {}
        for code, name in enumerate(TYPES):
            of_type = self.type == code
            ok = of_type & complete
            n = int(ok.sum())
            warm = int((peak[ok] == 1).sum())
            table[name] = {
                "n": n,
                "warmup": warm,
                "regular": n - warm,
                "warmup_pct": 100.0 * warm / n if n else None,
                "regular_pct": 100.0 * (n - warm) / n if n else None,
                "incomplete": int((of_type & ~complete).sum()),
                "peak_epoch_hist": {str(e): int((peak[ok] == e).sum()) for e in epochs},
            }
            with np.errstate(all="ignore"):
                curves[name] = [None if not (of_type & ~np.isnan(losses[:, j])).any()
                                else float(np.nanmean(losses[of_type, j])) for j in range(len(epochs))]
        return {
            "epochs": epochs,
            "num_entries": int(len(self.sample)),
            "num_images": int(len(self.image_ids)),
            "requested_entries": self.num_entries,
            "seed": self.seed,
            "target": "training target (LabelStore.targets: AN + corrections in use), scored at each epoch end",
            "table": table,
            "mean_loss": curves,
        }

    def save(self) -> Path:
        """Write the tracked entries and the losses so far to ``out_dir/memorization_entries.npz`` (atomic)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        epochs, losses = self.loss_matrix()
        path = self.out_dir / STATE_NAME
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez(tmp, sample=self.sample, cls=self.cls, type=self.type, epochs=np.asarray(epochs, np.int64),
                 loss=losses, seed=np.int64(self.seed), num_entries=np.int64(self.num_entries),
                 types=np.asarray(TYPES))
        os.replace(tmp, path)
        return path

    def _load(self, after_epoch: int) -> None:
        path = self.out_dir / STATE_NAME
        if not path.is_file():
            if after_epoch >= 1:
                raise FileNotFoundError(f"{path}: no memorisation state to resume after epoch {after_epoch}")
            return
        with np.load(path) as z:
            same = (np.array_equal(z["sample"], self.sample) and np.array_equal(z["cls"], self.cls)
                    and np.array_equal(z["type"], self.type))
            if not same:
                raise ValueError(f"{path}: tracks other entries than this run draws (another seed, subset or "
                                 "labels); remove it to start the analysis afresh")
            for j, e in enumerate(z["epochs"].tolist()):
                if e > after_epoch:
                    continue
                col = z["loss"][:, j]
                ok = ~np.isnan(col)
                self._sum[e] = np.where(ok, col, 0.0)
                self._count[e] = ok.astype(np.int32)

    def finish(self, title: str | None = None) -> dict:
        """Write memorization.json, table1.md, memorization.png and the entries file; return the summary."""
        summary = self.summary()
        self.save()
        write_json_atomic(self.out_dir / "memorization.json", json.dumps(summary, indent=1))
        write_json_atomic(self.out_dir / "table1.md", render_table1(summary))
        self.plot(self.out_dir / "memorization.png", title=title)
        return summary

    def plot(self, path: str | os.PathLike, title: str | None = None, examples: int = 3) -> None:
        """Figure 1's kind of plot: left, the mean loss per type per epoch; right, ``examples`` random
        TN and FN entries (seeded). Agg canvas, no display."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        epochs, losses = self.loss_matrix()
        colors = {"TP": "tab:green", "TN": "tab:blue", "FN": "tab:red"}
        fig = Figure(figsize=(10, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax_mean, ax_one = fig.subplots(1, 2)
        with np.errstate(all="ignore"):
            for code, name in enumerate(TYPES):
                rows = losses[self.type == code]
                if len(rows):
                    ax_mean.plot(epochs, np.nanmean(rows, axis=0), marker="o", color=colors[name],
                                 label=f"{name} (n={len(rows)})")
        rng = np.random.default_rng([self.seed, 0x706C74])  # "plt"
        for code, name in ((1, "TN"), (2, "FN")):
            idx = np.flatnonzero(self.type == code)
            for e in rng.permutation(idx)[:examples]:
                ax_one.plot(epochs, losses[e], marker=".", color=colors[name], alpha=0.8,
                            label=f"{name} (sample {self.sample[e]}, class {self.cls[e]})")
        for ax, t in ((ax_mean, "mean loss per entry type"), (ax_one, "single entries")):
            ax.set_xlabel("epoch")
            ax.set_ylabel("BCE against the training (AN) target")
            ax.set_yscale("log")  # the TN / FN losses sit far below the TP ones
            ax.set_title(t)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize="small")
        if title:
            fig.suptitle(title)
        fig.savefig(path, dpi=110)


class PrecisionTracker:
    """Precision of the large-loss modifications (Figure 4); see the module docstring.

    Call ``update`` for every training batch with the loss's ``modified`` mask, then ``end_epoch`` once per
    epoch. ``update`` counts on the mask's device and never waits for it (the truth of the batch goes to the
    device, the counts stay there); ``end_epoch`` reads them, once. Under several processes pass ``reduce`` to
    ``end_epoch``: a function summing an int64 tensor of counts over the processes (e.g. ``accelerator.reduce``),
    so every process logs the same.
    """

    COUNT_KEYS = ("num_modified", "num_modified_true", "num_modified_truth_unknown")

    def __init__(self, store):
        self.store = store
        self._epoch: int | None = None
        self._counts = None  # this epoch: int64 [3] (modified, truly positive, truth unknown) on the device
        self._cum = np.zeros(3, np.int64)
        self.history: list[dict] = []

    def _start(self, epoch: int) -> None:
        if self._epoch is None:
            self._epoch = epoch
        elif epoch != self._epoch:
            raise ValueError(f"PrecisionTracker: update for epoch {epoch} while epoch {self._epoch} is open; "
                             "call end_epoch first")

    def update(self, epoch: int, ids, modified) -> None:
        """``ids`` int [B] sample ids (host), ``modified`` bool [B, K] (the loss's ``LossOutput.modified``, a
        tensor on any device, or a numpy array)."""
        import torch

        self._start(int(epoch))
        mask = modified.detach() if isinstance(modified, torch.Tensor) else torch.from_numpy(
            np.asarray(modified, dtype=bool))
        ids = (ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).astype(np.int64).reshape(-1)
        if tuple(mask.shape) != (len(ids), self.store.num_classes):
            raise ValueError(f"PrecisionTracker.update: mask shape {tuple(mask.shape)}, expected "
                             f"({len(ids)}, {self.store.num_classes})")
        mask = mask.to(torch.bool)
        truth = torch.from_numpy(self.store.truth_for_analysis(ids)).to(mask.device, non_blocking=True)
        counts = torch.stack([mask.sum(), (mask & (truth == 1)).sum(), (mask & (truth == 0)).sum()])
        self._counts = counts if self._counts is None else self._counts + counts

    def end_epoch(self, epoch: int, reduce: Callable | None = None) -> dict:
        """Close ``epoch`` and return its record (counts, ``precision_modified``, and the ``_cum`` ones).
        Precision is None when nothing with a known truth was modified (e.g. epoch 1)."""
        import torch

        epoch = int(epoch)
        if self._epoch is not None and self._epoch != epoch:
            raise ValueError(f"PrecisionTracker.end_epoch({epoch}) but the open epoch is {self._epoch}")
        counts = torch.zeros(3, dtype=torch.int64) if self._counts is None else self._counts
        if reduce is not None:
            counts = reduce(counts)
        counts = counts.cpu().numpy().astype(np.int64).reshape(3)
        self._cum += counts
        rec = {"epoch": epoch}
        for suffix, c in (("", counts), ("_cum", self._cum)):
            for key, v in zip(self.COUNT_KEYS, c):
                rec[key + suffix] = int(v)
            known = int(c[0] - c[2])
            rec["precision_modified" + suffix] = float(c[1]) / known if known else None
        self.history.append(rec)
        self._epoch, self._counts = None, None
        return {k: v for k, v in rec.items() if k != "epoch"}

    def state(self) -> dict:
        """Cumulative counts, for a checkpoint."""
        return {"cum": self._cum.tolist()}

    def load_state(self, state: dict) -> None:
        cum = state.get("cum")
        if not (isinstance(cum, list) and len(cum) == 3):
            raise ValueError(f"PrecisionTracker.load_state: expected {{'cum': [3 counts]}}, got {state!r}")
        self._cum = np.asarray(cum, np.int64)


def corrections_precision(store) -> dict:
    """Precision of the LL-Cp corrections of the generation in use (``corrections_for_analysis``): the
    accumulated precision of LL-Cp computed from the label store itself rather than from the loss masks."""
    s, c = store.corrections_for_analysis()
    if not len(s):
        return {"num_corrections": 0, "num_corrections_true": 0, "num_corrections_truth_unknown": 0,
                "precision_corrections": None}
    order = np.argsort(s, kind="stable")
    s, c = s[order], c[order]
    uniq, first = np.unique(s, return_index=True)
    truth = store.truth_for_analysis(uniq)
    row = np.repeat(np.arange(len(uniq)), np.diff(np.append(first, len(s))))
    t = truth[row, c]
    known = int((t != 0).sum())
    n_true = int((t == 1).sum())
    return {"num_corrections": int(len(s)), "num_corrections_true": n_true,
            "num_corrections_truth_unknown": int(len(s) - known),
            "precision_corrections": n_true / known if known else None}
