"""The follow-up single-positive methods (issue 14): EM, EM + APL, GR-Loss, ROLE, Partial-BCE and BoostLU.

Two kinds of tests per method:

- hand-worked values on tiny batches, the arithmetic in the comments (p = sigmoid(x) of logits chosen as
  logs of simple ratios, as in tests/test_losses.py: x = ln 9 -> p = 0.9, x = 0 -> 0.5, x = -ln 3 -> 0.25);
- equality with the authors' public code: the expected numbers below are the outputs of the authors' own
  loss / model functions, run unmodified in a scratch script (not part of this repository) on the inputs
  given here, in float64:
    Correr-Zhou/SPML-AckTheUnknown @ ae1ccafe0b03, losses.py compute_batch_loss (loss 'EM' / 'EM_APL', VOC alpha
      0.2 and beta 0.02; a pseudo-label s is their label value -s);
    yan4xi1/GRLoss @ 5e13f7f9d8e4, losses.py GR_loss with models.py KFunction / VFunction and the schedule of
      train.py's loop at its argparse defaults (8 epochs, no LinearInit);
    elijahcole/single-positive-multi-label @ 89152d52ba59, losses.py compute_batch_loss (loss 'role',
      expected_num_pos 1.5);
    youngwk/BridgeGapExplanationPAMC @ 4a1986cce4ec, models.py ImageClassifier.forward (alpha 5) with its
      feature extractor replaced by the identity, so that it takes a feature map.
  The gradient is d loss / d logits (and d loss / d estimates for ROLE). The same script found the largest
  difference between their code and ours, in float64 / float32: loss 1.4e-17 / 1.2e-7, gradients 1.1e-16 /
  6.0e-8 (the float32 differences: summation order), BoostLU logits 0 / 4.8e-7 and head gradient 1.8e-15 /
  9.5e-7. Partial-BCE has no code of its authors; it is checked by hand only.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from largeloss.eval.rundir import method_id
from largeloss.train.config import ConfigError, build_config
from largeloss.train.features import FeatureHead
from largeloss.train.losses import LossConfig, compute_loss, gr_schedule, pbce_normalisation
from largeloss.train.methods import (
    AplState,
    apl_quota,
    apl_select,
    check_state_size,
    role_initial_logits,
    training_rows,
)
from largeloss.train.model import boosted_pool, head_logits

L3, L9 = math.log(3), math.log(9)
EPS = 1e-5  # Zhou et al.'s and Cole et al.'s -log(p + 1e-5)


def nl(p, eps=EPS):
    """-log(p + eps) of the authors' code."""
    return -math.log(p + eps)


def grad_of(logits, *args, **kw):
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    out = compute_loss(x, *args, **kw)
    out.loss.backward()
    return out.loss.item(), x.grad


# ------------------------------------------------------------------------------------------- EM, EM+APL


ONE_ROW = (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[False, True, True]]))  # observed positive, 2 unknown


