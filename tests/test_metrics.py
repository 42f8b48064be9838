"""eval.metrics: AP equal to scikit-learn's average_precision_score over the known labels, the two
conventions for classes without a known positive, the flat / CSR entry points and the G1..G5 cut."""

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from largeloss.eval.metrics import (
    MapResult,
    average_precision_dense,
    average_precision_flat,
    class_groups,
    count_known,
    csr_known_entries,
    group_map,
    mean_average_precision,
    mean_average_precision_csr,
    mean_average_precision_flat,
)


def ap_of_column(scores, labels):
    """AP of a single class, through the dense entry point ([N, 1])."""
    ap, _, _ = average_precision_dense(np.asarray(scores)[:, None], np.asarray(labels, dtype=np.int8)[:, None])
    return float(ap[0])


# ---------------------------------------------------------------------------- hand-worked examples


def test_tie_example_from_the_brief():
    # scores [0.9, 0.8, 0.8, 0.1], labels [+, -, +, -]; #pos = 2. Thresholds at the distinct scores,
    # descending; the two 0.8s enter together:
    #   >= 0.9: tp 1 of 1 -> P = 1,   R = 1/2   (dR = 1/2)
    #   >= 0.8: tp 2 of 3 -> P = 2/3, R = 1     (dR = 1/2)
    #   >= 0.1: tp 2 of 4 -> P = 1/2, R = 1     (dR = 0)
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    for dtype in (np.float16, np.float32, np.float64):
        scores = np.array([0.9, 0.8, 0.8, 0.1], dtype=dtype)
        assert ap_of_column(scores, [1, -1, 1, -1]) == pytest.approx(5 / 6, abs=1e-12)
    assert average_precision_score([1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(5 / 6, abs=1e-12)


def test_unknown_entries_take_no_part():
    # scores [0.9, 0.8, 0.6, 0.5, 0.3], labels [0, +, -, +, -]: the 0.9 is unknown and skipped.
    # Known, descending: 0.8 +  (P = 1/1), 0.6 -, 0.5 +  (P = 2/3), 0.3 -   -> AP = (1 + 2/3) / 2 = 5/6.
    # Were the unknown counted as a negative: 0.9 -, 0.8 + (1/2), 0.6 -, 0.5 + (2/4) -> AP = 1/2.
    assert ap_of_column([0.9, 0.8, 0.6, 0.5, 0.3], [0, 1, -1, 1, -1]) == pytest.approx(5 / 6, abs=1e-12)


def test_negative_scores_and_a_tie_inside():
    # Logits as scores: [-2.0, -0.5, 1.5, -0.5], labels [+, -, +, +]; #pos = 3.
    #   >= 1.5:  tp 1 of 1 -> P = 1   (dR = 1/3)
    #   >= -0.5: tp 2 of 3 -> P = 2/3 (dR = 1/3; the tie holds one + and one -)
    #   >= -2.0: tp 3 of 4 -> P = 3/4 (dR = 1/3)
    # AP = (1 + 2/3 + 3/4) / 3 = (12 + 8 + 9) / 36 = 29/36
    assert ap_of_column([-2.0, -0.5, 1.5, -0.5], [1, -1, 1, 1]) == pytest.approx(29 / 36, abs=1e-12)


def test_all_scores_tied_is_one_threshold():
    # One threshold holding everything: P = 1/3 at R = 1 -> AP = 1/3 (the base rate).
    assert ap_of_column([0.5, 0.5, 0.5], [1, -1, -1]) == pytest.approx(1 / 3, abs=1e-12)
    # A negative tied above a positive: 0.7 {-, +}: P = 1/2, dR = 1/2; 0.2 {+}: P = 2/3, dR = 1/2
    # -> AP = 1/4 + 1/3 = 7/12
    assert ap_of_column([0.7, 0.7, 0.2], [-1, 1, 1]) == pytest.approx(7 / 12, abs=1e-12)


def test_plus_and_minus_zero_tie():
    # 0.0 (+) and -0.0 (-) are equal scores, hence one threshold: P = 1/2 -> AP = 1/2. Were -0.0 a
    # lower score than 0.0, the positive would come first alone and AP would be 1.
    for dtype in (np.float32, np.float64):
        scores = np.array([0.0, -0.0], dtype=dtype)
        assert ap_of_column(scores, [1, -1]) == pytest.approx(0.5, abs=1e-12)
        assert average_precision_score([1, 0], scores) == pytest.approx(0.5, abs=1e-12)


def test_perfect_ranking_and_positives_only():
    assert ap_of_column([0.9, 0.2, 0.1], [1, -1, -1]) == 1.0
    assert ap_of_column([0.1, 0.2], [1, 1]) == 1.0  # no known negative: every precision is 1


# ------------------------------------------------------------------------------- against sklearn


def sklearn_per_class(scores, labels):
    """The reference: scikit-learn on the known entries of each class, NaN without a positive."""
    out = []
    for k in range(labels.shape[1]):
        known = labels[:, k] != 0
        y = labels[known, k] > 0
        out.append(average_precision_score(y, scores[known, k]) if y.any() else np.nan)
    return np.array(out)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_with_ties_and_unknowns(dtype, seed):
    rng = np.random.default_rng(seed)
    n, k = 300, 25
    # Scores on a coarse grid, negative and positive, so that ties are frequent (21 levels for 300
    # samples); per-class positive rates and known fractions vary, some classes are tiny.
    scores = (rng.integers(-10, 11, size=(n, k)) / 4).astype(dtype)
    pos_rate = rng.uniform(0.02, 0.6, size=k)
    known_rate = rng.uniform(0.02, 1.0, size=k)
    sign = np.where(rng.random((n, k)) < pos_rate, 1, -1)
    labels = np.where(rng.random((n, k)) < known_rate, sign, 0).astype(np.int8)
    labels[:, 0] = -1  # a class with no positive at all
    labels[:, 1] = 0  # a class with nothing known
    expected = sklearn_per_class(scores, labels)
    ap, n_pos, n_known = average_precision_dense(scores, labels)
    np.testing.assert_allclose(ap, expected, rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(n_pos, (labels > 0).sum(0))
    np.testing.assert_array_equal(n_known, (labels != 0).sum(0))

    # The same entries through the flat and the CSR paths, in a shuffled order.
    rows, cols = np.nonzero(labels)
    perm = rng.permutation(rows.shape[0])
    rows, cols = rows[perm], cols[perm]
    flat = mean_average_precision_flat(cols, scores[rows, cols], labels[rows, cols] > 0, k)
    np.testing.assert_allclose(flat.per_class_ap, expected, rtol=0, atol=1e-6, equal_nan=True)
    pos_indptr, pos_indices = csr_of(labels > 0)
    neg_indptr, neg_indices = csr_of(labels < 0)
    csr = mean_average_precision_csr(scores, pos_indptr, pos_indices, neg_indptr, neg_indices)
    np.testing.assert_allclose(csr.per_class_ap, expected, rtol=0, atol=1e-6, equal_nan=True)
    assert csr.map == pytest.approx(np.nanmean(expected), abs=1e-6)


def csr_of(mask):
    """Per-row CSR (offsets, uint16 class ids) of a boolean [N, K] mask, as in labels.arrow."""
    indptr = np.concatenate(([0], np.cumsum(mask.sum(1)))).astype(np.int64)
    return indptr, np.nonzero(mask)[1].astype(np.uint16)


def test_large_random_float32_matches_sklearn():
    # More samples than tie levels in float16-rounded sigmoids: the regime of a real model's output.
    rng = np.random.default_rng(7)
    n, k = 4000, 6
    y = rng.random((n, k)) < 0.1
    scores = (1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 2 * y)))).astype(np.float16).astype(np.float32)
    labels = np.where(rng.random((n, k)) < 0.7, np.where(y, 1, -1), 0).astype(np.int8)
    np.testing.assert_allclose(average_precision_dense(scores, labels)[0], sklearn_per_class(scores, labels),
                               rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- conventions


def convention_example():
    # 4 classes over 4 images:
    #   class 0: scores [0.9, 0.8, 0.8, 0.1], labels [+, -, +, -]   -> AP 5/6 (the brief's example)
    #   class 1: scores [0.2, 0.6, 0.4, 0.3], labels [+, 0, -, +]   -> known desc 0.4 -, 0.3 +, 0.2 +
    #            P at the two positives: 1/2, 2/3                   -> AP (1/2 + 2/3) / 2 = 7/12
    #   class 2: only negatives known                               -> no AP
    #   class 3: nothing known                                      -> no AP
    scores = np.array([[0.9, 0.2, 0.5, 0.5],
                       [0.8, 0.6, 0.4, 0.5],
                       [0.8, 0.4, 0.3, 0.5],
                       [0.1, 0.3, 0.2, 0.5]], dtype=np.float32)
    labels = np.array([[1, 1, -1, 0],
                       [-1, 0, -1, 0],
                       [1, -1, 0, 0],
                       [-1, 1, -1, 0]], dtype=np.int8)
    return scores, labels


def test_exclude_convention():
    r = mean_average_precision(*convention_example())
    assert isinstance(r, MapResult) and r.convention == "exclude"
    np.testing.assert_allclose(r.per_class_ap[:2], [5 / 6, 7 / 12], atol=1e-12)
    assert np.isnan(r.per_class_ap[2]) and np.isnan(r.per_class_ap[3])
    np.testing.assert_array_equal(r.excluded, [2, 3])
    # mAP over the two included classes: (5/6 + 7/12) / 2 = (10/12 + 7/12) / 2 = 17/24
    assert r.map == pytest.approx(17 / 24, abs=1e-12)
    np.testing.assert_array_equal(r.n_known, [4, 3, 3, 0])
    np.testing.assert_array_equal(r.n_pos, [2, 2, 0, 0])


def test_cole_convention():
    r = mean_average_precision(*convention_example(), convention="cole")
    np.testing.assert_allclose(r.per_class_ap, [5 / 6, 7 / 12, 0.0, 0.0], atol=1e-12)
    assert r.excluded.size == 0 and r.convention == "cole"
    # AP 0 for the two classes, all four in the mean: (10/12 + 7/12 + 0 + 0) / 4 = 17/48
    assert r.map == pytest.approx(17 / 48, abs=1e-12)
    # sklearn's own answer for an all-negative class is 0 too (with a warning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert average_precision_score([0, 0, 0], [0.5, 0.4, 0.2]) == 0.0


def test_openimages_convention():
    # The official OpenImages metric: class 3 (nothing known) is skipped; class 2 (known negatives only) has
    # AP 0 and counts. Per class [5/6, 7/12, 0, NaN]; mAP over three classes: (10/12 + 7/12 + 0) / 3 = 17/36.
    scores, labels = convention_example()
    r = mean_average_precision(scores, labels, convention="openimages")
    assert r.convention == "openimages"
    np.testing.assert_allclose(r.per_class_ap[:3], [5 / 6, 7 / 12, 0.0], atol=1e-12)
    assert np.isnan(r.per_class_ap[3]) and r.excluded.tolist() == [3]
    assert r.map == pytest.approx(17 / 36, abs=1e-12)
    # The flat path (the known entries only, shuffled) and the CSR path give the same.
    rows, cols = np.nonzero(labels)
    perm = np.random.default_rng(0).permutation(rows.shape[0])
    rows, cols = rows[perm], cols[perm]
    flat = mean_average_precision_flat(cols, scores[rows, cols], labels[rows, cols] > 0, 4, convention="openimages")
    pos_indptr, pos_indices = csr_of(labels > 0)
    neg_indptr, neg_indices = csr_of(labels < 0)
    csr = mean_average_precision_csr(scores, pos_indptr, pos_indices, neg_indptr, neg_indices, "openimages")
    for other in (flat, csr):
        np.testing.assert_allclose(other.per_class_ap, r.per_class_ap, atol=1e-12, equal_nan=True)
        assert other.excluded.tolist() == [3] and other.map == pytest.approx(17 / 36, abs=1e-12)
    # The three conventions side by side on the same classes: exclude 17/24, cole 17/48, openimages 17/36.
    assert [mean_average_precision(scores, labels, c).map for c in ("exclude", "cole", "openimages")] == \
        pytest.approx([17 / 24, 17 / 48, 17 / 36], abs=1e-12)
    d = r.to_dict()
    assert d["map_convention"] == "openimages" and d["per_class_ap"][2] == 0.0 and d["per_class_ap"][3] is None


def test_no_class_with_a_positive_gives_nan_map():
    r = mean_average_precision(np.zeros((3, 2), np.float32), np.full((3, 2), -1, np.int8))
    assert np.isnan(r.map) and r.excluded.tolist() == [0, 1]
    assert mean_average_precision(np.zeros((3, 2), np.float32), np.full((3, 2), -1, np.int8), "cole").map == 0.0


def test_to_dict_is_strict_json():
    d = mean_average_precision(*convention_example()).to_dict()
    assert d["per_class_ap"][2] is None and d["excluded_classes"] == [2, 3]
    assert d["map_convention"] == "exclude"
    assert json.loads(json.dumps(d, allow_nan=False))["map"] == pytest.approx(17 / 24)


def test_empty_flat_input():
    r = mean_average_precision_flat(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool), 3)
    assert np.isnan(r.map) and r.excluded.tolist() == [0, 1, 2] and r.n_known.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------- errors


