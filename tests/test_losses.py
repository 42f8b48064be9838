"""Hand-worked tests for train/losses.py.

Logits are chosen as logs of simple ratios so that every sigmoid and BCE is a closed form:

    x       sigmoid p   BCE(x, 0) = -ln(1-p)        BCE(x, 1) = -ln p
    ln 9    0.9         ln 10     = 2.3025851  (G)  ln(10/9) = 0.1053605  (A)
    ln 4    0.8         ln 5      = 1.6094379  (E)  ln(5/4)  = 0.2231436
    ln 3    0.75        ln 4      = 1.3862944  (D)  ln(4/3)  = 0.2876821  (B)
    0       0.5         ln 2      = 0.6931472  (C)  ln 2     = 0.6931472  (C)
    -ln 3   0.25        ln(4/3)   = 0.2876821  (B)  ln 4     = 1.3862944  (D)
    -ln 9   0.1         ln(10/9)  = 0.1053605  (A)  ln 10    = 2.3025851  (G)

The gradient of BCE(x, y) with respect to x is p - y; a mean over B*K entries divides it by B*K.
"""

from __future__ import annotations

import math
import random
import threading

import pytest
import torch

from largeloss.train.losses import (
    METHODS,
    LossConfig,
    abs_threshold,
    compute_loss,
    modification_rate,
    num_to_modify,
    raise_problems,
    select_global_topk,
    select_topk,
)

L3, L4, L9 = math.log(3), math.log(4), math.log(9)
A, B_, C, D, E, G = (math.log(10 / 9), math.log(4 / 3), math.log(2), math.log(4), math.log(5), math.log(10))


def tensors(logits, target, unknown):
    return (torch.tensor(logits, dtype=torch.float32), torch.tensor(target, dtype=torch.float32),
            torch.tensor(unknown, dtype=torch.bool))


# The main 2 x 5 example (B*K = 10). P = observed positive, N = observed negative, u = unknown.
#
#   flat  (b,c)  state  x       AN loss
#   0     (0,0)  P      ln 9    A = 0.1053605
#   1     (0,1)  u      ln 3    D = 1.3862944
#   2     (0,2)  u      0       C = 0.6931472
#   3     (0,3)  u      -ln 3   B = 0.2876821
#   4     (0,4)  N      ln 4    E = 1.6094379   <- 2nd largest loss of the batch, but observed: never modified
#   5     (1,0)  u      ln 3    D = 1.3862944   <- ties with flat 1
#   6     (1,1)  u      -ln 9   A = 0.1053605
#   7     (1,2)  u      ln 9    G = 2.3025851   <- largest
#   8     (1,3)  P      0       C = 0.6931472
#   9     (1,4)  u      -ln 3   B = 0.2876821
#
# Sum = 2A + 2B + 2C + 2D + E + G = 8.8569914, AN mean = 0.88569914.
# Unknown entries ranked by (loss desc, flat index asc): 7 (G), 1 (D), 5 (D), 2 (C), 3 (B), 9 (B), 6 (A).
MAIN = tensors(
    [[L9, L3, 0.0, -L3, L4], [L3, -L9, L9, 0.0, -L3]],
    [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]],
    [[False, True, True, True, False], [True, True, True, False, True]],
)
MAIN_SUM = 2 * A + 2 * B_ + 2 * C + 2 * D + E + G
AN_MEAN = MAIN_SUM / 10


def mask_of(flat_indices, shape=(2, 5)):
    m = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    m[list(flat_indices)] = True
    return m.view(shape)


def run(method, epoch, data=MAIN, **cfg):
    return compute_loss(*data, epoch, LossConfig(method=method, **cfg))


def test_an_hand_value():
    assert AN_MEAN == pytest.approx(0.88569914, abs=1e-7)
    assert run("an", 1).loss.item() == pytest.approx(AN_MEAN, rel=1e-6)


@pytest.mark.parametrize("method", ["ll_r", "ll_ct", "ll_cp"])
def test_epoch_one_untouched(method):
    # Epoch 1: rate 0 for every scheme, so nothing is modified and the loss is Naive AN.
    out = run(method, 1, delta_rel=10)
    assert out.k == 0 and out.num_modified == 0 and not out.modified.any()
    assert out.loss.item() == pytest.approx(AN_MEAN, rel=1e-6)


def test_k_schedule_exact_and_float_trap():
    cfg = LossConfig(method="ll_ct", delta_rel=0.2, ll_selection="exact_k")
    # rate = (t-1) * 0.2 %: epoch 2 -> 0.2 % of 1000 = 2 exactly.
    assert modification_rate(2, cfg) == pytest.approx(0.002)
    assert num_to_modify(1000, 1, cfg) == 0
    assert num_to_modify(1000, 2, cfg) == 2
    # Epoch 4: 3 * 0.2 % of 1000 = 6 exactly; float arithmetic gives 6.000000000000001 and ceil 7.
    assert math.ceil(1000 * ((4 - 1) * 0.2 / 100)) == 7  # the trap
    assert num_to_modify(1000, 4, cfg) == 6
    # delta_rel 0.1 at epoch 4: 3 * 0.1 = 0.30000000000000004 in floats -> naive ceil 4, exact 3.
    assert num_to_modify(1000, 4, LossConfig(method="ll_r", delta_rel=0.1, ll_selection="exact_k")) == 3
    # A non-integral product rounds up: 0.2 % of 360 000 (B=72, K=5000) at epoch 2 is 720; of 1001 is 2.002 -> 3.
    assert num_to_modify(72 * 5000, 2, cfg) == 720
    assert num_to_modify(1001, 2, cfg) == 3
    # LL-Cp: constant rate delta_rel % from epoch 2 on.
    cp = LossConfig(method="ll_cp", delta_rel=0.2, ll_selection="exact_k")
    assert [num_to_modify(1000, t, cp) for t in (1, 2, 3, 10)] == [0, 2, 2, 2]