def test_em_by_hand():
    # x = [ln 9, 0, -ln 3] -> p = [0.9, 0.5, 0.25]; em_alpha 0.2; mean over the 3 entries.
    #   positive:        -ln(0.9 + 1e-5)                                  = 0.1053494
    #   unknown p = 0.5: -0.2 * H(0.5)  = -0.2 * (-ln(0.50001))            = -0.2 * 0.6931272 = -0.1386254
    #   unknown p = .25: -0.2 * (0.25 (-ln 0.25001) + 0.75 (-ln 0.75001)) = -0.2 * 0.5623151 = -0.1124630
    #   loss = (0.1053494 - 0.1386254 - 0.1124630) / 3 = -0.0485797
    expected = (nl(0.9) - 0.2 * nl(0.5) - 0.2 * (0.25 * nl(0.25) + 0.75 * nl(0.75))) / 3
    assert expected == pytest.approx(-0.0485797, abs=1e-7)
    loss, g = grad_of([[L9, 0.0, -L3]], *ONE_ROW, 1, LossConfig("em", em_alpha=0.2))
    assert loss == pytest.approx(expected, abs=1e-12)
    # d/dx of -alpha H(p) is alpha * x * p (1 - p) (up to the epsilon): 0 at x = 0, and at x = -ln 3
    # 0.2 * (-1.0986123) * 0.1875 / 3 = -0.0137327; the positive: (p - 1) / 3 = -0.0333333
    assert g[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert g[0, 2].item() == pytest.approx(0.2 * -L3 * 0.1875 / 3, abs=1e-6)
    assert g[0, 0].item() == pytest.approx(-0.1 / 3, abs=1e-5)


def test_em_apl_pseudo_label_replaces_the_entropy_term():
    # As above with a soft pseudo-label s = 0.1 on the third entry, apl_beta 0.02:
    #   third entry: 0.02 * (0.1 (-ln 0.25001) + 0.9 (-ln 0.75001)) = 0.02 * 0.3975273 = 0.0079505
    #   loss = (0.1053494 - 0.1386254 + 0.0079505) / 3 = -0.0084418
    cfg = LossConfig("em_apl", em_alpha=0.2, apl_beta=0.02, apl_warmup=5)
    pseudo = torch.tensor([[math.nan, math.nan, 0.1]], dtype=torch.float64)
    expected = (nl(0.9) - 0.2 * nl(0.5) + 0.02 * (0.1 * nl(0.25) + 0.9 * nl(0.75))) / 3
    assert expected == pytest.approx(-0.0084418, abs=1e-7)
    loss, _ = grad_of([[L9, 0.0, -L3]], *ONE_ROW, 1, cfg, pseudo=pseudo)
    assert loss == pytest.approx(expected, abs=1e-12)
    # no pseudo-labels (None, or all NaN) is EM
    em = grad_of([[L9, 0.0, -L3]], *ONE_ROW, 1, LossConfig("em", em_alpha=0.2))[0]
    assert grad_of([[L9, 0.0, -L3]], *ONE_ROW, 1, cfg)[0] == em
    assert grad_of([[L9, 0.0, -L3]], *ONE_ROW, 1, cfg, pseudo=torch.full((1, 3), math.nan))[0] == em


def test_observed_negatives_of_a_partial_protocol():
    # One row: positive (ln 9), observed negative (-ln 3, p = 0.25), unknown (0). The authors' code has no observed
    # negatives; here they are clean labels: -ln(1 - p + eps) for EM / ROLE, L2(p) = p (q3 = 1) for GR-Loss.
    target, unknown = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[False, False, True]])
    em = grad_of([[L9, -L3, 0.0]], target, unknown, 1, LossConfig("em", em_alpha=0.2))[0]
    assert em == pytest.approx((nl(0.9) + nl(0.75) - 0.2 * nl(0.5)) / 3, abs=1e-12)
    gr = grad_of([[L9, -L3, 0.0]], target, unknown, 1, LossConfig("gr_loss", gr_epochs=10))[0]
    w, b, mu, sigma = gr_schedule(1, LossConfig("gr_loss", gr_epochs=10))
    k, v = 1 / (1 + math.exp(-(w * 0.5 + b))), math.exp(-0.5 * ((0.5 - mu) / sigma) ** 2)
    assert gr == pytest.approx((nl(0.9, 1e-7) + 0.25 + v * (k * (1 - 0.5**0.01) / 0.01 + (1 - k) * 0.5)) / 3,
                               abs=1e-12)


# ------------------------------------------------------------------------------------------------ GR-Loss


def test_gr_schedule_by_hand():
    cfg = LossConfig("gr_loss", gr_epochs=10)
    # T = 10, n = 0: w, b move by (t - 1) / 10 of (2 - 0, -2 - -2); mu, sigma by t / 10 of (0.8 - 0.5, 0.5 - 2)
    assert gr_schedule(1, cfg) == pytest.approx((0.0, -2.0, 0.53, 1.85))
    assert gr_schedule(10, cfg) == pytest.approx((1.8, -2.0, 0.8, 0.5))
    # LinearInit n = 2: nothing moves until epoch 3 (k) / epoch 2 (v), then steps of 1 / (T - n) = 1/8
    cfg = LossConfig("gr_loss", gr_epochs=10, gr_linear_init=2)
    assert gr_schedule(2, cfg) == pytest.approx((0.0, -2.0, 0.5, 2.0))
    assert gr_schedule(4, cfg) == pytest.approx((0.25, -2.0, 0.5 + 0.3 * 2 / 8, 2.0 - 1.5 * 2 / 8))


