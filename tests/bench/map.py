"""Benchmark: mAP at OpenImages V3 test scale, eval.metrics against scikit-learn's per-class loop.

    python tests/bench/map.py [--images 125436] [--classes 5000] [--known-per-image 13]
                              [--sklearn-classes 100] [--seed 0] [--dense-scores]

Synthetic labels shaped like OpenImages' human-verified ones: ~13 known labels per image (Poisson),
classes drawn from a Zipf-like law over a shuffled class order (skewed frequencies: a few classes
known on tens of thousands of test images, many on a handful), a positive rate per class, and scores
that are float16-rounded sigmoids (so ties are common, as with half-precision inference). Only the
scores of the known entries are kept (the flat form ``mean_average_precision_flat`` takes);
``--dense-scores`` also builds the full float32 [N, K] matrix (2.5 GB at full scale) and times the
CSR path that gathers from it.

The baseline calls ``sklearn.metrics.average_precision_score`` once per class on that class's known
entries, with the grouping by class done beforehand and not timed (the most favourable loop). It is
timed on ``--sklearn-classes`` classes spread evenly over the frequency ranking and scaled to all
classes; the equality check (1e-6) is on the same classes. A second section compares the dense path
on a COCO-sized fully labelled matrix (40,137 x 80). The speed-up ratio is printed last.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

if "largeloss" not in sys.modules:  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2])]
    sys.modules["largeloss"] = _pkg

from largeloss.eval.metrics import (  # noqa: E402
    class_groups,
    group_map,
    mean_average_precision,
    mean_average_precision_csr,
    mean_average_precision_flat,
)


def synth(n_images: int, n_classes: int, per_image: float, seed: int):
    """Known entries as CSR-ordered flat arrays (rows, class_ids, is_pos, scores) + train counts."""
    rng = np.random.default_rng(seed)
    rank_weight = 1.0 / (np.arange(n_classes) + 20.0) ** 1.1  # Zipf-like over frequency rank
    p = np.empty(n_classes)
    p[rng.permutation(n_classes)] = rank_weight / rank_weight.sum()
    counts = np.maximum(rng.poisson(per_image, n_images), 1)
    rows = np.repeat(np.arange(n_images, dtype=np.int64), counts)
    cls = rng.choice(n_classes, size=rows.shape[0], p=p)
    key = np.unique(rows * n_classes + cls)  # a class at most once per image; sorted = CSR order
    rows, cls = key // n_classes, key % n_classes
    pos_rate = rng.uniform(0.1, 0.9, n_classes)
    is_pos = rng.random(rows.shape[0]) < pos_rate[cls]
    logits = rng.normal(size=rows.shape[0]) + 1.5 * is_pos
    scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float16).astype(np.float32)
    train_counts = rng.poisson(p * 3.4e6 * per_image)  # training images with a known label, per class
    return rows, cls, is_pos, scores, train_counts


def sklearn_loop(cls, is_pos, scores, classes):
    """scikit-learn's AP per class on pre-grouped known entries; returns (ap, seconds in the loop)."""
    from sklearn.metrics import average_precision_score

    order = np.argsort(cls, kind="stable")
    bounds = np.searchsorted(cls[order], np.arange(cls.max() + 2))
    slices = {k: order[bounds[k]:bounds[k + 1]] for k in classes}
    out = np.empty(len(classes))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found": AP 0, compared below
        for i, k in enumerate(classes):
            idx = slices[k]
            out[i] = average_precision_score(is_pos[idx], scores[idx])
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--images", type=int, default=125_436, help="test images (OpenImages V3: 125,436)")
    ap.add_argument("--classes", type=int, default=5_000, help="classes (OpenImages V3: 5,000)")
    ap.add_argument("--known-per-image", type=float, default=13.0, help="mean known labels per image")
    ap.add_argument("--sklearn-classes", type=int, default=100, help="classes timed with scikit-learn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-scores", action="store_true",
                    help="also time the CSR path on a dense float32 score matrix (2.5 GB at full scale)")
    args = ap.parse_args(argv)
    n, k = args.images, args.classes

    t0 = time.perf_counter()
    rows, cls, is_pos, scores, train_counts = synth(n, k, args.known_per_image, args.seed)
    t_synth = time.perf_counter() - t0
    n_known = np.bincount(cls, minlength=k)
    print(f"data: {n:,} images x {k:,} classes, {rows.shape[0]:,} known labels "
          f"({rows.shape[0] / n:.1f} per image), per-class known min/median/max "
          f"{n_known.min()}/{int(np.median(n_known))}/{n_known.max()}, "
          f"{np.unique(scores).shape[0]:,} distinct scores; generated in {t_synth:.1f} s")

    # ours: per-class AP of all classes, then the full report (AP + groups + G1..G5/All means)
    t0 = time.perf_counter()
    res = mean_average_precision_flat(cls, scores, is_pos, k)
    t_ap = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = mean_average_precision_flat(cls, scores, is_pos, k)
    groups = class_groups(train_counts)
    gm = group_map(res.per_class_ap, groups)
    t_report = time.perf_counter() - t0

    # scikit-learn on classes spread over the frequency ranking, scaled to all classes
    s = min(args.sklearn_classes, k)
    by_freq = np.argsort(n_known, kind="stable")
    subset = by_freq[np.linspace(0, k - 1, s).round().astype(int)]
    ref, t_sk = sklearn_loop(cls, is_pos, scores, subset)
    t_sk_scaled = t_sk * k / s
    ours = np.where(res.n_pos[subset] > 0, res.per_class_ap[subset], 0.0)  # sklearn: 0 without a positive
    max_diff = float(np.abs(ours - ref).max())

    t_csr = None
    if args.dense_scores:
        dense = np.random.default_rng(args.seed + 1).random((n, k), dtype=np.float32)
        dense[rows, cls] = scores
        pos_rows, neg_rows = rows[is_pos], rows[~is_pos]
        pos_indptr = np.concatenate(([0], np.cumsum(np.bincount(pos_rows, minlength=n))))
        neg_indptr = np.concatenate(([0], np.cumsum(np.bincount(neg_rows, minlength=n))))
        t0 = time.perf_counter()
        res_csr = mean_average_precision_csr(dense, pos_indptr, cls[is_pos], neg_indptr, cls[~is_pos])
        t_csr = time.perf_counter() - t0
        del dense
        assert np.allclose(res_csr.per_class_ap, res.per_class_ap, atol=1e-12, equal_nan=True)

    # dense path, COCO-sized fully labelled matrix
    rng = np.random.default_rng(args.seed + 2)
    y = rng.random((40_137, 80)) < 0.03
    dscores = (1 / (1 + np.exp(-(rng.normal(size=y.shape) + 2 * y)))).astype(np.float32)
    dlabels = np.where(y, 1, -1).astype(np.int8)
    t0 = time.perf_counter()
    dres = mean_average_precision(dscores, dlabels)
    t_dense = time.perf_counter() - t0
    dref, t_dense_sk = sklearn_loop(np.tile(np.arange(80), 40_137), dlabels.ravel() > 0, dscores.ravel(),
                                    np.arange(80))
    dense_diff = float(np.abs(dres.per_class_ap - dref).max())

    rows_out = [
        (f"scikit-learn loop, {s} classes (measured)", t_sk),
        (f"scikit-learn loop, {k:,} classes (scaled x{k / s:g})", t_sk_scaled),
        (f"ours: per-class AP, {k:,} classes (flat)", t_ap),
        ("ours: full report (AP + groups + G1..G5, All)", t_report),
    ]
    if t_csr is not None:
        rows_out.append(("ours: per-class AP from dense [N,K] scores (CSR)", t_csr))
    rows_out += [
        ("dense 40,137 x 80 (COCO val size): scikit-learn loop", t_dense_sk),
        ("dense 40,137 x 80 (COCO val size): ours", t_dense),
    ]
    width = max(len(r[0]) for r in rows_out)
    print(f"\n{'what':<{width}}  seconds")
    for name, sec in rows_out:
        print(f"{name:<{width}}  {sec:8.3f}")
    print(f"\nmAP {100 * res.map:.2f} (exclude: {res.excluded.size} classes without a known positive); "
          + ", ".join(f"{g} {100 * v:.2f}" for g, v in gm.items()))
    print(f"max |ours - sklearn| on {s} classes: {max_diff:.2e}; on the dense 80 classes: {dense_diff:.2e}")
    ok = max_diff <= 1e-6 and dense_diff <= 1e-6
    print(f"equal to 1e-6: {'yes' if ok else 'NO'}; full report <= 30 s: {'yes' if t_report <= 30 else 'NO'}")
    print(f"dense path speed-up vs scikit-learn: {t_dense_sk / t_dense:.1f}x")
    print(f"speed-up (scikit-learn loop, scaled to {k:,} classes / ours, full report): "
          f"{t_sk_scaled / t_report:.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