def test_float_trap_through_compute_loss():
    # B=10, K=100, every entry unknown with distinct logits; delta_rel 0.2 at epoch 4 -> exactly 6 modified,
    # the 6 largest logits (BCE against 0 is increasing in x): flat indices 999..994.
    logits = torch.linspace(-3.0, 3.0, 1000).view(10, 100)
    target = torch.zeros(10, 100)
    unknown = torch.ones(10, 100, dtype=torch.bool)
    out = compute_loss(logits, target, unknown, 4, LossConfig(method="ll_r", delta_rel=0.2, ll_selection="exact_k"))
    assert out.k == 6 and out.num_modified == 6
    assert out.modified.view(-1).nonzero().view(-1).tolist() == [994, 995, 996, 997, 998, 999]
    # The official code falls into the trap on purpose (ll_selection=official reproduces it): its float k is
    # ceil(1000 * (1 - (1 - 0.002 - 0.002 - 0.002))) = ceil(6.000000000000005) = 7 -> flat indices 993..999.
    out = compute_loss(logits, target, unknown, 4, LossConfig(method="ll_r", delta_rel=0.2))
    assert out.k == 7 and out.num_modified == 7
    assert out.modified.view(-1).nonzero().view(-1).tolist() == list(range(993, 1000))


@pytest.mark.parametrize("selection", ["official", "exact_k"])
def test_ll_r_epoch2_zero_counted_in_mean(selection):
    # delta_rel = 10 %: epoch 2 -> k = ceil(10 * 0.1) = 1 -> flat 7 (G = 2.3025851), unique: both rules agree
    # (official float k: ceil(10 * (1 - 0.9)) = ceil(0.9999999999999998) = 1).
    # LL-R: its loss becomes 0 but the mean is still over 10 entries: (8.8569914 - 2.3025851) / 10 = 0.65544063.
    out = run("ll_r", 2, delta_rel=10, ll_selection=selection)
    assert out.k == 1 and out.num_modified == 1
    assert torch.equal(out.modified, mask_of([7]))
    assert out.loss.item() == pytest.approx((MAIN_SUM - G) / 10, rel=1e-6)
    assert (MAIN_SUM - G) / 10 == pytest.approx(0.65544063, abs=1e-7)


def test_tie_at_boundary_lower_flat_index_wins():
    # Epoch 3 -> k = ceil(10 * 0.2) = 2: flat 7 (G), then flats 1 and 5 tie at D = ln 4 (same logit ln 3).
    # Tie rule: lower flat index first -> flat 1 (b=0, c=1) is taken, flat 5 is not.
    out = run("ll_r", 3, delta_rel=10, ll_selection="exact_k")
    assert torch.equal(out.modified, mask_of([1, 7]))
    # LL-R: (8.8569914 - G - D) / 10 = 5.1681119 / 10.
    assert out.loss.item() == pytest.approx((MAIN_SUM - G - D) / 10, rel=1e-6)
    # Epoch 4 -> k = 3: both tied entries are in.
    assert torch.equal(run("ll_r", 4, delta_rel=10, ll_selection="exact_k").modified, mask_of([1, 5, 7]))
    # The same rule whatever the position of the ties: swap rows, the tie winner is again the lower index,
    # now flat 0 (formerly flat 5) instead of flat 6 (formerly flat 1).
    swapped = tuple(t.flip(0) for t in MAIN)
    assert torch.equal(run("ll_r", 3, data=swapped, delta_rel=10, ll_selection="exact_k").modified, mask_of([0, 2]))


def test_ll_ct_replaces_by_bce_against_one():
    # Epoch 3, k = 2 -> flats 7 (x = ln 9) and 1 (x = ln 3) are scored against target 1:
    # 7: BCE(ln 9, 1) = A = 0.1053605 instead of G;  1: BCE(ln 3, 1) = B = 0.2876821 instead of D.
    # Mean: (8.8569914 - G - D + A + B) / 10 = 5.5611545 / 10 = 0.55611545.
    out = run("ll_ct", 3, delta_rel=10, ll_selection="exact_k")
    assert torch.equal(out.modified, mask_of([1, 7]))
    expected = (MAIN_SUM - G - D + A + B_) / 10
    assert expected == pytest.approx(0.55611545, abs=1e-7)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # Cross-check against F.binary_cross_entropy_with_logits with the target flipped on the modified entries.
    logits, target, _ = MAIN
    flipped = torch.where(out.modified, torch.ones_like(target), target)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, flipped)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("selection", ["official", "exact_k"])
def test_k_zero(selection):
    # delta_rel = 0 -> k = 0 at every epoch: the large-loss schemes are Naive AN.
    for method in ("ll_r", "ll_ct", "ll_cp"):
        out = run(method, 5, delta_rel=0.0, ll_selection=selection)
        assert out.k == 0 and not out.modified.any() and not out.corrections.any()
        assert out.loss.item() == pytest.approx(AN_MEAN, rel=1e-6)
    # No unknown entry at all (everything observed): exact_k caps k at 0; official keeps k = 2, but its
    # threshold is the 2nd largest of an all-zero masked batch, 0, and only unknown entries are modified.
    logits, target, _ = MAIN
    out = compute_loss(logits, target, torch.zeros(2, 5, dtype=torch.bool), 3,
                       LossConfig("ll_ct", delta_rel=10, ll_selection=selection))
    assert out.k == (0 if selection == "exact_k" else 2) and not out.modified.any()
    assert out.loss.item() == pytest.approx(AN_MEAN, rel=1e-6)


@pytest.mark.parametrize("selection", ["official", "exact_k"])
def test_k_at_least_number_of_unknown(selection):
    unknown_flat = [1, 2, 3, 5, 6, 7, 9]
    # Epoch 8 -> k = ceil(10 * 0.7) = 7 = #unknown; epoch 9 -> 8, capped at 7 under exact_k. Under official
    # (the same k here: ceil(6.999999999999998) = 7, ceil(7.999999999999998) = 8) the threshold is the 7th
    # largest masked loss, A (flat 6), then the 8th, 0 (an observed entry): every unknown entry is >= it.
    for epoch in (8, 9):
        out = run("ll_r", epoch, delta_rel=10, ll_selection=selection)
        assert out.k == (7 if selection == "exact_k" else epoch - 1) and out.num_modified == 7
        assert torch.equal(out.modified, mask_of(unknown_flat))
        # Only the observed entries keep a loss: (A + E + C) / 10 = 2.4079456 / 10.
        assert out.loss.item() == pytest.approx((A + E + C) / 10, rel=1e-6)
    # LL-Ct: every unknown scored against 1. Unknown logits ln3, 0, -ln3, ln3, -ln9, ln9, -ln3 give
    # BCE(., 1) = B + C + D + B + G + A + D; plus observed A + E + C.
    out = run("ll_ct", 9, delta_rel=10, ll_selection=selection)
    assert out.loss.item() == pytest.approx((2 * B_ + C + 2 * D + G + A + A + E + C) / 10, rel=1e-6)