def test_gr_loss_by_hand():
    # One unknown entry at x = 0 (p = 0.5) and an observed positive at ln 9, epoch 1 of 10:
    #   k = sigmoid(0 * 0.5 - 2) = 0.1192029; v = exp(-0.5 ((0.5 - 0.53) / 1.85)^2) = 0.9998685
    #   L1 = (1 - 0.5^0.01) / 0.01 = 0.6907505; L2 = (1 - 0.5^1) / 1 = 0.5
    #   unknown: 0.9998685 * (0.1192029 * 0.6907505 + 0.8807971 * 0.5) = 0.5226693
    #   positive: -ln(0.9 + 1e-7) = 0.1053604; loss = (0.1053604 + 0.5226693) / 2 = 0.3140148
    k, v = 1 / (1 + math.exp(2)), math.exp(-0.5 * (0.03 / 1.85) ** 2)
    unknown_term = v * (k * (1 - 0.5**0.01) / 0.01 + (1 - k) * 0.5)
    assert unknown_term == pytest.approx(0.5226693, abs=1e-7)
    loss, g = grad_of([[L9, 0.0]], torch.tensor([[1.0, 0.0]]), torch.tensor([[False, True]]), 1,
                      LossConfig("gr_loss", gr_epochs=10))
    assert loss == pytest.approx((nl(0.9, 1e-7) + unknown_term) / 2, abs=1e-12)
    # k and v are constants (of the detached p): d/dp of v (k L1 + (1-k) L2) = v (-k p^(q2-1) + (1-k) q3 (1-p)^(q3-1)),
    # at p = 0.5: 0.9998685 * (-0.1192029 * 0.5^-0.99 + 0.8807971) = 0.6439533; times dp/dx = 0.25, / 2 entries
    dp = v * (-k * 0.5 ** -0.99 + (1 - k))
    assert g[0, 1].item() == pytest.approx(dp * 0.25 / 2, abs=1e-12)


# --------------------------------------------------------------------------------------------------- ROLE


def test_role_by_hand():
    # x = [0, 0] (p = 0.5), estimates e = [0.5, 0.5], entry 0 observed positive, epr_num_pos = 1; a = -ln(0.50001).
    #   entry 0: 0.5 (a + a) [observed, classifier + estimator] + 0.5 (a + a) [each against the other's 0.5] = 2a
    #   entry 1: 0 + 0.5 (a + a) = a;  regulariser: (0.5 + 0.5 - 1)^2 = 0 for both
    #   loss = 3a / 2 = 1.0396908
    a = nl(0.5)
    e = torch.tensor([[0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    loss, g = grad_of([[0.0, 0.0]], torch.tensor([[1.0, 0.0]]), torch.tensor([[False, True]]), 1,
                      LossConfig("role", epr_num_pos=1.0), estimates=e)
    assert 1.5 * a == pytest.approx(1.0396908, abs=1e-7)
    assert loss == pytest.approx(1.5 * a, abs=1e-12)
    # the estimates get a gradient too: at the positive, 0.5 * d(-ln(e + eps))/de / 2 entries = -0.25 / 0.50001
    # plus the cross term 0.5 * (-0.5 / 0.50001 + 0.5 / 0.50001) / 2 = 0
    assert e.grad[0, 0].item() == pytest.approx(-0.25 / 0.50001, abs=1e-12)
    assert e.grad[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="needs estimates"):
        compute_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.tensor([[False, True]]), 1,
                     LossConfig("role", epr_num_pos=1.0))


def test_role_initial_estimates():
    positive = torch.tensor([[True, False, False], [False, False, False]])
    negative = torch.tensor([[False, True, False], [False, False, False]])
    logits = role_initial_logits(positive, negative, seed=3)
    # logit(0.995) = ln 199 = 5.2933048, logit(0.005) = -ln 199; the rest uniform in [-logit(0.6), logit(0.6)):
    # |x| < ln(0.6 / 0.4) = 0.4054651
    assert logits[0, 0].item() == pytest.approx(math.log(199), abs=1e-6)
    assert logits[0, 1].item() == pytest.approx(-math.log(199), abs=1e-6)
    rest = logits[~(positive | negative)]
    assert rest.abs().max().item() < math.log(1.5) and len(set(rest.tolist())) == 4
    assert torch.equal(role_initial_logits(positive, negative, seed=3), logits)  # every rank builds the same


# -------------------------------------------------------------------------------------------- Partial-BCE


def test_partial_bce_by_hand():
    # g(p) = -40/9 p + 49/9: g(1) = 1, g(0.1) = -4/9 + 49/9 = 5, g(0.5) = 29/9
    g = pbce_normalisation(torch.tensor([1.0, 0.1, 0.5], dtype=torch.float64), LossConfig("partial_bce"))
    assert g.tolist() == pytest.approx([1.0, 5.0, 29 / 9])
    # Row 0 (K = 4): positive at ln 9 (BCE ln(10/9)), observed negative at -ln 3 (BCE ln(4/3)), 2 unknown:
    #   p_y = 0.5 -> 29/9 / 4 * (ln(10/9) + ln(4/3)) = 0.8055556 * 0.3930426 = 0.3166176
    # Row 1: all 4 known, x = 0 -> 4 ln 2 with g(1) / 4 = 1/4 -> ln 2 = 0.6931472 (plain BCE)
    # loss = mean over the 2 images = 0.5048824
    target = torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0]])
    unknown = torch.tensor([[False, False, True, True], [False, False, False, False]])
    expected = (29 / 36 * (math.log(10 / 9) + math.log(4 / 3)) + math.log(2)) / 2
    assert expected == pytest.approx(0.5048824, abs=1e-7)
    loss, grad = grad_of([[L9, -L3, 5.0, -5.0], [0.0, 0.0, 0.0, 0.0]], target, unknown, 1, LossConfig("partial_bce"))
    assert loss == pytest.approx(expected, abs=1e-12)
    # unknown entries get no gradient; row 1's entries (p - y) * g(1) / 4 / 2 images = -0.0625 / +0.0625
    assert grad[0, 2:].tolist() == [0.0, 0.0]
    assert grad[1].tolist() == pytest.approx([-0.0625, 0.0625, 0.0625, 0.0625])
    with pytest.raises(ValueError, match="pbce_alpha \\+ pbce_beta must be 1"):
        LossConfig("partial_bce", pbce_alpha=-4.0)