def test_bad_input_errors():
    scores, labels = convention_example()
    with pytest.raises(ValueError, match="same shape"):
        mean_average_precision(scores[:3], labels)
    with pytest.raises(ValueError, match=r"\+1 \(positive\)"):
        mean_average_precision(scores, labels * 2)
    with pytest.raises(ValueError, match="integers"):
        mean_average_precision(scores, labels.astype(np.float32))
    bad = scores.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        mean_average_precision(bad, labels)
    with pytest.raises(ValueError, match="unknown mAP convention"):
        mean_average_precision(scores, labels, convention="voc11")
    with pytest.raises(ValueError, match=r"class_ids must lie in \[0, 3\)"):
        average_precision_flat(np.array([0, 3]), np.array([0.1, 0.2], np.float32), np.array([True, False]), 3)
    with pytest.raises(ValueError, match="is_pos must be bool"):
        average_precision_flat(np.array([0, 1]), np.array([0.1, 0.2], np.float32), np.array([1, 0]), 3)
    with pytest.raises(ValueError, match="same length"):
        average_precision_flat(np.array([0, 1]), np.array([0.1], np.float32), np.array([True, False]), 3)


def test_csr_errors_and_flattening():
    # Image 0: pos {2}, neg {0, 1}; image 1: pos {}, neg {2}; image 2: pos {0, 1}, neg {}.
    pos_indptr, pos_indices = np.array([0, 1, 1, 3]), np.array([2, 0, 1], np.uint16)
    neg_indptr, neg_indices = np.array([0, 2, 3, 3]), np.array([0, 1, 2], np.uint16)
    rows, cls, is_pos = csr_known_entries(pos_indptr, pos_indices, neg_indptr, neg_indices)
    assert rows.tolist() == [0, 2, 2, 0, 0, 1]
    assert cls.tolist() == [2, 0, 1, 0, 1, 2]
    assert is_pos.tolist() == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="scores has 4 rows"):
        mean_average_precision_csr(np.zeros((4, 3), np.float32), pos_indptr, pos_indices, neg_indptr, neg_indices)
    with pytest.raises(ValueError, match="columns of scores"):
        mean_average_precision_csr(np.zeros((3, 2), np.float32), pos_indptr, pos_indices, neg_indptr, neg_indices)
    with pytest.raises(ValueError, match="end at len"):
        csr_known_entries(np.array([0, 1, 1, 4]), pos_indices, neg_indptr, neg_indices)
    with pytest.raises(ValueError, match="non-decreasing"):
        csr_known_entries(np.array([0, 2, 1, 3]), pos_indices, neg_indptr, neg_indices)