@pytest.mark.parametrize("selection", ["official", "exact_k"])
def test_observed_entries_never_modified(selection):
    # Observed negatives with the largest losses of the batch (logit 5), observed positives with large losses
    # (logit -5), unknown entries small: even at k >= #unknown only unknown entries are modified.
    torch.manual_seed(0)
    logits = torch.randn(6, 7) * 0.1
    target = torch.zeros(6, 7)
    unknown = torch.ones(6, 7, dtype=torch.bool)
    logits[:, 0], unknown[:, 0] = 5.0, False  # observed negatives, loss ~5.0
    logits[:, 1], target[:, 1], unknown[:, 1] = -5.0, 1.0, False  # observed positives, loss ~5.0
    # At epoch 50 (rate 245 %) k exceeds the 30 unknown entries: the official threshold is then 0, where the
    # official code would modify the observed entries too (their masked loss is 0); here they stay untouched.
    for method in ("ll_r", "ll_ct", "ll_cp"):
        for epoch in (2, 5, 50):
            out = compute_loss(logits, target, unknown, epoch, LossConfig(method, delta_rel=5, ll_selection=selection))
            assert not (out.modified & ~unknown).any() and not (out.corrections & ~unknown).any()
    # Main example, epoch 3: flat 4 (observed negative, E = 1.609) has the 2nd-largest loss but is skipped.
    assert not run("ll_ct", 3, delta_rel=10, ll_selection=selection).modified[0, 4]
    # Absolute variant with a threshold below E: the observed negative stays untouched.
    assert not run("ll_r_abs", 3, r0=2.5, delta_abs=0.5).modified[0, 4]


@pytest.mark.parametrize("selection", ["official", "exact_k"])
def test_ll_cp_constant_rate(selection):
    # delta_rel = 10 %: k = ceil(10 * 0.1) = 1 at every epoch >= 2 -> always flat 7; epoch 1 -> 0.
    assert run("ll_cp", 1, delta_rel=10, ll_selection=selection).k == 0
    for epoch in (2, 3, 7, 10):
        out = run("ll_cp", epoch, delta_rel=10, ll_selection=selection)
        assert out.k == 1 and torch.equal(out.modified, mask_of([7]))
        # As LL-Ct in the current step: (8.8569914 - G + A) / 10 = 0.66597668.
        assert out.loss.item() == pytest.approx((MAIN_SUM - G + A) / 10, rel=1e-6)
        # Permanently: exact_k corrects the k = 1 modified entry; official only the entries strictly above
        # the 1st largest loss, i.e. none (the k = 1 case: VOC at batch 16 with delta_rel 0.1 is one).
        assert torch.equal(out.corrections, mask_of([7]) if selection == "exact_k" else mask_of([]))


# ------------------------------------------------------------- ll_selection = official (the authors' code)


def test_official_k_by_hand():
    # The official loop keeps `rate_left`, starting at 1 and losing delta_rel / 100 in float after every epoch,
    # and takes k = ceil(B*K * (1 - rate_left)). With B*K = 1000 and delta_rel 0.2:
    #   epoch 2: 1 - 0.998 = 0.0020000000000000018 -> ceil(2.0000000000000018) = 3   (exact: 2)
    #   epoch 3: 0.0040000000000000036 -> 5 (exact 4);  epoch 4: 0.006000000000000005 -> 7 (exact 6)
    ct = LossConfig("ll_ct", delta_rel=0.2)
    assert [num_to_modify(1000, t, ct) for t in (1, 2, 3, 4)] == [0, 3, 5, 7]
    exact = LossConfig("ll_ct", delta_rel=0.2, ll_selection="exact_k")
    assert [num_to_modify(1000, t, exact) for t in (1, 2, 3, 4)] == [0, 2, 4, 6]
    # LL-Cp, once that k is not 0: ceil(1000 * 0.002) = ceil(2.0) = 2 at every epoch.
    assert [num_to_modify(1000, t, LossConfig("ll_cp", delta_rel=0.2)) for t in (1, 2, 3, 10)] == [0, 2, 2, 2]
    # VOC (B = 16, K = 20) with LL-Cp's delta_rel 0.1: ceil(320 * 0.001) = ceil(0.32) = 1 at every epoch.
    assert [num_to_modify(320, t, LossConfig("ll_cp", delta_rel=0.1)) for t in (1, 2, 10)] == [0, 1, 1]
    # delta_rel 50: rate_left = 1 - 0.5 - 0.5 = 0.0 exactly at epoch 3, and the official `if llr_rel:` then skips
    # the modification altogether; at epoch 4 rate_left = -0.5 -> ceil(10 * 1.5) = 15.
    assert [num_to_modify(10, t, LossConfig("ll_r", delta_rel=50)) for t in (1, 2, 3, 4)] == [0, 5, 0, 15]
    # More than B*K (the official torch.topk would fail): compute_loss caps k at B*K = 10 and, the threshold
    # being 0, modifies every unknown entry.
    out = run("ll_r", 4, delta_rel=50)
    assert out.k == 10 and torch.equal(out.modified, MAIN[2])
    assert run("ll_r", 3, delta_rel=50).num_modified == 0


def test_official_k_against_exact_k():
    # How often the official float k differs from the exact rational k. Grid: B = 1..16 (a last batch can have
    # any size), K = 20, 80, 81, 312 (VOC, COCO, NUS-WIDE, CUB), epochs 2..10, delta_rel 0.1 .. 0.5 (the
    # authors' search grid, official issue #8): 4 * 16 * 9 * 5 = 2,880 settings per schedule. Measured:
    #   LL-R / LL-Ct: 87 of 2,880 (3.0 %) differ, always by one more (float k > exact k);
    #   LL-Cp: none (ceil(B*K * delta_rel/100) lands on the exact value);
    #   at the paper's batch of 16 with each dataset's delta_rel (configs/*.yaml): none;
    #   K = 5000 (OpenImages), B = 1..16: all 720 LL-R / LL-Ct settings differ by one (B*5000*delta_rel/100
    #   is an integer and the float remainder lies just above it), LL-Cp none.
    def count(classes, method, deltas=(0.1, 0.2, 0.3, 0.4, 0.5), batches=range(1, 17)):
        diffs = []
        for b in batches:
            for k_classes in classes:
                for t in range(2, 11):
                    for d in deltas:
                        official = num_to_modify(b * k_classes, t, LossConfig(method, delta_rel=d))
                        exact = num_to_modify(b * k_classes, t, LossConfig(method, delta_rel=d, ll_selection="exact_k"))
                        diffs.append(official - exact)
        return len(diffs), sum(d != 0 for d in diffs), set(diffs)

    assert count((20, 80, 81, 312), "ll_ct") == (2880, 87, {0, 1})
    assert count((20, 80, 81, 312), "ll_r") == (2880, 87, {0, 1})
    assert count((20, 80, 81, 312), "ll_cp") == (2880, 0, {0})
    assert count((5000,), "ll_ct") == (720, 720, {1})
    assert count((5000,), "ll_cp") == (720, 0, {0})
    paper = {20: (0.2, 0.2, 0.1), 80: (0.4, 0.2, 0.2), 81: (0.4, 0.2, 0.2), 312: (0.4, 0.4, 0.2)}
    for k_classes, deltas in paper.items():
        for method, d in zip(("ll_r", "ll_ct", "ll_cp"), deltas):
            assert count((k_classes,), method, (d,), (16,))[1] == 0, (k_classes, method)