# ----------------------------------------------------------------------------------------------- BoostLU


def test_boosted_pool_by_hand():
    cams = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]]])
    # alpha 5: (5 - 2 + 15 - 4) / 4 = 3.5; alpha 1: the plain mean (1 - 2 + 3 - 4) / 4 = -0.5
    assert boosted_pool(cams, 5.0).item() == 3.5
    assert boosted_pool(cams, 1.0).item() == -0.5
    # head_logits with alpha 1 is the linear head on the pooled map; with alpha 5 the bias is boosted with the map
    head = torch.nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.fill_(2.0)
        head.bias.fill_(0.5)
    feats = torch.tensor([[[[1.0, -2.0], [3.0, -4.0]]]])  # CAM = 2 f + 0.5 = [[2.5, -3.5], [6.5, -7.5]]
    assert head_logits(head, feats, 1.0).item() == pytest.approx(2 * -0.5 + 0.5)
    assert head_logits(head, feats, 5.0).item() == pytest.approx((12.5 - 3.5 + 32.5 - 7.5) / 4)


def test_boostlu_head_equals_the_authors_model():
    # inputs rounded from the scratch script's draws; their ImageClassifier.forward gave the logits below
    feats = torch.tensor(BOOST_FEATS, dtype=torch.float64).view(2, 6, 3, 3)
    head = FeatureHead(6, 4, boost_alpha=5.0).double()
    with torch.no_grad():
        head.head.weight.copy_(torch.tensor(BOOST_WEIGHT, dtype=torch.float64).view(4, 6))
        head.head.bias.copy_(torch.tensor(BOOST_BIAS, dtype=torch.float64))
    assert head(feats).tolist() == [pytest.approx(r, abs=1e-9) for r in BOOST_LOGITS]


# --------------------------------------------------------------------------- equality with the authors' code


def fixed_batch(dtype=torch.float64):
    """The 3 x 5 batch of the scratch script: one observed positive per row."""
    x = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.5], [-0.5, 3.0, -2.0, 0.0, 1.0], [0.25, -1.5, 2.5, -0.75, -4.0]],
                     dtype=dtype)
    target = torch.zeros_like(x)
    target[[0, 1, 2], [0, 1, 2]] = 1.0
    pseudo = torch.full_like(x, math.nan)
    pseudo[0, 3], pseudo[2, 4] = 0.05, 0.02
    est = torch.tensor([[0.9, 0.3, 0.6, 0.1, 0.4], [0.2, 0.95, 0.15, 0.5, 0.7], [0.35, 0.25, 0.85, 0.45, 0.05]],
                       dtype=dtype)
    return x, target, pseudo, est