# --------------------------------------------------------------------------------------- groups


def test_count_known():
    # pos values [2, 0, 1] + neg values [0, 1, 2, 2] -> class 0: 2, class 1: 2, class 2: 3, class 3: 0
    assert count_known(np.array([2, 0, 1]), np.array([0, 1, 2, 2]), 4).tolist() == [2, 2, 3, 0]
    with pytest.raises(ValueError, match="neg_indices"):
        count_known(np.array([0]), np.array([4]), 4)


def test_class_groups_uneven_cut_and_stable_ties():
    # counts by class:   0:5  1:1  2:3  3:1  4:9  5:0  6:3
    # ascending, ties by class index: 5(0) 1(1) 3(1) 2(3) 6(3) 0(5) 4(9)
    # K = 7 into 5 groups: the first 7 % 5 = 2 groups take one extra class -> sizes 2, 2, 1, 1, 1
    groups = class_groups([5, 1, 3, 1, 9, 0, 3])
    assert [g.tolist() for g in groups] == [[5, 1], [3, 2], [6], [0], [4]]
    # per-class AP with class 2 excluded (NaN):
    ap = np.array([0.1, 0.2, np.nan, 0.4, 0.5, 0.6, 0.7])
    g = group_map(ap, groups)
    assert list(g) == ["G1", "G2", "G3", "G4", "G5", "All"]
    assert g["G1"] == pytest.approx((0.6 + 0.2) / 2)  # classes 5, 1
    assert g["G2"] == pytest.approx(0.4)  # classes 3, 2; 2 is NaN and left out
    assert (g["G3"], g["G4"], g["G5"]) == pytest.approx((0.7, 0.1, 0.5))
    assert g["All"] == pytest.approx((0.1 + 0.2 + 0.4 + 0.5 + 0.6 + 0.7) / 6)  # = 2.5 / 6


def test_class_groups_even_cut_and_empty_group():
    groups = class_groups(np.array([4, 3, 2, 1, 0, 9, 8, 7, 6, 5]))
    assert [g.tolist() for g in groups] == [[4, 3], [2, 1], [0, 9], [8, 7], [6, 5]]
    ap = np.full(10, np.nan)
    ap[[0, 9]] = [0.5, 1.0]
    g = group_map(ap, groups)
    assert np.isnan(g["G1"]) and g["G3"] == pytest.approx(0.75) and g["All"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="cannot cut 3 classes into 5"):
        class_groups([1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        group_map(ap, [np.array([10])])