def test_official_ties_in_step_strictly_above_for_good():
    # MAIN, epoch 3, delta_rel 10: k = 2 (official float k: ceil(1.9999999999999996) = 2). The masked losses
    # (observed -> 0) in descending order: G (flat 7), D (flat 1), D (flat 5), C, ... -> the 2nd largest is D.
    # In the step every unknown entry >= D is modified: flats 1, 5, 7 (three entries for k = 2, the tie at D
    # included). LL-R: (8.8569914 - G - 2D) / 10 = 3.7818175 / 10.
    out = run("ll_r", 3, delta_rel=10)
    assert out.k == 2 and out.num_modified == 3 and torch.equal(out.modified, mask_of([1, 5, 7]))
    assert out.loss.item() == pytest.approx((MAIN_SUM - G - 2 * D) / 10, rel=1e-6)
    assert not out.corrections.any()  # only LL-Cp corrects for good
    # LL-Ct: G -> A, D -> B twice: (8.8569914 - G - 2D + A + 2B) / 10 = 4.4625422 / 10.
    out = run("ll_ct", 3, delta_rel=10)
    assert torch.equal(out.modified, mask_of([1, 5, 7]))
    assert out.loss.item() == pytest.approx((MAIN_SUM - G - 2 * D + A + 2 * B_) / 10, rel=1e-6)
    # LL-Cp, delta_rel 20: k = ceil(10 * 0.2) = 2 at every epoch >= 2 -> the same threshold D; the step is
    # LL-Ct's (flats 1, 5, 7 against target 1) and the permanent corrections are those strictly above D:
    # flat 7 alone (k - 1 = 1 here, the tie adds nothing). exact_k modifies and corrects flats 1 and 7.
    for epoch in (2, 5):
        out = run("ll_cp", epoch, delta_rel=20)
        assert out.k == 2 and torch.equal(out.modified, mask_of([1, 5, 7]))
        assert torch.equal(out.corrections, mask_of([7]))
        assert out.loss.item() == pytest.approx((MAIN_SUM - G - 2 * D + A + 2 * B_) / 10, rel=1e-6)
        exact = run("ll_cp", epoch, delta_rel=20, ll_selection="exact_k")
        assert torch.equal(exact.modified, mask_of([1, 7])) and torch.equal(exact.corrections, mask_of([1, 7]))
        assert exact.loss.item() == pytest.approx((MAIN_SUM - G - D + A + B_) / 10, rel=1e-6)


def test_official_zero_threshold_leaves_observed_entries_alone():
    # 1 x 4: flat 0 observed positive x = ln 9 (loss A); flat 1 unknown x = ln 3 (D); flats 2, 3 unknown
    # x = -200, whose BCE against 0, log(1 + e^-200), is exactly 0 in float32.
    # LL-Cp, delta_rel 75: k = ceil(4 * 0.75) = 3. Masked losses [0, D, 0, 0]: the 3rd largest is 0, so
    # every unknown entry is modified (>= 0) and only flat 1 is corrected for good (> 0). The official code
    # would also modify flat 0, whose masked loss is 0 too (scoring it against 0: G); here it keeps A.
    # Loss: A + BCE(ln 3, 1) + 2 * BCE(-200, 1) = A + B + 2 * 200, over 4.
    data = tensors([[L9, L3, -200.0, -200.0]], [[1, 0, 0, 0]], [[False, True, True, True]])
    out = compute_loss(*data, 2, LossConfig("ll_cp", delta_rel=75))
    assert out.k == 3 and out.num_modified == 3
    assert torch.equal(out.modified, data[2]) and torch.equal(out.corrections, mask_of([1], (1, 4)))
    assert out.loss.item() == pytest.approx((A + B_ + 400) / 4, rel=1e-6)
    # exact_k: k = 3 = #unknown, all three modified and corrected.
    exact = compute_loss(*data, 2, LossConfig("ll_cp", delta_rel=75, ll_selection="exact_k"))
    assert torch.equal(exact.modified, data[2]) and torch.equal(exact.corrections, data[2])


def test_absolute_variants():
    # R(t) = r0 - t * delta_abs with t 1-based: r0 = 2.5, delta_abs = 0.5 -> R(1..4) = 2.0, 1.5, 1.0, 0.5.
    cfg = LossConfig("ll_r_abs", r0=2.5, delta_abs=0.5)
    assert [abs_threshold(t, cfg) for t in (1, 2, 3, 4)] == [2.0, 1.5, 1.0, 0.5]
    # Exact decimal arithmetic: 2.0 - 3 * 0.1 is 1.7, not 1.7000000000000002.
    assert abs_threshold(3, LossConfig("ll_ct_abs", r0=2.0, delta_abs=0.1)) == 1.7
    # Epoch 1 is exempt by default (warm-up), although G = 2.30 > R(1) = 2.0.
    out = run("ll_r_abs", 1, r0=2.5, delta_abs=0.5)
    assert out.k == 0 and not out.modified.any()
    assert out.loss.item() == pytest.approx(AN_MEAN, rel=1e-6)
    # Without the exemption, epoch 1 rejects the unknown entries above 2.0: flat 7 only.
    out = run("ll_r_abs", 1, r0=2.5, delta_abs=0.5, abs_skip_first_epoch=False)
    assert torch.equal(out.modified, mask_of([7]))
    # Epoch 2, R = 1.5: unknown losses > 1.5 -> flat 7 (G). (Observed negative E = 1.609 is not touched.)
    out = run("ll_r_abs", 2, r0=2.5, delta_abs=0.5)
    assert out.k == 1 and torch.equal(out.modified, mask_of([7]))
    assert out.loss.item() == pytest.approx((MAIN_SUM - G) / 10, rel=1e-6)
    # Epoch 3, R = 1.0: flats 7, 1, 5 (G, D, D) -- a threshold takes both tied entries.
    out = run("ll_ct_abs", 3, r0=2.5, delta_abs=0.5)
    assert out.k == 3 and torch.equal(out.modified, mask_of([1, 5, 7]))
    # LL-Ct: G -> A, D -> B twice: (8.8569914 - G - 2D + A + 2B) / 10.
    assert out.loss.item() == pytest.approx((MAIN_SUM - G - 2 * D + A + 2 * B_) / 10, rel=1e-6)
    # Epoch 4, R = 0.5: add flat 2 (C = 0.693).
    assert torch.equal(run("ll_r_abs", 4, r0=2.5, delta_abs=0.5).modified, mask_of([1, 2, 5, 7]))