def random_batch(dtype=torch.float64):
    """16 x 20 random batch of the scratch script (torch's CPU generator, seed 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 20, generator=g, dtype=torch.float64) * 3
    pos_col = torch.randint(0, 20, (16,), generator=g)
    target = torch.zeros(16, 20, dtype=torch.float64)
    target[torch.arange(16), pos_col] = 1
    labelled = torch.rand(16, 20, generator=g, dtype=torch.float64) < 0.3
    vals = torch.rand(16, 20, generator=g, dtype=torch.float64) * 0.2
    pseudo = torch.where(labelled & (target == 0), vals, torch.full_like(vals, math.nan))
    est = torch.rand(16, 20, generator=g, dtype=torch.float64)
    return x.to(dtype), target.to(dtype), pseudo.to(dtype), est.to(dtype)


PINNED = [("em", 1), ("em_apl", 1), ("gr_loss", 1), ("gr_loss", 3), ("gr_loss", 8), ("role", 1)]


def ours(method, epoch, x, target, pseudo, est):
    x = x.clone().requires_grad_(True)
    est = est.clone().requires_grad_(True)
    cfg = {"em": LossConfig("em", em_alpha=0.2),
           "em_apl": LossConfig("em_apl", em_alpha=0.2, apl_beta=0.02, apl_warmup=5),
           "gr_loss": LossConfig("gr_loss", gr_epochs=8, gr_linear_init=0),
           "role": LossConfig("role", epr_num_pos=1.5)}[method]
    extra = {"em_apl": {"pseudo": pseudo}, "role": {"estimates": est}}.get(method, {})
    out = compute_loss(x, target, target == 0, epoch, cfg, **extra)
    out.loss.backward()
    return out.loss.item(), x.grad, est.grad


@pytest.mark.parametrize("method, epoch", PINNED)
def test_equal_to_the_authors_code_on_a_fixed_batch(method, epoch):
    expected = AUTHORS_FIXED[(method, epoch)]
    loss, grad, est_grad = ours(method, epoch, *fixed_batch())
    assert loss == pytest.approx(expected["loss"], abs=1e-12)
    assert grad.reshape(-1).tolist() == pytest.approx(expected["grad"], abs=1e-12)
    if method == "role":
        assert est_grad.reshape(-1).tolist() == pytest.approx(expected["grad_est"], abs=1e-12)
    # float32, the training dtype: within 1e-6 of the float64 values of the authors' code
    loss32, grad32, _ = ours(method, epoch, *fixed_batch(torch.float32))
    assert loss32 == pytest.approx(expected["loss"], abs=1e-6)
    assert grad32.reshape(-1).tolist() == pytest.approx(expected["grad"], abs=1e-6)


@pytest.mark.parametrize("method, epoch", PINNED)
def test_equal_to_the_authors_code_on_a_random_batch(method, epoch):
    expected = AUTHORS_RANDOM[(method, epoch)]
    loss, grad, est_grad = ours(method, epoch, *random_batch())
    assert loss == pytest.approx(expected["loss"], abs=1e-12)
    assert (grad**2).sum().item() == pytest.approx(expected["gradsq"], rel=1e-10)
    assert grad[0].tolist() == pytest.approx(expected["grad0"], abs=1e-12)
    if method == "role":
        assert (est_grad**2).sum().item() == pytest.approx(expected["estsq"], rel=1e-10)


# ---------------------------------------------------------------------------------------------------- APL


def test_apl_quota_and_selection_by_hand():
    # int(0.9 * U_c / (epochs - warmup)): U = 10 -> 0.9 * 10 / 5 = 1.8 -> 1; U = 100 -> 18; U = 7 -> 1.26 -> 1
    assert apl_quota(np.array([10, 100, 7]), 0.9, 10, 5).tolist() == [1, 18, 1]
    scores = np.array([[0.3], [0.1], [0.2], [0.1], [0.5]])
    eligible = np.array([[True], [True], [False], [True], [True]])
    # eligible rows 0, 1, 3, 4 with scores .3 .1 .1 .5: the two lowest are rows 1 and 3; with a quota of 1 the
    # tie goes to the lower row
    assert np.flatnonzero(apl_select(scores, eligible, np.array([2]))[:, 0]).tolist() == [1, 3]
    assert np.flatnonzero(apl_select(scores, eligible, np.array([1]))[:, 0]).tolist() == [1]
    assert apl_select(scores, eligible, np.array([9]))[:, 0].tolist() == [True, True, False, True, True]


def test_apl_state_over_the_epochs():
    cfg = build_config([], ["data=x", "method=em_apl", "em_alpha=0.2", "apl_beta=0.02", "apl_warmup=2", "epochs=4"])
    train_ids = np.array([3, 5, 8, 9])
    unknown = torch.tensor([[False, True], [True, True], [True, False], [True, True]])
    state = AplState(cfg, train_ids, unknown)
    # U = (3, 3) unknown per class, 0.9 * 3 / (4 - 2) = 1.35 -> one entry per class and step
    assert state.quota.tolist() == [1, 1]
    scores = np.array([[0.9, 0.4], [0.2, 0.3], [0.1, 0.8], [0.5, 0.05]], dtype=np.float32)
    calls = []

    def predict():
        calls.append(1)
        return train_ids, scores

    assert state.end_epoch(1, predict) is None and not calls  # warm-up
    assert "2 entries" in state.end_epoch(2, predict)
    # class 0: unknown rows 1, 2, 3 -> lowest score row 2 (0.1); class 1: rows 0, 1, 3 -> row 3 (0.05)
    table = state.table.numpy()
    assert np.argwhere(~np.isnan(table)).tolist() == [[2, 0], [3, 1]]
    assert table[2, 0] == np.float32(0.1) and table[3, 1] == np.float32(0.05)
    state.end_epoch(3, predict)  # next lowest among the unlabelled: class 0 row 1 (0.2), class 1 row 1 (0.3)
    assert np.argwhere(~np.isnan(state.table.numpy())).tolist() == [[1, 0], [1, 1], [2, 0], [3, 1]]
    assert state.end_epoch(4, predict) is None and len(calls) == 2  # the last epoch: nothing would use it
    # the batch's rows by sample id; the checkpoint round trip
    inputs = state.loss_inputs(np.array([9, 5]), "cpu")["pseudo"]
    assert inputs[0, 1].item() == pytest.approx(0.05) and math.isnan(inputs[0, 0].item())
    other = AplState(cfg, train_ids, unknown)
    other.load_state_dict(state.state_dict())
    assert torch.equal(torch.isnan(other.table), torch.isnan(state.table))
    assert torch.equal(other.table.nan_to_num(), state.table.nan_to_num())
    with pytest.raises(ValueError, match="outside the run's training ids"):
        training_rows(train_ids, np.array([4]))


# ------------------------------------------------------------------------------------------------- config


def test_method_keys_and_errors():
    base = ["data=x"]
    with pytest.raises(ConfigError, match="em_alpha is required for method 'em'; Zhou et al. use VOC 0.2"):
        build_config([], base + ["method=em"])
    with pytest.raises(ConfigError, match=r"apl_warmup \(5\) must be < epochs \(5\)"):
        build_config([], base + ["method=em_apl", "em_alpha=0.1", "apl_beta=0.2", "apl_warmup=5", "epochs=5"])
    with pytest.raises(ConfigError, match="epr_num_pos is required"):
        build_config([], base + ["method=role"])
    with pytest.raises(ConfigError, match=r"boost_alpha must be in \(0, inf\), got 0.0"):
        build_config([], base + ["boost_alpha=0"])
    # GR-Loss's schedules take the run's epochs and LinearInit unless given
    cfg = build_config([], base + ["method=gr_loss", "epochs=7", "linear_init_epochs=2"])
    assert (cfg.loss.gr_epochs, cfg.loss.gr_linear_init) == (7, 2)
    assert build_config([], base + ["method=gr_loss", "gr_epochs=8"]).loss.gr_epochs == 8
    assert build_config([], base + ["method=an"]).loss.gr_epochs is None
    # BoostLU is the LL method with boost_alpha: runs and reports know it as boostlu_<method>
    assert method_id("ll_r", 5.0) == "boostlu_ll_r"
    assert method_id("ll_r", 1.0) == "ll_r" and method_id("an", None) == "an"


def test_state_size_limit():
    cfg = build_config([], ["data=x", "method=role", "epr_num_pos=2", "max_state_entries=100"])
    check_state_size(cfg, 10, 10)  # 100 entries: allowed
    with pytest.raises(ConfigError, match=r"11 x 10 = 110 entries .* more than max_state_entries = 100"):
        check_state_size(cfg, 11, 10)
    check_state_size(build_config([], ["data=x", "method=an", "max_state_entries=1"]), 11, 10)  # no table


# ------------------------------------------------------------------------------- pinned authors' outputs

BOOST_FEATS = [
    -2.310412, -0.373251, -1.060817, 0.999509, -0.884025, -1.275547, -0.623225, -0.866442, -1.295627, 1.523632,
    0.323661, 2.017726, 1.135742, -1.226881, 0.071388, 0.338017, 0.153519, -0.633275, -1.260925, -0.726951,
    -0.019965, 0.2103, 0.177189, -0.83051, 1.011189, -0.242679, -0.773011, -1.595181, -0.687004, 1.488074,
    -0.448416, -0.891003, -0.091742, 0.556323, -0.009446, -1.217688, -1.265465, -1.119535, 1.166486, 0.926232,
    0.653924, 0.148215, -1.146109, 1.872776, -0.309915, 0.24018, -1.348761, 0.244399, -3.145296, -0.113731,
    1.696202, -0.665203, -0.587223, 2.832104, 0.903997, 0.947837, -1.380937, -2.054751, 0.047577, -0.385569,
    -0.275035, 0.88659, 1.485742, -0.007856, -1.128799, -0.093769, 0.998344, -0.082622, 0.182532, 0.950904,
    -1.763162, 1.010732, 0.749488, -0.560555, 0.074247, 1.993646, 0.449865, 1.553145, 0.053986, 1.474442,
    -0.70123, 0.326256, -0.873864, 0.394127, 0.891517, 1.173156, -0.394903, 0.446423, -0.172654, 0.97512,
    0.416454, -0.498651, -2.024503, -0.683009, 0.431302, -0.365629, -0.531233, -0.134084, 1.364272, 0.232771,
    0.008199, 0.236967, -1.519526, 1.021619, 1.114919, -0.55599, 0.533169, -0.187875]
BOOST_WEIGHT = [
    -0.160435, 0.78106, -0.101769, 0.546922, 0.02671, 0.006714, -0.770309, -0.240954, -0.654159, -0.708699,
    0.161875, -0.640966, -0.442465, 0.455344, 0.082424, -0.47356, 0.546513, -0.081959, -0.100752, -0.930478,
    0.75763, -0.583918, -0.656452, 0.643229]
BOOST_BIAS = [0.102725, -0.112102, 0.073075, -0.004395]
BOOST_LOGITS = [[2.94794619663867, 5.23838414362733, 4.272689718381, 1.87615109590589],
                [2.42833950075922, -0.525074332907111, 0.537522620953889, 4.26249361695433]]

AUTHORS_FIXED = {
    ('em', 1): {
        'loss': -0.0642723321974719,
        'grad': [
            -0.00794677124564335, -0.00262149244165291, 0.00156669141398253, -0.00180706637588308,
            0.00298292903856783, -0.00156669141398253, -0.00316169168747397, -0.00279982893925824, 0.0,
            0.00262149244165291, 0.000820446942121858, -0.00298292903856783, -0.00505715727867596,
            -0.00217894993652177, -0.000942010961682602],
    },
    ('em_apl', 1): {
        'loss': -0.0601311414014486,
        'grad': [
            -0.00794677124564335, -0.00262149244165291, 0.00156669141398253, -3.41941219104156e-06,
            0.00298292903856783, -0.00156669141398253, -0.00316169168747397, -0.00279982893925824, 0.0,
            0.00262149244165291, 0.000820446942121858, -0.00298292903856783, -0.00505715727867596,
            -0.00217894993652177, -2.67074128943181e-06],
    },
    ('gr_loss', 1): {
        'loss': 0.410568393529135,
        'grad': [
            -0.00794686056590606, 0.00574774808944508, 0.0108014258313487, -0.00452157426607543,
            0.00722429086775337, 0.00886612890651582, -0.00316172454659069, -0.000669010088607071, 0.01073166990153,
            0.00936092896338433, 0.0109925850635261, 0.00232525753624195, -0.00505721145418296, 0.00740531994907981,
            -0.0061994563495688],
    },
    ('gr_loss', 3): {
        'loss': 0.407854308184619,
        'grad': [
            -0.00794686056590606, 0.00476379862243192, 0.00931733905623725, -0.00449145680514271,
            0.00614397054035485, 0.00759037984644307, -0.00316172454659069, -0.00103694638821107,
            0.00926996297644554, 0.00802347487797119, 0.00949730855460186, 0.00166429317299876,
            -0.00505721145418296, 0.00626691578782219, -0.00598568473067497],
    },
    ('gr_loss', 8): {
        'loss': 0.299385751252162,
        'grad': [
            -0.00794686056590606, 0.00125549686186954, 0.00374328975403245, -0.00169804182219765,
            0.0019618083146095, 0.00271648688559695, -0.00316172454659069, -0.000876690022840715,
            0.00373269467120505, 0.00294088957892391, 0.0038714579335288, -1.4269892642891e-05,
            -0.00505721145418296, 0.00199376235722813, -0.00196419527125325],
    },
    ('role', 1): {
        'loss': 0.576783422415731,
        'grad': [
            -0.00329537719228363, 0.00143358203265316, 0.00369927944445211, -0.00118457312709565, 0.015790982643399,
            0.00886870405675482, -0.000928117212767523, 0.00029207332368352, 0.00313902870183473,
            0.00350378197989263, 0.0101628504897013, -0.000379464892725876, 0.000822459886069249,
            -0.00156981114071688, -0.000844447703945495],
        'grad_est': [
            -0.0199280427469754, 0.0149304318503541, 0.00688043826241685, 0.0294730875260343, -0.047994920699024,
            -0.0269848175115236, -0.0268997251064833, 0.0180528831451869, 0.01, 0.00506956814964586,
            -0.0210869477272142, 0.0220137286272957, -0.0485994046582903, 0.027397584299245, 0.0324678525547644],
    },
}
AUTHORS_RANDOM = {
    ('em', 1): {
        'loss': 0.0605934564638958,
        'gradsq': 9.18258033929758e-05,
        'grad0': [
            -4.22320453575707e-06, -0.000129830443857327, -7.60704528499815e-05, 8.47775429756824e-05,
            -0.000101978135548004, -0.00305694637035751, -0.00013524285107148, -0.00010461592473813,
            -4.78405637291155e-05, 2.89617110361305e-05, 0.000120907304489677, 8.85037875571614e-06,
            6.61041557650979e-05, -5.51693077638467e-05, 3.30825458581121e-05, 0.000123797870573641,
            6.82769091477279e-05, -0.000134406611187764, -5.14405399392945e-05, -0.000124287209660491],
    },
    ('em_apl', 1): {
        'loss': 0.0879831985629695,
        'gradsq': 9.111221802872e-05,
        'grad0': [
            -4.22320453575707e-06, 1.30736728314715e-05, -7.60704528499815e-05, 8.47775429756824e-05,
            -0.000101978135548004, -0.00305694637035751, -0.00013524285107148, -6.66870410940427e-06,
            -9.13395693606496e-06, 2.89617110361305e-05, 0.000120907304489677, 8.85037875571614e-06,
            6.61041557650979e-05, -5.51693077638467e-05, 3.30825458581121e-05, 0.000123797870573641,
            6.82769091477279e-05, -0.000134406611187764, -5.14405399392945e-05, -0.000124287209660491],
    },
    ('gr_loss', 1): {
        'loss': 0.682499148726985,
        'gradsq': 0.000118965599585284,
        'grad0': [
            -0.000329769206186616, 0.000230681420093538, -0.000232140505144913, 0.000104067316758324,
            -0.000163658556693975, -0.00305836597851846, 2.18985073328271e-06, -0.000155086408805593,
            -0.000284979319589971, 2.33507009789501e-05, 0.000444002567633565, 5.38912642769482e-06,
            7.1456215572943e-05, -0.000272969429254137, 0.000514868423063759, 0.000436231713328933,
            0.000509038231386209, -5.77815948750137e-06, -0.000279219191849062, -7.39793176261449e-05],
    },
    ('gr_loss', 3): {
        'loss': 0.664962008705962,
        'gradsq': 0.000112517621595564,
        'grad0': [
            -0.0003148676824739, 0.000188178658030616, -0.000228555991033235, 8.70638787756506e-05,
            -0.000167364281579726, -0.00305836597851846, -1.83935851045513e-05, -0.000159689898487373,
            -0.000275590221848346, 1.94304533261396e-05, 0.000380731514593189, 4.47904078681088e-06,
            5.96504386922691e-05, -0.000264918378521602, 0.000444875289617557, 0.000373824848797032,
            0.000439249550995635, -2.55724562949999e-05, -0.00027047358964229, -8.69339662900958e-05],
    },
    ('gr_loss', 8): {
        'loss': 0.491951491419553,
        'gradsq': 9.41926377740793e-05,
        'grad0': [
            -9.62398059231188e-05, 4.30565650502151e-05, -8.30499497368012e-05, 1.94893700000243e-05,
            -7.066018040135e-05, -0.00305836597851846, -3.23301535801349e-05, -6.89737292792477e-05,
            -9.1274099496532e-05, 3.79476577669362e-06, 0.000140537128015868, 8.47541445034904e-07,
            1.26498984590319e-05, -8.95150664770356e-05, 0.000181342043485652, 0.000136546341092443,
            0.000177163885712286, -3.44607779263249e-05, -9.0439341636717e-05, -5.14668952167142e-05],
    },
    ('role', 1): {
        'loss': 1.48006614603061,
        'gradsq': 0.000214160035596612,
        'grad0': [
            -0.00105839205494019, -0.000236062891565549, -0.00129324615888086, 0.000809695111197615,
            -0.000446771276683258, -0.00291728650085929, -0.000595102146118673, -0.0013532371710285,
            -0.00071211113085258, 0.000889690060289227, -9.56363050853874e-05, 0.000774273322624059,
            0.00048789286804559, -0.000213041790089151, 0.00018903706987738, 0.00109946128628061,
            -9.78218588011353e-05, -0.000210295744654904, -0.000887823706354337, -0.00127998988410729],
        'estsq': 0.922461470245375,
    },
}