# 2 x 3 example for the baselines.
#
#   (b,c)  state  x      p     AN loss
#   (0,0)  P      ln 3   0.75  B = 0.2876821
#   (0,1)  u      0      0.5   C = 0.6931472
#   (0,2)  N      -ln 3  0.25  B = 0.2876821
#   (1,0)  u      0      0.5   C = 0.6931472
#   (1,1)  P      ln 9   0.9   A = 0.1053605
#   (1,2)  u      -ln 9  0.1   A = 0.1053605
SMALL = tensors(
    [[L3, 0.0, -L3], [0.0, L9, -L9]],
    [[1, 0, 0], [0, 1, 0]],
    [[False, True, False], [True, False, True]],
)


def test_baselines_on_2x3_by_hand():
    # AN: (2B + 2C + 2A) / 6 = 2.1723796 / 6 = 0.36206327.
    assert run("an", 1, data=SMALL).loss.item() == pytest.approx((2 * A + 2 * B_ + 2 * C) / 6, rel=1e-6)
    # IU: observed (0,0), (0,2), (1,1), divided by B*K = 6 as in Cole et al. (not by the 3 observed entries):
    # (B + B + A) / 6 = 0.6807247 / 6 = 0.11345412.
    iu = (2 * B_ + A) / 6
    assert iu == pytest.approx(0.11345412, abs=1e-7)
    assert run("iu", 1, data=SMALL).loss.item() == pytest.approx(iu, rel=1e-6)
    # WAN, K = 3 -> unknown weight 1/2: (B + B + A + (C + C + A) / 2) / 6 = 1.4265522 / 6 = 0.23775870.
    wan = (2 * B_ + A + (2 * C + A) / 2) / 6
    assert wan == pytest.approx(0.2377587, abs=1e-7)
    assert run("wan", 1, data=SMALL).loss.item() == pytest.approx(wan, rel=1e-6)
    assert run("wan", 1, data=SMALL, wan_weight=1.0).loss.item() == pytest.approx(
        (2 * A + 2 * B_ + 2 * C) / 6, rel=1e-6)
    # LSAN, ls = 0.1: targets P -> 0.9, others -> 0.1; BCE(p, t) = -(t ln p + (1-t) ln(1-p)).
    #   (0,0) p=.75 t=.9: 0.9 B + 0.1 D = 0.3975433     (0,1) p=.5: C = 0.6931472
    #   (0,2) p=.25 t=.1: 0.1 D + 0.9 B = 0.3975433     (1,0) p=.5: C
    #   (1,1) p=.9  t=.9: 0.9 A + 0.1 G = 0.3250830     (1,2) p=.1 t=.1: 0.1 G + 0.9 A = 0.3250830
    #   mean = 2 (0.3975433 + 0.6931472 + 0.3250830) / 6 = 0.47192450.
    lsan = 2 * ((0.9 * B_ + 0.1 * D) + C + (0.9 * A + 0.1 * G)) / 6
    assert lsan == pytest.approx(0.4719245, abs=1e-7)
    assert run("lsan", 1, data=SMALL).loss.item() == pytest.approx(lsan, rel=1e-6)
    # EPR, epr_num_pos = 1: observed BCE over B*K: (B + B + A) / 6 = 0.11345412;
    # expected positives: row sums of p are 0.75+0.5+0.25 = 1.5 and 0.5+0.9+0.1 = 1.5, mean 1.5;
    # regulariser (1.5 - 1)^2 / K^2 = 0.25 / 9 = 0.02777778. Total 0.14123190.
    epr = (2 * B_ + A) / 6 + 0.25 / 9
    assert epr == pytest.approx(0.1412319, abs=1e-7)
    assert run("epr", 1, data=SMALL, epr_num_pos=1.0).loss.item() == pytest.approx(epr, rel=1e-6)
    # With epr_num_pos = 1.5 the regulariser vanishes.
    assert run("epr", 1, data=SMALL, epr_num_pos=1.5).loss.item() == pytest.approx((2 * B_ + A) / 6, rel=1e-6)
    # full: complete labels (unknown all False); truth here: (0,1) and (1,0) positive too.
    #   (0,1), (1,0): BCE(0, 1) = C, so the mean is the same as AN here: (2B + 2C + 2A) / 6.
    logits, _, _ = SMALL
    truth = torch.tensor([[1.0, 1, 0], [1, 1, 0]])
    out = compute_loss(logits, truth, torch.zeros(2, 3, dtype=torch.bool), 1, LossConfig("full"))
    assert out.loss.item() == pytest.approx((2 * A + 2 * B_ + 2 * C) / 6, rel=1e-6)
    for method in ("an", "iu", "wan", "lsan", "full"):
        data = SMALL if method != "full" else (logits, truth, torch.zeros(2, 3, dtype=torch.bool))
        out = compute_loss(*data, 3, LossConfig(method))
        assert out.k == 0 and out.num_modified == 0 and not out.modified.any() and not out.corrections.any()


def test_iu_without_observed_entries_is_zero_not_nan():
    logits = torch.randn(2, 3, requires_grad=True)
    out = compute_loss(logits, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), 1, LossConfig("iu"))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_gradient_only_through_kept_terms():
    # d/dx mean BCE = (p - y) / 10. Epoch 2, delta 10 % -> flat 7 (x = ln 9, p = 0.9) modified.
    logits, target, unknown = MAIN
    p = torch.sigmoid(logits)
    for method, grad_at_7 in (("ll_r", 0.0), ("ll_ct", (0.9 - 1.0) / 10)):
        x = logits.clone().requires_grad_(True)
        out = compute_loss(x, target, unknown, 2, LossConfig(method, delta_rel=10))
        out.loss.backward()
        expected = (p - target) / 10  # kept terms: the AN gradient, e.g. flat 1: (0.75 - 0) / 10 = 0.075
        expected[1, 2] = grad_at_7  # LL-R: no gradient; LL-Ct: BCE against 1, (0.9 - 1) / 10 = -0.01
        assert torch.allclose(x.grad, expected, atol=1e-7)
        assert x.grad[0, 1].item() == pytest.approx(0.075, abs=1e-7)
        assert not out.modified.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_inputs_not_mutated(method):
    torch.manual_seed(1)
    logits = torch.randn(4, 6, requires_grad=True)
    target = torch.zeros(4, 6)
    target[torch.arange(4), torch.tensor([0, 2, 3, 5])] = 1.0
    unknown = target == 0
    if method == "full":
        unknown = torch.zeros_like(unknown)
    extra = {"r0": 1.0, "delta_abs": 0.2} if method.endswith("_abs") else {}
    if method in ("epr", "role"):
        extra["epr_num_pos"] = 1.5
    # the follow-up methods' own keys (tests/test_methods.py) and their state inputs
    extra.update({"em": {"em_alpha": 0.2}, "em_apl": {"em_alpha": 0.2, "apl_beta": 0.1, "apl_warmup": 1},
                  "gr_loss": {"gr_epochs": 5}}.get(method, {}))
    state = {"role": {"estimates": torch.rand(4, 6, requires_grad=True)},
             "em_apl": {"pseudo": torch.where(unknown, 0.1, torch.nan)}}.get(method, {})
    cfg = LossConfig(method, delta_rel=20, **extra)
    before = (logits.detach().clone(), target.clone(), unknown.clone(), repr(cfg),
              {k: v.detach().clone() for k, v in state.items()})
    out = compute_loss(logits, target, unknown, 3, cfg, **state)
    out.loss.backward()
    assert torch.equal(logits.detach(), before[0])
    assert torch.equal(target, before[1]) and torch.equal(unknown, before[2]) and repr(cfg) == before[3]
    assert all(torch.equal(v.detach().nan_to_num(), before[4][k].nan_to_num()) for k, v in state.items())
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)


def reference_topk(losses, unknown, k):
    """Plain-Python reference: unknown entries sorted by (loss desc, flat index asc), first k."""
    flat = losses.reshape(-1).tolist()
    cand = [i for i, u in enumerate(unknown.reshape(-1).tolist()) if u]
    chosen = sorted(cand, key=lambda i: (-flat[i], i))[:k]
    m = torch.zeros(len(flat), dtype=torch.bool)
    m[chosen] = True
    return m.view(unknown.shape)


def test_select_topk_matches_reference_with_many_ties():
    # Losses quantised to 5 levels -> large tie groups at every boundary.
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        losses = torch.randint(0, 5, (7, 9), generator=gen).float() / 4
        unknown = torch.rand(7, 9, generator=gen) < 0.7
        for k in (0, 1, 5, 17, 40, 63, 100):
            assert torch.equal(select_topk(losses, unknown, k), reference_topk(losses, unknown, k)), k


def run_ranks(world, fn):
    """Run fn(rank, gather_fn) in `world` threads; gather_fn concatenates over threads in rank order."""
    slots = [None] * world
    barrier = threading.Barrier(world, timeout=20)
    results, errors = [None] * world, []

    def gather_for(rank):
        def gather(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()  # every rank has read the slots before any rank overwrites them
            return out
        return gather

    def body(rank):
        try:
            results[rank] = fn(rank, gather_for(rank))
        except Exception as exc:  # reported below, on the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def global_topk_masks(world, losses, unknown, k):
    """select_global_topk(losses[r], unknown[r], k) on `world` simulated ranks: the mask of each rank."""
    return run_ranks(world, lambda r, g: select_global_topk(losses[r], unknown[r], k, g, r))


# Rank 1 of the simulated 2-rank batch (rank 0 is MAIN). Global flat index = 10 + local.
#   local  state  x      loss          local  state  x      loss
#   0      P      ln 9   A             5      u      0      C
#   1      u      ln 3   D  (gl. 11)   6      u      ln 3   D  (gl. 16)
#   2      u      0      C             7      u      -ln 3  B
#   3      u      -ln 9  A             8      P      ln 9   A
#   4      u      ln 4   E  (gl. 14)   9      u      0      C
RANK1 = tensors(
    [[L9, L3, 0.0, -L9, L4], [0.0, L3, -L3, L9, 0.0]],
    [[1, 0, 0, 0, 0], [0, 0, 0, 1, 0]],
    [[False, True, True, True, True], [True, True, True, False, True]],
)


def test_global_topk_two_ranks_by_hand():
    # Global ranking of unknown entries: 7 (G), 14 (E), then the D tie at 1, 5, 11, 16, then C ...
    # k = 4 -> 7, 14, 1, 5: rank 0 owns 1, 5, 7; rank 1 owns 14 (local 4). Entries 11 and 16 tie with the
    # winners 1 and 5 but have higher global indices.
    per_rank = [MAIN, RANK1]
    losses = [torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none") for x, y, _ in per_rank]
    masks = run_ranks(2, lambda r, g: select_global_topk(losses[r], per_rank[r][2], 4, g, r))
    assert torch.equal(masks[0], mask_of([1, 5, 7])) and torch.equal(masks[1], mask_of([4]))
    # Equal to the top-k of the concatenated [4, 5] batch, for every k (including k > #unknown = 14).
    cat_losses, cat_unknown = torch.cat(losses), torch.cat([u for _, _, u in per_rank])
    for k in range(0, 17):
        masks = run_ranks(2, lambda r, g, k=k: select_global_topk(losses[r], per_rank[r][2], k, g, r))
        assert torch.equal(torch.cat(masks), select_topk(cat_losses, cat_unknown, k)), k
        assert torch.equal(torch.cat(masks), reference_topk(cat_losses, cat_unknown, k)), k


def test_global_topk_random_three_ranks():
    rng = random.Random(3)
    for _ in range(10):
        losses = [torch.tensor([[rng.randrange(4) / 2 for _ in range(6)] for _ in range(3)]) for _ in range(3)]
        unknown = [torch.tensor([[rng.random() < 0.6 for _ in range(6)] for _ in range(3)]) for _ in range(3)]
        for k in (0, 1, 4, 9, 30, 60):
            masks = global_topk_masks(3, losses, unknown, k)
            assert torch.equal(torch.cat(masks), reference_topk(torch.cat(losses), torch.cat(unknown), k))


def test_global_topk_ranks_with_different_batch_sizes():
    # The last batches of an epoch may differ by one sample between ranks: the global flat index is then
    # local + the B*K of the ranks before, and each rank still sends k candidate slots.
    rng = random.Random(5)
    for _ in range(10):
        sizes = [3, 2, 1]
        losses = [torch.tensor([[rng.randrange(4) / 2 for _ in range(5)] for _ in range(b)]) for b in sizes]
        unknown = [torch.tensor([[rng.random() < 0.7 for _ in range(5)] for _ in range(b)]) for b in sizes]
        for k in (0, 1, 3, 7, 12, 40):
            masks = global_topk_masks(3, losses, unknown, k)
            assert [m.shape[0] for m in masks] == sizes
            assert torch.equal(torch.cat(masks), reference_topk(torch.cat(losses), torch.cat(unknown), k))
    # compute_loss takes k from the global batch: B = 3 + 2 + 1 = 6, K = 5, LL-Cp at 10 % -> ceil(3.0) = 3
    cfg = LossConfig("ll_cp", delta_rel=10, global_topk=True, ll_selection="exact_k")
    logits = [torch.randn(b, 5, generator=torch.Generator().manual_seed(b)) for b in (3, 2, 1)]
    outs = run_ranks(3, lambda r, g: compute_loss(logits[r], torch.zeros_like(logits[r]),
                                                  torch.ones_like(logits[r], dtype=torch.bool), 2, cfg,
                                                  gather_fn=g, rank=r, world_size=3))
    assert [o.k for o in outs] == [3, 3, 3] and sum(o.num_modified for o in outs) == 3


def test_compute_loss_global_topk_two_ranks():
    # Epoch 3, delta 10 %: global k = ceil(2 * 10 * 0.2) = 4 -> as above, rank 0 {1, 5, 7}, rank 1 {4}.
    # Rank 0 LL-R: (8.8569914 - G - 2D) / 10 = 0.37818175.
    # Rank 1 sum: A + D + C + A + E + C + D + B + A + C = 3A + 2D + 3C + B + E = 7.0652317; minus E -> / 10.
    cfg = LossConfig("ll_r", delta_rel=10, global_topk=True, ll_selection="exact_k")
    per_rank = [MAIN, RANK1]
    outs = run_ranks(2, lambda r, g: compute_loss(*per_rank[r], 3, cfg, gather_fn=g, rank=r, world_size=2))
    assert [o.k for o in outs] == [4, 4] and [o.num_modified for o in outs] == [3, 1]
    assert outs[0].loss.item() == pytest.approx((MAIN_SUM - G - 2 * D) / 10, rel=1e-6)
    assert outs[1].loss.item() == pytest.approx((3 * A + 2 * D + 3 * C + B_) / 10, rel=1e-6)
    # A mismatched world size, or several ranks without a gather_fn, is an error, not a silent per-rank top-k.
    with pytest.raises(RuntimeError, match="world_size"):
        run_ranks(2, lambda r, g: compute_loss(*per_rank[r], 3, cfg, gather_fn=g, rank=r, world_size=3))
    with pytest.raises(ValueError, match="needs gather_fn"):
        compute_loss(*MAIN, 3, cfg, rank=0, world_size=2)
    # One process (torch.distributed not initialised): the global top-k is the batch's own, k = 2.
    single = compute_loss(*MAIN, 3, cfg)
    assert single.k == 2 and torch.equal(single.modified, mask_of([1, 7]))


def test_compute_loss_global_official_two_ranks():
    # LL-Cp, delta_rel 20, epoch 2 over MAIN (rank 0) and RANK1: global B*K = 20, official k: ceil(20 * (1 - 0.8))
    # = ceil(3.999999999999999) = 4, then LL-Cp's ceil(20 * 0.2) = 4. The masked losses of the concatenated
    # batch in descending order: G (gl. 7), E (gl. 14), D (gl. 1, 5, 11, 16), ... -> the 4th largest is D.
    # Modified (>= D): rank 0 flats 1, 5, 7; rank 1 local 1, 4, 6 (gl. 11, 14, 16). Corrected (> D): rank 0
    # flat 7, rank 1 local 4.
    cfg = LossConfig("ll_cp", delta_rel=20, global_topk=True)
    per_rank = [MAIN, RANK1]
    outs = run_ranks(2, lambda r, g: compute_loss(*per_rank[r], 2, cfg, gather_fn=g, rank=r, world_size=2))
    assert [o.k for o in outs] == [4, 4] and [o.num_modified for o in outs] == [3, 3]
    assert torch.equal(outs[0].modified, mask_of([1, 5, 7])) and torch.equal(outs[1].modified, mask_of([1, 4, 6]))
    assert torch.equal(outs[0].corrections, mask_of([7])) and torch.equal(outs[1].corrections, mask_of([4]))
    # Rank 0 as LL-Ct: (8.8569914 - G - 2D + A + 2B) / 10. Rank 1: its sum 3A + 2D + 3C + B + E with
    # D -> B twice (x = ln 3 against 1) and E -> BCE(ln 4, 1) = ln(5/4) = 0.2231436: (3A + 3C + 3B + ln 1.25) / 10.
    assert outs[0].loss.item() == pytest.approx((MAIN_SUM - G - 2 * D + A + 2 * B_) / 10, rel=1e-6)
    assert outs[1].loss.item() == pytest.approx((3 * A + 3 * C + 3 * B_ + math.log(1.25)) / 10, rel=1e-6)


def random_ranks(rng, trial):
    """(world, logits, targets, unknown) per rank: logits on a grid of 4 values (large tie groups at every
    threshold), ranks of batch sizes [3, 2, 1] (odd trials) or [2, 2], K = 5."""
    grid = [-L3, 0.0, L3, L9]
    sizes = [3, 2, 1] if trial % 2 else [2, 2]
    logits = [torch.tensor([[rng.choice(grid) for _ in range(5)] for _ in range(b)]) for b in sizes]
    unknown = [torch.tensor([[rng.random() < 0.7 for _ in range(5)] for _ in range(b)]) for b in sizes]
    targets = [torch.where(u, 0.0, torch.tensor(float(rng.random() < 0.5))) for u in unknown]
    return len(sizes), logits, targets, unknown


def test_global_official_equals_official_on_the_concatenated_batch():
    # Definition of official under global_topk: the official rule applied to the batch concatenated over ranks,
    # as if one process held it. Logits on a grid of 4 values -> large tie groups at every threshold; ranks
    # of different batch sizes; k from 1 up to beyond the number of unknown entries (threshold 0).
    rng = random.Random(11)
    for trial in range(12):
        world, logits, targets, unknown = random_ranks(rng, trial)
        for method, delta in (("ll_ct", 10), ("ll_r", 30), ("ll_cp", 10), ("ll_cp", 40), ("ll_ct", 45)):
            cfg = LossConfig(method, delta_rel=delta, global_topk=True)
            for epoch in (2, 3, 4):
                def rank_loss(r, g, data=(logits, targets, unknown), cfg=cfg, e=epoch, world=world):
                    return compute_loss(*(t[r] for t in data), e, cfg, gather_fn=g, rank=r, world_size=world)

                outs = run_ranks(world, rank_loss)
                single = compute_loss(torch.cat(logits), torch.cat(targets), torch.cat(unknown), epoch,
                                      LossConfig(method, delta_rel=delta))
                assert all(o.k == single.k for o in outs)
                assert torch.equal(torch.cat([o.modified for o in outs]), single.modified), (trial, method, epoch)
                assert torch.equal(torch.cat([o.corrections for o in outs]), single.corrections)
                assert sum(o.num_modified for o in outs) == single.num_modified


def test_global_topk_with_max_batch_size_finds_k_on_the_device():
    # The trainer passes max_batch_size (its batch_size) so that no rank waits for the gathered batch sizes: the
    # k of the global batch is then looked up on the device, and every rank sends the largest k's number of
    # candidates. The selections, k and counts are those of the host path (max_batch_size None), for both rules,
    # ranks of different sizes, k from 0 (epoch 1's batches, a short last batch) to beyond the unknown entries.
    rng = random.Random(13)
    for trial in range(8):
        world, logits, targets, unknown = random_ranks(rng, trial)
        for selection in ("official", "exact_k"):
            for method, delta in (("ll_ct", 10), ("ll_r", 30), ("ll_cp", 10), ("ll_cp", 45)):
                cfg = LossConfig(method, delta_rel=delta, global_topk=True, ll_selection=selection)
                for epoch in (1, 2, 4):
                    def rank_loss(r, g, data=(logits, targets, unknown), cfg=cfg, e=epoch, world=world, mb=None):
                        return compute_loss(*(t[r] for t in data), e, cfg, gather_fn=g, rank=r,
                                            world_size=world, max_batch_size=mb, check=mb is None)

                    host = run_ranks(world, rank_loss)
                    for mb in (max(len(x) for x in logits), 7):
                        dev = run_ranks(world, lambda r, g, mb=mb: rank_loss(r, g, mb=mb))
                        for h, d in zip(host, dev):
                            assert int(h.k) == int(d.k) and int(h.num_modified) == int(d.num_modified)
                            assert torch.equal(h.modified, d.modified) and torch.equal(h.corrections, d.corrections)
                            assert torch.equal(h.loss, d.loss), (trial, selection, method, epoch, mb)


def test_checks_can_wait_for_the_trainer():
    # check=False: invalid inputs are counted on the device, and raise_problems raises what check=True would
    logits, target, unknown = MAIN
    bad = target.clone()
    bad[0, 1] = 1.0  # an unknown entry with target 1
    out = compute_loss(logits, bad, unknown, 2, LossConfig("ll_ct", delta_rel=10), check=False)
    assert out.problems.tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="target != 0"):
        raise_problems(out.problems + out.problems)
    out = compute_loss(logits, target, unknown, 1, LossConfig("full"), check=False)
    with pytest.raises(ValueError, match="complete labels"):
        raise_problems(out.problems)
    assert compute_loss(logits, target, unknown, 2, LossConfig("an"), check=False).problems is None


def test_half_precision_logits_are_upcast():
    logits, target, unknown = MAIN
    out16 = compute_loss(logits.to(torch.bfloat16), target, unknown, 3,
                         LossConfig("ll_ct", delta_rel=10, ll_selection="exact_k"))
    assert out16.loss.dtype == torch.float32
    assert torch.equal(out16.modified, mask_of([1, 7]))


def test_config_validation():
    with pytest.raises(ValueError, match="valid methods: full, an, iu"):
        LossConfig("boostlu")  # BoostLU is the model's boost_alpha with an LL method, not a loss
    with pytest.raises(ValueError, match="delta_rel"):
        LossConfig("ll_ct", delta_rel=-0.1)
    with pytest.raises(ValueError, match="r0 is required"):
        LossConfig("ll_r_abs", delta_abs=0.1)
    with pytest.raises(ValueError, match="epr_num_pos is required"):
        LossConfig("epr")
    with pytest.raises(ValueError, match="global_topk"):
        LossConfig("an", global_topk=True)
    with pytest.raises(TypeError, match="delta_rel"):
        LossConfig("ll_r", delta_rel="0.2")
    with pytest.raises(ValueError, match="ls_coef"):
        LossConfig("lsan", ls_coef=0.7)
    with pytest.raises(ValueError, match="ll_selection must be one of official, exact_k"):
        LossConfig("ll_ct", ll_selection="exact")


def test_input_validation():
    logits, target, unknown = MAIN
    cfg = LossConfig("ll_ct", delta_rel=10)
    with pytest.raises(ValueError, match="epoch must be an int >= 1"):
        compute_loss(logits, target, unknown, 0, cfg)
    with pytest.raises(ValueError, match="target must be a float"):
        compute_loss(logits, target.to(torch.int8), unknown, 2, cfg)
    with pytest.raises(ValueError, match="unknown must be a bool"):
        compute_loss(logits, target, unknown.float(), 2, cfg)
    with pytest.raises(ValueError, match="shape"):
        compute_loss(logits, target[:, :4], unknown, 2, cfg)
    bad = target.clone()
    bad[0, 1] = 1.0  # an unknown entry with target 1
    with pytest.raises(ValueError, match="target != 0"):
        compute_loss(logits, bad, unknown, 2, cfg)
    nan_logits = logits.clone()
    nan_logits[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_loss(nan_logits, target, unknown, 2, cfg)
    with pytest.raises(ValueError, match="complete labels"):
        compute_loss(logits, target, unknown, 1, LossConfig("full"))
