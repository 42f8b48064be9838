"""Losses for weakly supervised multi-label training: the large-loss schemes and their baselines.

Implements "Large Loss Matters in Weakly Supervised Multi-Label Classification" (Kim et al., CVPR 2022,
section 3.3) and the baselines it compares against (Cole et al., CVPR 2021). Every function here is pure:
it never mutates its inputs or the config, and the epoch schedule is a function of the epoch number.

Conventions (docs/ARCHITECTURE.md section 5)
--------------------------------------------
- ``logits``  float ``[B, K]``: raw scores, before the sigmoid.
- ``target``  float ``[B, K]``: the assume-negative (AN) target, 1.0 for observed positives (including
  LL-Cp corrections already applied by the LabelStore) and 0.0 for everything else. For method ``full`` it
  is the complete truth.
- ``unknown`` bool ``[B, K]``: True where the label is unobserved. Only these entries may be modified by the
  large-loss schemes; their AN target must be 0. Observed positives and observed negatives are clean and are
  never modified.
- ``epoch`` is 1-based, as in the paper ("the first epoch, t = 1").
- Per-entry losses are BCE on logits (``binary_cross_entropy_with_logits``, numerically stable). Half and
  bfloat16 logits are up-cast to float32 first, so the loss values and their ranking do not depend on the
  autocast dtype of the loss (the model computes its logits in float32 anyway, train/model.py).
- Unless stated otherwise a loss is the sum over all B*K entries divided by B*K (the paper's Eq. 2/3:
  1/|D'| * 1/K * sum, and Cole et al.'s ``loss_denom_mtx``), so a rejected (zeroed) or unobserved entry
  still counts in the denominator.

Methods
-------
``full``      BCE against complete labels (the upper bound; ``unknown`` must be all False).
``an``        Naive AN: mean BCE against the AN target over all B*K entries.
``iu``        Ignore unobserved: BCE summed over the observed entries, divided by B*K (Cole et al.'s
              ``loss_iu`` under their ``loss_denom_mtx``), not by the number of observed entries.
``wan``       Weighted AN (Cole et al.): unknown entries (the assumed negatives) are weighted ``wan_weight``
              (default 1/(K-1)), observed entries 1. Normalised like Cole et al.: the weighted sum divided by
              B*K (not by the sum of the weights). Cole et al. weight every negative; in their single-positive
              setting every negative is an assumed one, so this is the same loss there, and with partial
              labels the clean observed negatives keep full weight.
``lsan``      Label smoothing on the AN targets (Cole et al.'s form): target 1 -> 1 - ls_coef, 0 -> ls_coef,
              on every entry; mean over B*K.
``epr``       Expected positive regularisation (Cole et al.):
              ``sum_{observed} BCE / (B*K) + (mean_b sum_c sigmoid(x_bc) - epr_num_pos)**2 / K**2``.
              Cole et al. sum over the observed positives (in their single-positive setting there is nothing
              else observed); here the observed negatives of a partial-label protocol are included too, since
              they are clean labels. Cole et al. compute -log(p + 1e-5); here BCE on logits (no epsilon).
``ll_r``      LL-R: from epoch 2 the unknown entries with the k largest losses get loss 0 (still counted in
              the mean); k from the schedule ``rate = (t-1)*delta_rel/100`` (see ``ll_selection`` below).
``ll_ct``     LL-Ct: as LL-R, but the selected entries get BCE against target 1 instead (paper Eq. 5/6).
``ll_cp``     LL-Cp: as LL-Ct with a constant ``rate = delta_rel/100``; in the current step the selected
              entries use target 1, as in LL-Ct (the official code does the same), and ``corrections``
              holds the entries meant for the LabelStore as permanent corrections (effective from the
              next epoch).
``ll_r_abs``  Absolute variants (paper, "Absolute variant"): the unknown entries with loss strictly greater
``ll_ct_abs`` than ``R(t) = r0 - t*delta_abs`` are rejected / temporarily corrected. ``t`` is the same 1-based
              epoch as everywhere else. The paper defines the variant "the same as Equation 4 except for
              R(t)", and the epoch-1 exemption belongs to the method's description, so epoch 1 is exempt by
              default (``abs_skip_first_epoch``); set it False to apply R(1) = r0 - delta_abs in epoch 1.

Follow-up single-positive methods
---------------------------------
These take probabilities ``p = sigmoid(x)`` through ``-log(p + eps)`` with their authors' epsilon, as their
public code does (the loss values and gradients equal theirs; the tests pin values computed with it). Their
authors' code knows single positive labels only; where a partial-label protocol observes negatives, the
extension to them is stated per method.

``em``        EM (Zhou et al., ECCV 2022): observed positives ``-log(p + 1e-5)``; unobserved entries
              ``-em_alpha * H(p)`` with ``H(p) = -p log(p + 1e-5) - (1-p) log(1-p + 1e-5)`` (entropy
              maximisation); sum over B*K entries / (B*K). Observed negatives: ``-log(1-p + 1e-5)``.
``em_apl``    EM + APL: as ``em``, and the unobserved entries that asymmetric pseudo-labelling has labelled
              (``pseudo`` not NaN: a soft negative label s, the prediction when it was labelled) get
              ``apl_beta * (-s log(p + 1e-5) - (1-s) log(1-p + 1e-5))`` instead of the entropy term. The
              pseudo-labels are state of the run (train/methods.py), passed in as ``pseudo``.
``gr_loss``   GR-Loss (Chen et al., IJCAI 2024): observed positives ``-log(p + 1e-7)``; unobserved entries
              ``v(p) * (k(p) L1(p) + (1 - k(p)) L2(p))`` with ``L1 = (1 - p^q2)/q2``, ``L2 = (1 - (1-p)^q3)/q3``,
              ``k = sigmoid(w p + b)``, ``v = exp(-(p - mu)^2 / (2 sigma^2))`` (k and v of the detached p);
              w, b, mu, sigma move linearly over the epochs (``gr_schedule``); mean over B*K. Observed
              negatives: ``L2(p)`` (k = 0, v = 1).
``role``      ROLE (Cole et al., CVPR 2021): the classifier and a learned label estimate ``estimates``
              (probabilities, [B, K], with gradient; train/methods.py keeps the table) each fit the observed
              positives and the other's detached output, plus EPR's regulariser on both, all halved (the
              authors' formula). Observed negatives: ``-log(1-p + 1e-5)`` for both, as the positives.
``partial_bce`` Partial-BCE (Durand et al., CVPR 2019): per image ``g(p_y) / K * sum_{known} BCE`` with
              ``p_y`` the proportion of known labels of the image and ``g(p) = pbce_alpha p^pbce_gamma +
              pbce_beta`` (g(1) = 1; the paper's gamma = 1, g(0.1) = 5: alpha = -40/9, beta = 49/9); mean over
              the B images; BCE on logits. With single positive labels every image has p_y = 1/K, and it is
              Naive IU times a constant.

BoostLU (Kim et al., CVPR 2023) is not a loss: it is the model's head (``boost_alpha``, train/model.py)
under any of these losses, the large-loss ones in the authors' code.

Which entries LL-R / LL-Ct / LL-Cp modify: ``ll_selection``
----------------------------------------------------------
Two rules, both exact and identical on CPU and GPU (only exact comparisons, no dependence on the order in
which ``torch.topk`` returns equal values):

``official`` (the default, and what the paper's numbers come from): the rule of the authors' code
    (snucml/LargeLossMatters at its first code commit). The k-th largest value of the batch's loss with every
    observed entry set to 0 is the threshold; every unknown entry whose loss is >= the threshold is modified
    in the step (ties at the k-th loss are all in, so more than k entries can be modified), and LL-Cp corrects
    permanently only the unknown entries strictly above it (k - 1 without ties; none at all when k = 1). k is
    the official floating-point k: the official loop keeps ``rate_left``, starting at 1 and losing
    ``delta_rel/100`` in float after every epoch, and takes ``k = ceil(B*K*(1 - rate_left))``; LL-Cp, once
    that k is not 0, uses ``ceil(B*K*(delta_rel/100))``. The float k is one more than the exact one in some
    settings (measured in tests/test_losses.py::test_official_k_against_exact_k). When the k-th value is 0
    (k above the number of unknown entries, or fewer than k unknown entries with a loss above 0: float32 BCE
    against 0 is exactly 0 for very negative logits) the official code also modifies the observed entries,
    whose masked loss is 0 too; here observed entries are never modified, the one difference. Where the
    official code would fail (``rate_left`` below 0 asks for more than B*K entries) k is capped at B*K; where
    ``rate_left`` is exactly 0 (e.g. delta_rel 50 at epoch 3) nothing is modified, as there.
``exact_k``: ``k = ceil(B*K*rate)`` in exact rational arithmetic, capped at the number of unknown entries,
    and exactly k entries are modified: unknown entries ranked by (loss descending, flat index ``b*K + c``
    ascending), the first k taken, so among entries equal to the k-th value the lower flat index wins. LL-Cp
    corrects permanently the same k entries. Lower index first is an arbitrary but reproducible choice; it
    uses only exact comparisons and an integer prefix sum.

Under the global top-k option (``global_topk``) either rule is applied to the batch concatenated over ranks
in rank order, as if one process held it: the flat index of ``exact_k`` is ``rank*B*K + b*K + c``, and the
``official`` threshold is the k-th largest masked loss of the concatenated batch (0 when it holds fewer than
k unknown entries). Each rank sends only its own top-k candidates, among which that k-th value always is.

No host sync: ``compute_loss`` never waits for the device unless asked to (``check``, the default for callers
other than the trainer, raises on invalid inputs at once). Every k that decides a selection is either a host
int computed from the batch shape or a 0-d tensor on the device (``exact_k``'s cap at the number of unknown
entries, the global batch's k looked up in a table by its gathered number of rows): each ``torch.topk`` has a
static k, and the boundary is resolved by comparisons on the device. The counts of ``LossOutput`` are 0-d
tensors and the input checks are counts on the device (``LossOutput.problems``, raised by ``raise_problems``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Literal, get_args

import torch
import torch.distributed
import torch.nn.functional as F

__all__ = [
    "METHODS",
    "Method",
    "SELECTIONS",
    "Selection",
    "LossConfig",
    "LossOutput",
    "GatherFn",
    "compute_loss",
    "modification_rate",
    "num_to_modify",
    "abs_threshold",
    "select_topk",
    "select_official",
    "select_global_topk",
    "PROBLEMS",
    "raise_problems",
    "gr_schedule",
    "pbce_normalisation",
]

Method = Literal["full", "an", "iu", "wan", "lsan", "epr", "ll_r", "ll_ct", "ll_cp", "ll_r_abs", "ll_ct_abs",
                 "em", "em_apl", "gr_loss", "role", "partial_bce"]
METHODS: tuple[str, ...] = get_args(Method)
#: which entries LL-R / LL-Ct / LL-Cp modify and LL-Cp corrects (module docstring)
Selection = Literal["official", "exact_k"]
SELECTIONS: tuple[str, ...] = get_args(Selection)
#: the relative large-loss schemes: a top-k of k = ceil(B*K*rate) per batch, rate from delta_rel
TOPK_METHODS = frozenset({"ll_r", "ll_ct", "ll_cp"})
_ABS_METHODS = frozenset({"ll_r_abs", "ll_ct_abs"})
_REJECT_METHODS = frozenset({"ll_r", "ll_r_abs"})

#: Concatenates a 1-D tensor from every rank along dim 0, in rank order, identical on all ranks
#: (e.g. ``accelerator.gather``). Every rank must pass a tensor of the same length.
GatherFn = Callable[[torch.Tensor], torch.Tensor]


def _exact(value: float) -> Fraction:
    """The decimal the user wrote, as an exact fraction: 0.2 -> 1/5, not the binary double 0.2000000000000000111.

    ``repr`` of a float is the shortest decimal that round-trips, which is what a config file contains.
    """
    return Fraction(repr(float(value)))


def _check_real(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"LossConfig.{name} is required for this method, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LossConfig.{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"LossConfig.{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"LossConfig.{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"LossConfig.{name} must be <= {maximum}, got {value!r}")


#: the authors' per-dataset values of the keys that have no default, for the error that asks for them
_AUTHORS_VALUES = {
    "em_alpha": "Zhou et al. use VOC 0.2, COCO 0.1, NUS-WIDE 0.1, CUB 0.01 (configs/<dataset>.yaml sets it)",
    "apl_beta": "Zhou et al. use VOC 0.02, COCO 0.9, NUS-WIDE 0.2, CUB 0.4 (configs/<dataset>.yaml sets it)",
    "apl_warmup": "Zhou et al. use VOC 5, COCO 5, NUS-WIDE 4, CUB 3 (configs/<dataset>.yaml sets it)",
}


def _check_int(name: str, value: object, *, minimum: int, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"LossConfig.{name} is required for this method, got None")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LossConfig.{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"LossConfig.{name} must be >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class LossConfig:
    """Typed loss configuration. Frozen: the loss never changes its config (schedules are functions of t).

    Its fields are also the loss keys of a training config file (train/config.py), with the same names.
    """

    #: the loss (see the module docstring)
    method: Method = "an"
    #: LL-R / LL-Ct / LL-Cp rate step in PERCENT, as in the paper: 0.2 means 0.2 % of the B*K entries. The one
    #: default of the system; a training config takes it from its ``delta_rel_table`` first
    delta_rel: float = 0.2
    #: absolute variants: initial threshold R0 of R(t) = r0 - t * delta_abs (required for *_abs)
    r0: float | None = None
    #: absolute variants: decrease of the threshold per epoch (required for *_abs)
    delta_abs: float | None = None
    #: absolute variants: no modification in epoch 1 (the paper's warm-up rule); see the module docstring
    abs_skip_first_epoch: bool = True
    #: LSAN label-smoothing coefficient (Cole et al. use 0.1)
    ls_coef: float = 0.1
    #: WAN weight of the unknown (assumed-negative) entries; None means 1/(K-1), as in Cole et al.
    wan_weight: float | None = None
    #: EPR expected number of positives per image (Cole et al.: VOC 1.5, COCO 2.9, NUS 1.9, CUB 31.4)
    epr_num_pos: float | None = None
    #: LL-R/Ct/Cp: take the top-k over the batch gathered from all ranks instead of per rank
    global_topk: bool = False
    #: LL-R/Ct/Cp: which entries are modified and corrected (module docstring). ``official`` by default: the
    #: paper's numbers come from the authors' code, and this reproduces its selection and its float k
    ll_selection: Selection = "official"
    # ---- follow-up methods; the authors' per-dataset values are in configs/<dataset>.yaml ----
    #: EM / EM+APL: weight of the entropy term (Zhou et al.'s alpha: VOC 0.2, COCO 0.1, NUS 0.1, CUB 0.01)
    em_alpha: float | None = None
    #: EM+APL: weight of the pseudo-labelled entries (Zhou et al.'s beta: VOC 0.02, COCO 0.9, NUS 0.2, CUB 0.4)
    apl_beta: float | None = None
    #: EM+APL: pseudo-labelling at the end of every epoch >= apl_warmup (their warmup_epoch: VOC 5, COCO 5,
    #: NUS 4, CUB 3)
    apl_warmup: int | None = None
    #: EM+APL: share of a class's unobserved entries labelled negative over the epochs after the warm-up
    apl_neg_proportion: float = 0.9
    #: GR-Loss: q of L1 (unobserved entries as positives) and of L2 (as negatives); Chen et al.'s defaults
    gr_q2: float = 0.01
    gr_q3: float = 1.0
    #: GR-Loss: k(p) = sigmoid(w p + b) moves from (gr_w, gr_b) to (gr_w_end, gr_b_end) over the epochs
    gr_w: float = 0.0
    gr_w_end: float = 2.0
    gr_b: float = -2.0
    gr_b_end: float = -2.0
    #: GR-Loss: v(p) = exp(-(p - mu)^2 / (2 sigma^2)) moves from (gr_mu, gr_sigma) to (gr_mu_end, gr_sigma_end)
    gr_mu: float = 0.5
    gr_mu_end: float = 0.8
    gr_sigma: float = 2.0
    gr_sigma_end: float = 0.5
    #: GR-Loss: T and n of the schedules (gr_schedule); a training config fills them from `epochs` and
    #: `linear_init_epochs` when not given
    gr_epochs: int | None = None
    gr_linear_init: int | None = None
    #: Partial-BCE: g(p) = pbce_alpha p^pbce_gamma + pbce_beta, g(1) = 1; Durand et al.: gamma 1, g(0.1) = 5
    pbce_alpha: float = -40 / 9
    pbce_beta: float = 49 / 9
    pbce_gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown loss method {self.method!r}; valid methods: {', '.join(METHODS)}")
        _check_real("delta_rel", self.delta_rel, minimum=0.0, maximum=100.0)
        _check_real("ls_coef", self.ls_coef, minimum=0.0, maximum=0.5)
        _check_real("wan_weight", self.wan_weight, minimum=0.0, allow_none=True)
        if not isinstance(self.abs_skip_first_epoch, bool):
            raise TypeError(f"LossConfig.abs_skip_first_epoch must be a bool, got {self.abs_skip_first_epoch!r}")
        if not isinstance(self.global_topk, bool):
            raise TypeError(f"LossConfig.global_topk must be a bool, got {self.global_topk!r}")
        if self.ll_selection not in SELECTIONS:
            raise ValueError(f"LossConfig.ll_selection must be one of {', '.join(SELECTIONS)}, "
                             f"got {self.ll_selection!r}")
        if self.method in _ABS_METHODS:
            _check_real("r0", self.r0)
            _check_real("delta_abs", self.delta_abs, minimum=0.0)
        else:
            _check_real("r0", self.r0, allow_none=True)
            _check_real("delta_abs", self.delta_abs, allow_none=True)
        _check_real("epr_num_pos", self.epr_num_pos, minimum=0.0, allow_none=self.method not in ("epr", "role"))
        if self.global_topk and self.method not in TOPK_METHODS:
            raise ValueError(
                f"LossConfig.global_topk applies to {', '.join(sorted(TOPK_METHODS))} only, "
                f"not to method {self.method!r}; set global_topk=false")
        self._check_follow_up()

    def _check_follow_up(self) -> None:
        """The keys of the follow-up methods; a method's own keys are required for it."""
        method = self.method
        required = {"em": ("em_alpha",), "em_apl": ("em_alpha", "apl_beta", "apl_warmup")}.get(method, ())
        for name in required:
            if getattr(self, name) is None:
                raise ValueError(f"LossConfig.{name} is required for method {method!r}; {_AUTHORS_VALUES[name]}")
        _check_real("em_alpha", self.em_alpha, minimum=0.0, allow_none=True)
        _check_real("apl_beta", self.apl_beta, minimum=0.0, allow_none=True)
        _check_int("apl_warmup", self.apl_warmup, minimum=1, allow_none=True)
        _check_real("apl_neg_proportion", self.apl_neg_proportion, minimum=0.0, maximum=1.0)
        for name in ("gr_q2", "gr_q3", "gr_sigma", "gr_sigma_end"):
            _check_real(name, getattr(self, name))
            if getattr(self, name) <= 0:
                raise ValueError(f"LossConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gr_w", "gr_w_end", "gr_b", "gr_b_end", "gr_mu", "gr_mu_end", "pbce_alpha"):
            _check_real(name, getattr(self, name))
        _check_int("gr_epochs", self.gr_epochs, minimum=1, allow_none=method != "gr_loss")
        _check_int("gr_linear_init", self.gr_linear_init, minimum=0, allow_none=True)
        if self.gr_epochs is not None and (self.gr_linear_init or 0) >= self.gr_epochs:
            raise ValueError(f"LossConfig.gr_linear_init ({self.gr_linear_init}) must be < gr_epochs "
                             f"({self.gr_epochs}): the schedules divide by gr_epochs - gr_linear_init")
        _check_real("pbce_beta", self.pbce_beta, minimum=0.0)
        _check_real("pbce_gamma", self.pbce_gamma)
        if self.pbce_gamma <= 0:
            raise ValueError(f"LossConfig.pbce_gamma must be > 0, got {self.pbce_gamma!r}")
        if abs(self.pbce_alpha + self.pbce_beta - 1.0) > 1e-9:
            raise ValueError(f"LossConfig.pbce_alpha + pbce_beta must be 1 (g(1) = 1: all labels known is plain "
                             f"BCE), got {self.pbce_alpha!r} + {self.pbce_beta!r}; set pbce_beta = 1 - pbce_alpha")


@dataclass(frozen=True)
class LossOutput:
    """What ``compute_loss`` returns. Every field is a tensor on the logits' device, so that a training step
    never waits for the device (the counts are 0-d int64 tensors: ``int(out.k)`` reads one, at the price of a
    host sync)."""

    #: scalar loss (differentiable)
    loss: torch.Tensor
    #: bool [B, K]: entries whose loss was rejected or corrected in this step (this rank's entries)
    modified: torch.Tensor
    #: number of True entries in ``modified``
    num_modified: torch.Tensor
    #: the k of the selection (global k under global_topk): under ``exact_k`` capped at the number of unknown
    #: entries, and the number modified over the whole selection; under ``official`` the official k capped at
    #: B*K (ties can make more entries modified, fewer unknown entries fewer). The number above the threshold
    #: for the absolute variants, 0 for the other methods
    k: torch.Tensor
    #: bool [B, K]: LL-Cp's permanent corrections, what the trainer writes to the LabelStore (this rank's
    #: entries): ``modified`` under ``exact_k``, the entries strictly above the k-th loss under ``official``.
    #: All False for every other method
    corrections: torch.Tensor
    #: int64 [len(PROBLEMS)]: the counts of invalid inputs found on the device (``raise_problems``), None for
    #: the methods that check nothing beyond shapes
    problems: torch.Tensor | None = None


#: what compute_loss checks on the device, in the order of ``LossOutput.problems``: unknown entries with a NaN
#: loss, unknown entries with a target != 0, unknown entries under method ``full``, and (global top-k) gathered
#: rows that disagree on K or do not follow rank order
PROBLEMS = ("nan_unknown", "target_unknown", "unknown_full", "gather_order")


def raise_problems(problems: torch.Tensor | None) -> None:
    """One host sync: raise the error of the first non-zero count of ``problems`` (``LossOutput.problems``, or a
    sum of them over steps: the trainer checks its running sum every ``log_every`` steps and at the end of an
    epoch), do nothing when all are 0 or ``problems`` is None."""
    if problems is None:
        return
    nan_unknown, target_unknown, unknown_full, gather_order = (int(v) for v in problems.tolist())
    if nan_unknown:
        raise ValueError(f"{nan_unknown} unknown entries have a NaN loss (non-finite logits); the large-loss "
                         "selection is undefined. Check the learning rate / mixed precision settings")
    if target_unknown:
        raise ValueError(f"{target_unknown} unknown entries have a target != 0; the AN target of an unknown label "
                         "is 0 (LL-Cp corrections must be applied by the LabelStore as observed positives)")
    if unknown_full:
        raise ValueError("method 'full' needs complete labels (protocol 'full'), but unknown has True "
                         "entries; use 'iu' to train on the observed labels only")
    if gather_order:
        raise RuntimeError("select_global_topk: ranks disagree or gather_fn does not concatenate in rank order: "
                           "every rank needs the same K and the concatenation must follow rank order")


def _problems(per_entry: torch.Tensor | None, target: torch.Tensor | None, unknown: torch.Tensor, *,
              unknown_full: bool = False, gather_order: torch.Tensor | None = None) -> torch.Tensor:
    """``LossOutput.problems`` of a batch, computed on the device (no host sync)."""
    zero = torch.zeros((), dtype=torch.int64, device=unknown.device)
    counts = [zero, zero, unknown.sum() if unknown_full else zero,
              zero if gather_order is None else gather_order.to(torch.int64)]
    if per_entry is not None:
        counts[0] = (unknown & torch.isnan(per_entry)).sum()
        counts[1] = (unknown & (target != 0)).sum()
    return torch.stack(counts)


def _count(value: int, device: torch.device) -> torch.Tensor:
    """A host int as a 0-d int64 tensor on ``device``, made there (a fill, not a copy from the host)."""
    return torch.full((), value, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------------------
# schedules (functions of the 1-based epoch)


def _check_epoch(epoch: object) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epoch must be an int >= 1 (1-based, as in the paper), got {epoch!r}")
    return epoch


def _check_topk_method(cfg: LossConfig, what: str) -> None:
    if cfg.method not in TOPK_METHODS:
        raise ValueError(f"{what} is defined for {sorted(TOPK_METHODS)}, not {cfg.method!r}")


def modification_rate(epoch: int, cfg: LossConfig) -> Fraction:
    """Exact fraction of the B*K entries that LL-R/Ct/Cp modify in ``epoch`` (1-based); 0 in epoch 1."""
    epoch = _check_epoch(epoch)
    _check_topk_method(cfg, "modification_rate")
    if epoch == 1:
        return Fraction(0)
    steps = 1 if cfg.method == "ll_cp" else epoch - 1
    return steps * _exact(cfg.delta_rel) / 100


def num_to_modify(num_entries: int, epoch: int, cfg: LossConfig) -> int:
    """The k of LL-R/Ct/Cp for a batch of ``num_entries`` = B*K entries, under ``cfg.ll_selection``, before
    any cap (compute_loss caps it at B*K, and ``exact_k`` at the number of unknown entries).

    ``exact_k``: ``ceil(num_entries * rate)`` in exact rational arithmetic. ``official``: the official code's
    floating-point k (``_official_k``), which can be one more: with delta_rel = 0.2 at epoch 4 and
    B*K = 1000 the exact k is 6, the official float k 7.
    """
    if isinstance(num_entries, bool) or not isinstance(num_entries, int) or num_entries < 0:
        raise ValueError(f"num_entries must be an int >= 0, got {num_entries!r}")
    if cfg.ll_selection == "official":
        _check_topk_method(cfg, "num_to_modify")
        return _official_k(num_entries, _check_epoch(epoch), cfg)
    return math.ceil(num_entries * modification_rate(epoch, cfg))


def _official_k(num_entries: int, epoch: int, cfg: LossConfig) -> int:
    """The official code's k, step by step in its float arithmetic (snucml/LargeLossMatters ``config.py``,
    ``train.py``, ``losses.py`` at its first code commit): ``delta_rel`` is divided by 100 once, ``rate_left``
    (the share of entries left alone) starts at 1 and loses that float after every epoch, and a ``rate_left``
    of exactly 0 disables the modification."""
    step = cfg.delta_rel / 100
    rate_left: float = 1
    for _ in range(epoch - 1):
        rate_left -= step
    if rate_left == 0:
        return 0
    k = math.ceil(num_entries * (1 - rate_left))
    if k != 0 and cfg.method == "ll_cp":
        k = math.ceil(num_entries * step)
    return k


def abs_threshold(epoch: int, cfg: LossConfig) -> float:
    """``R(t) = r0 - t * delta_abs`` for the absolute variants, t the 1-based epoch (exact decimal arithmetic)."""
    epoch = _check_epoch(epoch)
    if cfg.method not in _ABS_METHODS:
        raise ValueError(f"abs_threshold is defined for {sorted(_ABS_METHODS)}, not {cfg.method!r}")
    assert cfg.r0 is not None and cfg.delta_abs is not None  # guaranteed by LossConfig.__post_init__
    return float(_exact(cfg.r0) - epoch * _exact(cfg.delta_abs))


def gr_schedule(epoch: int, cfg: LossConfig) -> tuple[float, float, float, float]:
    """GR-Loss's (w, b, mu, sigma) in ``epoch`` (1-based), as Chen et al.'s training script computes them.

    With T = gr_epochs and n = gr_linear_init: ``w = w0 + (w_end - w0) * max(t - n - 1, 0) / (T - n)``, b the
    same; ``mu = mu0 + (mu_end - mu0) * max(t - n, 0) / (T - n)``, sigma the same (k(p) lags one epoch behind
    v(p) in their script, and neither reaches its end value within T epochs). Float64, as their script.
    """
    epoch = _check_epoch(epoch)
    if cfg.method != "gr_loss":
        raise ValueError(f"gr_schedule is defined for gr_loss, not {cfg.method!r}")
    assert cfg.gr_epochs is not None  # guaranteed by LossConfig.__post_init__
    n = cfg.gr_linear_init or 0
    span = cfg.gr_epochs - n
    k_step, v_step = max(epoch - n - 1, 0) / span, max(epoch - n, 0) / span
    return (cfg.gr_w + (cfg.gr_w_end - cfg.gr_w) * k_step, cfg.gr_b + (cfg.gr_b_end - cfg.gr_b) * k_step,
            cfg.gr_mu + (cfg.gr_mu_end - cfg.gr_mu) * v_step,
            cfg.gr_sigma + (cfg.gr_sigma_end - cfg.gr_sigma) * v_step)


def pbce_normalisation(known_fraction: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Partial-BCE's ``g(p) = pbce_alpha * p ** pbce_gamma + pbce_beta`` of the per-image known-label fraction."""
    return cfg.pbce_alpha * known_fraction ** cfg.pbce_gamma + cfg.pbce_beta


# ---------------------------------------------------------------------------------------------------------
# selection of the entries to modify: exact top-k (``exact_k``) and the official threshold (``official``)


def _topk_positional(values: torch.Tensor, k: int, count: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``count`` largest entries of 1-D ``values`` (``count``: a 0-d integer tensor <= ``k``, on
    any device; None: ``k``); ties at the boundary go to lower positions. Entries equal to -inf never win
    (callers mask the ineligible ones with -inf): asking for more than the eligible entries gives all of them.

    Without a host sync: one ``torch.topk`` of the static ``k`` gives the ``count``-th largest value (no full
    sort; sorted only when ``count`` is given), then elementwise comparisons and one integer prefix sum resolve
    the boundary ties exactly.
    """
    selected = torch.zeros_like(values, dtype=torch.bool)
    k = min(k, values.numel())
    if k == 0:
        return selected
    if count is None:
        # The k-th largest value is unique whatever order topk uses among equal values.
        kth, count = torch.topk(values, k, sorted=False).values.amin(), k
    else:
        top = torch.topk(values, k, sorted=True).values
        kth = top.gather(0, (count.to(torch.int64) - 1).clamp(0, k - 1).reshape(1)).squeeze(0)
    above = values > kth
    # A k-th value of -inf: fewer than count entries are eligible, and all of them are above it.
    at = (values == kth) & (kth > -math.inf)
    # Entries equal to the k-th value are admitted by position: the first (count - #above) of them
    # (count 0: the k-th value is the largest, nothing is above it and no tie is admitted).
    need = count - above.sum()
    prefix_dtype = torch.int32 if values.numel() < 2**31 else torch.int64
    order_among_ties = torch.cumsum(at.to(prefix_dtype), dim=0)
    return above | (at & (order_among_ties <= need))


def _masked_flat(losses: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
    return torch.where(unknown, losses, torch.full_like(losses, -math.inf)).reshape(-1)


def select_topk(losses: torch.Tensor, unknown: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[B, K]`` mask of the ``min(k, #unknown)`` unknown entries with the largest loss.

    Ties: lower flat index ``b*K + c`` first (see the module docstring). ``losses`` is read without gradient.
    """
    _check_pair(losses, unknown, "losses")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    with torch.no_grad():
        return _topk_positional(_masked_flat(losses.detach(), unknown), k).view(unknown.shape)


def _above_threshold(losses: torch.Tensor, unknown: torch.Tensor,
                     kth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official rule's two sets for the threshold ``kth``: unknown entries with loss >= kth (modified in the
    step, ties included) and > kth (LL-Cp's permanent corrections)."""
    kth = kth.to(losses.dtype)  # a value of losses (or 0), exact in their dtype
    return unknown & (losses >= kth), unknown & (losses > kth)


def select_official(losses: torch.Tensor, unknown: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official rule on one batch: bool ``[B, K]`` masks ``(modified, corrections)``.

    The threshold is the k-th largest value of ``losses`` with every non-unknown entry set to 0 (k capped at
    B*K), as in the official code; ``modified`` = unknown entries >= it, ``corrections`` = unknown entries > it.
    k = 0 selects nothing. ``losses`` is read without gradient.
    """
    _check_pair(losses, unknown, "losses")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    k = min(k, unknown.numel())
    if k == 0:
        return torch.zeros_like(unknown), torch.zeros_like(unknown)
    with torch.no_grad():
        detached = losses.detach()
        masked = torch.where(unknown, detached, torch.zeros_like(detached)).reshape(-1)
        return _above_threshold(detached, unknown, torch.topk(masked, k, sorted=False).values.amin())


def select_global_topk(losses: torch.Tensor, unknown: torch.Tensor, k: int, gather_fn: GatherFn,
                       rank: int) -> torch.Tensor:
    """This rank's share of the top-k over the batch concatenated from all ranks.

    ``losses``/``unknown`` are this rank's ``[B, K]``; ``k`` is the global count (capped here at the global
    number of unknown entries); ``gather_fn`` concatenates a 1-D tensor over ranks in rank order (e.g.
    ``accelerator.gather``); every rank must call this collectively with the same B, K and k.
    Returns the bool ``[B, K]`` mask of the winners this rank owns. The result equals ``select_topk`` on
    the concatenated batch, tie rule included (global flat index ``rank*B*K + b*K + c``).
    """
    modified, _, _, gather_order = _global_topk(losses, unknown, k, None, gather_fn, rank)
    raise_problems(_problems(None, None, unknown, gather_order=gather_order))
    return modified


@functools.lru_cache(maxsize=16)
def _k_table(cfg: LossConfig, epoch: int, classes: int, max_rows: int, device: torch.device) -> torch.Tensor:
    """int64 [max_rows + 1] on ``device``: entry r is the capped k of a global batch of r rows,
    ``min(num_to_modify(r*K), r*K)``: the k of any batch up to ``max_rows`` rows, found on the device without a
    host sync (made once per epoch and process, with ``num_to_modify``'s own arithmetic)."""
    table = [min(num_to_modify(r * classes, epoch, cfg), r * classes) for r in range(max_rows + 1)]
    return torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)


def _global_topk(losses: torch.Tensor, unknown: torch.Tensor, width: int, k_table: torch.Tensor | None,
                 gather_fn: GatherFn, rank: int, world_size: int | None = None,
                 selection: Selection = "exact_k") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's ``(modified, corrections)`` under ``selection`` over the batch concatenated from all ranks,
    the k of the selection (0-d int64: ``min(k, global #unknown)`` under ``exact_k``, then corrections =
    modified; ``k`` under ``official``) and the number of gathered rows out of rank order (0-d; ``raise_problems``'s
    ``gather_order``), all without a host sync.

    ``k``: ``width`` when ``k_table`` is None, else ``k_table[global number of rows]`` (``_k_table``; every
    entry <= ``width``). ``width`` is the same host int on every rank.

    Each rank contributes only its local top-``width`` candidates: under one total order a global winner is
    always among its own rank's top-k, and so is the global k-th largest value, so the gather moves
    2 * width + 3 numbers per rank instead of B*K.
    """
    _check_pair(losses, unknown, "losses")
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"k must be an int >= 0, got {width!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")
    batch, classes = unknown.shape
    n = batch * classes
    device = unknown.device
    with torch.no_grad():
        flat = _masked_flat(losses.detach(), unknown)
        # Candidates per rank: `width` slots on every rank (ranks' batches may differ in size, e.g. by one
        # sample at the end of an epoch, so min(k, B*K) would differ); slots beyond the local candidates are
        # padding (index -1, value -inf). The local candidates in ascending local flat index.
        local = _topk_positional(flat, width)
        index = torch.nonzero_static(local, size=width, fill_value=-1).squeeze(1)
        cand_val = torch.where(index >= 0, flat[index.clamp(min=0)], -math.inf).to(torch.float64)
        # One packed float64 row per rank: float32 losses and indices below 2**53 are exact in float64.
        header = torch.tensor([batch, classes, rank], dtype=torch.float64).to(device, non_blocking=True)
        rows = gather_fn(torch.cat([header, cand_val, index.to(torch.float64)]))
        row_len = 3 + 2 * width
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.numel() % row_len != 0:
            raise RuntimeError(f"select_global_topk: gather_fn returned {tuple(getattr(rows, 'shape', ()))}; "
                               f"expected a 1-D concatenation of rows of length {row_len}, one per rank")
        rows = rows.view(-1, row_len)
        world = rows.shape[0]
        if world_size is not None and world != world_size:
            raise RuntimeError(f"select_global_topk: gather_fn returned {world} rows but world_size is "
                               f"{world_size}; k was computed for {world_size} ranks")
        ranks = torch.arange(world, dtype=torch.float64, device=device)
        gather_order = ((rows[:, 1] != classes) | (rows[:, 2] != ranks)).sum()
        all_val = rows[:, 3:3 + width].reshape(-1)
        if k_table is None:
            k = _count(width, device)
        else:
            global_rows = rows[:, 0].sum().to(torch.int64).clamp(0, k_table.numel() - 1)
            k = k_table.gather(0, global_rows.reshape(1)).squeeze(0)  # a kernel, not an index read by the host
        if width == 0:
            return torch.zeros_like(unknown), torch.zeros_like(unknown), k, gather_order
        if selection == "official":
            # The k-th largest masked loss of the concatenated batch: among the candidates, or, when the
            # batch holds fewer than k unknown entries (the k-th candidate is padding), one of the zeros of
            # its other entries. k = 0 modifies nothing.
            top = torch.topk(all_val, width, sorted=True).values
            kth = top.gather(0, (k - 1).clamp(0, width - 1).reshape(1)).squeeze(0)
            kth = torch.where(kth == -math.inf, 0.0, kth)
            modified, corrections = _above_threshold(losses.detach(), unknown, kth)
            return modified & (k > 0), corrections & (k > 0), k, gather_order
        # Capping at the number of valid candidates is capping at the global number of unknowns: a rank
        # with fewer unknowns than `width` contributes all of them.
        k_eff = torch.minimum(k, (rows[:, 3 + width:] >= 0).sum())
        # Candidates are laid out rank by rank in ascending local index, i.e. in ascending global index, so
        # "lower position first" in _topk_positional is "lower global flat index first"; padding never wins.
        winners = _topk_positional(all_val, width, k_eff).view(world, width)[rank]
        # this rank's winners back to its [B, K] mask; the others write to a spare last slot
        mask = torch.zeros(n + 1, dtype=torch.bool, device=device)
        mask[torch.where(winners, index, n)] = True
        mask = mask[:n].view(batch, classes)
    return mask, mask, k_eff, gather_order


# ---------------------------------------------------------------------------------------------------------
# the loss


def _check_pair(values: torch.Tensor, unknown: torch.Tensor, name: str) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of shape [B, K], got "
                         f"{getattr(values, 'dtype', type(values).__name__)} {tuple(getattr(values, 'shape', ()))}")
    if not isinstance(unknown, torch.Tensor) or unknown.dtype != torch.bool or unknown.shape != values.shape:
        raise ValueError(f"unknown must be a bool tensor of shape {tuple(values.shape)}, got "
                         f"{getattr(unknown, 'dtype', type(unknown).__name__)} {tuple(getattr(unknown, 'shape', ()))}")
    if unknown.device != values.device:
        raise ValueError(f"unknown is on {unknown.device} but {name} on {values.device}")


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, unknown: torch.Tensor) -> None:
    _check_pair(logits, unknown, "logits")
    if not isinstance(target, torch.Tensor) or target.shape != logits.shape or not target.is_floating_point():
        raise ValueError(
            f"target must be a float tensor of shape {tuple(logits.shape)} (AN target: 1.0 for observed "
            f"positives, 0.0 otherwise; from the int8 +1/-1/0 encoding use (labels == 1).float()), got "
            f"{getattr(target, 'dtype', type(target).__name__)} {tuple(getattr(target, 'shape', ()))}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits on {logits.device}")
    if logits.numel() == 0:
        raise ValueError(f"empty batch: logits have shape {tuple(logits.shape)}")


def _bce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(x, y, reduction="none")


def _process_group(gather_fn: GatherFn | None, rank: int | None,
                   world_size: int | None) -> tuple[GatherFn | None, int, int]:
    """Resolve (gather_fn, rank, world_size) for the global top-k; rank/world default to torch.distributed."""
    dist_ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if dist_ready else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist_ready else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"global top-k: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if gather_fn is None and world_size > 1:
        raise ValueError(f"LossConfig.global_topk=True in a {world_size}-process run needs gather_fn "
                         "(e.g. accelerator.gather); without it the top-k would silently be per rank")
    return gather_fn, rank, world_size


_FOLLOW_UP_METHODS = frozenset({"em", "em_apl", "gr_loss", "role", "partial_bce"})
#: -log(p + eps) of the authors' code: Zhou et al. (EM, APL) and Cole et al. (ROLE) 1e-5, Chen et al. (GR) 1e-7
_EPS_ZHOU_COLE = 1e-5
_EPS_GR = 1e-7


def _neg_log(p: torch.Tensor, eps: float) -> torch.Tensor:
    return -torch.log(p + eps)


def _check_aux(name: str, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != x.shape or not value.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape {tuple(x.shape)}, got "
                         f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but logits on {x.device}")
    return value.to(x.dtype)


def _follow_up_loss(x: torch.Tensor, y: torch.Tensor, unknown: torch.Tensor, epoch: int, cfg: LossConfig,
                    estimates: torch.Tensor | None, pseudo: torch.Tensor | None) -> torch.Tensor:
    """The scalar loss of em, em_apl, gr_loss, role and partial_bce (module docstring)."""
    method = cfg.method
    batch, classes = x.shape
    n = batch * classes
    positive = ~unknown & (y > 0.5)  # observed positives and LL-Cp corrections
    negative = ~unknown & ~positive  # observed negatives (partial-label protocols)
    if method == "partial_bce":
        known_sum = _bce(x, y).masked_fill(unknown, 0.0).sum(dim=1)
        known_fraction = (~unknown).sum(dim=1).to(x.dtype) / classes
        return (pbce_normalisation(known_fraction, cfg) / classes * known_sum).mean()
    p = torch.sigmoid(x)
    if method == "gr_loss":
        w, b, mu, sigma = gr_schedule(epoch, cfg)
        with torch.no_grad():
            k = 1 / (1 + torch.exp(-(w * p + b)))
            v = torch.exp(-0.5 * ((p - mu) / sigma) ** 2)
        # each branch sees p only where it is used, so that a masked-out branch's infinite derivative
        # (p^q2 at p = 0, (1-p)^q3 at p = 1 with q3 < 1) cannot turn into a NaN gradient
        as_positive = (1 - torch.pow(torch.where(unknown, p, 0.5), cfg.gr_q2)) / cfg.gr_q2
        as_negative = (1 - torch.pow(1 - torch.where(positive, 0.5, p), cfg.gr_q3)) / cfg.gr_q3
        per_entry = torch.where(positive, _neg_log(p, _EPS_GR),
                                torch.where(negative, as_negative, v * (k * as_positive + (1 - k) * as_negative)))
        return per_entry.mean()
    log_p, log_q = _neg_log(p, _EPS_ZHOU_COLE), _neg_log(1 - p, _EPS_ZHOU_COLE)  # -log p, -log(1 - p)
    observed = torch.where(positive, log_p, 0.0) + torch.where(negative, log_q, 0.0)
    if method == "role":
        if estimates is None:
            raise ValueError("method 'role' needs estimates: the label estimator's probabilities for the batch "
                             "(train/methods.py RoleState)")
        assert cfg.epr_num_pos is not None  # guaranteed by LossConfig.__post_init__
        e = _check_aux("estimates", estimates, x)
        e_log_p, e_log_q = _neg_log(e, _EPS_ZHOU_COLE), _neg_log(1 - e, _EPS_ZHOU_COLE)
        e_observed = torch.where(positive, e_log_p, 0.0) + torch.where(negative, e_log_q, 0.0)
        e_fixed, p_fixed = e.detach(), p.detach()
        cross_classifier = e_fixed * log_p + (1 - e_fixed) * log_q
        cross_estimator = p_fixed * e_log_p + (1 - p_fixed) * e_log_q
        reg = ((p.sum(dim=1).mean() - cfg.epr_num_pos) ** 2 + (e.sum(dim=1).mean() - cfg.epr_num_pos) ** 2)
        per_entry = 0.5 * (observed + e_observed) + 0.5 * (cross_classifier + cross_estimator)
        return per_entry.sum() / n + 0.5 * reg / classes**2
    # em, em_apl: the unobserved entries maximise their entropy, unless pseudo-labelled
    assert cfg.em_alpha is not None  # guaranteed by LossConfig.__post_init__
    labelled = torch.zeros_like(unknown)
    if method == "em_apl" and pseudo is not None:
        pseudo = _check_aux("pseudo", pseudo, x)
        labelled = unknown & ~torch.isnan(pseudo)
    neg_entropy = -(p * log_p + (1 - p) * log_q)
    per_entry = observed + torch.where(unknown & ~labelled, cfg.em_alpha * neg_entropy, 0.0)
    if method == "em_apl" and pseudo is not None:
        # added whether or not an entry is labelled (no host sync to ask): + 0.0 leaves every sum unchanged
        assert cfg.apl_beta is not None
        soft = torch.nan_to_num(pseudo, nan=0.0)
        per_entry = per_entry + torch.where(labelled, cfg.apl_beta * (soft * log_p + (1 - soft) * log_q), 0.0)
    return per_entry.sum() / n


def compute_loss(logits: torch.Tensor, target: torch.Tensor, unknown: torch.Tensor, epoch: int,
                 cfg: LossConfig, *, gather_fn: GatherFn | None = None, rank: int | None = None,
                 world_size: int | None = None, estimates: torch.Tensor | None = None,
                 pseudo: torch.Tensor | None = None, check: bool = True,
                 max_batch_size: int | None = None) -> LossOutput:
    """Loss of one mini-batch under ``cfg.method``; see the module docstring for each method.

    ``epoch`` is 1-based. Inputs are never modified. ``gather_fn``, ``rank`` and ``world_size`` are used only
    with ``cfg.global_topk``: then the call is collective (every rank makes it with the same K and epoch);
    ``rank``/``world_size`` default to torch.distributed's (0 and 1 when it is not initialised), and a
    single process needs no ``gather_fn`` (the global top-k is the per-batch one). The state of the
    follow-up methods comes in explicitly: ``estimates`` (``role``: the label estimator's probabilities for
    the batch, float [B, K] with gradient) and ``pseudo`` (``em_apl``: soft pseudo-labels, float [B, K],
    NaN where an entry has none; None: none yet).

    Host syncs: none, unless asked for. ``check`` (the default) raises at once on invalid inputs
    (``raise_problems``: one host sync); the trainer passes False and checks the running sum of
    ``LossOutput.problems`` every ``log_every`` steps instead. Under the global top-k with several ranks,
    ``max_batch_size`` (the most rows any rank's batch can have; the trainer's ``batch_size``) lets the k of the
    global batch be found on the device; without it the ranks' batch sizes are gathered to the host (one sync).
    """
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    epoch = _check_epoch(epoch)
    _check_inputs(logits, target, unknown)
    out = _loss(logits, target, unknown, epoch, cfg, gather_fn, rank, world_size, estimates, pseudo, max_batch_size)
    if check:
        raise_problems(out.problems)
    return out


def _loss(logits: torch.Tensor, target: torch.Tensor, unknown: torch.Tensor, epoch: int, cfg: LossConfig,
          gather_fn: GatherFn | None, rank: int | None, world_size: int | None, estimates: torch.Tensor | None,
          pseudo: torch.Tensor | None, max_batch_size: int | None) -> LossOutput:
    """``compute_loss`` after its argument checks, without a host sync (see there)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    y = target.to(x.dtype)
    batch, classes = x.shape
    n = batch * classes
    method = cfg.method
    none_modified = torch.zeros_like(unknown)
    zero = _count(0, x.device)

    def unmodified(loss: torch.Tensor, problems: torch.Tensor | None = None) -> LossOutput:
        return LossOutput(loss, none_modified, zero, zero, none_modified, problems)

    if method == "full":
        return unmodified(_bce(x, y).mean(), _problems(None, None, unknown, unknown_full=True))
    if method == "an":
        return unmodified(_bce(x, y).mean())
    if method == "iu":
        # Over B*K like every other loss here (Cole et al.): a batch without an observed entry gives 0.
        return unmodified(_bce(x, y).masked_fill(unknown, 0.0).sum() / n)
    if method == "wan":
        if cfg.wan_weight is None and classes < 2:
            raise ValueError("WAN's default weight 1/(K-1) needs K >= 2; set LossConfig.wan_weight")
        weight = cfg.wan_weight if cfg.wan_weight is not None else 1.0 / (classes - 1)
        per_entry = _bce(x, y)
        weighted = torch.where(unknown, per_entry * weight, per_entry)
        return unmodified(weighted.sum() / n)
    if method == "lsan":
        smoothed = y * (1.0 - 2.0 * cfg.ls_coef) + cfg.ls_coef  # 1 -> 1 - ls, 0 -> ls
        return unmodified(_bce(x, smoothed).mean())
    if method == "epr":
        assert cfg.epr_num_pos is not None  # guaranteed by LossConfig.__post_init__
        observed_sum = _bce(x, y).masked_fill(unknown, 0.0).sum()
        expected_pos = torch.sigmoid(x).sum(dim=1).mean()
        reg = (expected_pos - cfg.epr_num_pos) ** 2 / classes**2
        return unmodified(observed_sum / n + reg)
    if method in _FOLLOW_UP_METHODS:
        return unmodified(_follow_up_loss(x, y, unknown, epoch, cfg, estimates, pseudo))

    # Large-loss methods. The selection uses the loss against the AN target, without gradient.
    per_entry = _bce(x, y)
    corrections = none_modified
    gather_order = None
    if method in TOPK_METHODS:
        gather, rank, world_size = (_process_group(gather_fn, rank, world_size) if cfg.global_topk
                                    else (None, 0, 1))
        detached = per_entry.detach()
        if gather is not None:
            # the global batch: ranks may hold batches that differ in size (one sample at an epoch's end)
            if max_batch_size is None:  # its size through the host
                total = int(gather(torch.tensor([float(n)], dtype=torch.float64, device=x.device)).sum())
                width, k_table = min(num_to_modify(total, epoch, cfg), total), None
            else:  # its k looked up on the device; every rank takes the largest k as its number of candidates
                k_table = _k_table(cfg, epoch, classes, world_size * max_batch_size, x.device)
                width = min(num_to_modify(world_size * max_batch_size * classes, epoch, cfg),
                            world_size * max_batch_size * classes)
            if width == 0:  # epoch 1, delta_rel == 0, or (official) a float rate_left of exactly 0
                return unmodified(per_entry.mean())
            modified, corrections, k, gather_order = _global_topk(detached, unknown, width, k_table, gather, rank,
                                                                  world_size, cfg.ll_selection)
            num_modified = modified.sum()
        else:
            k_raw = min(num_to_modify(n, epoch, cfg), n)
            if k_raw == 0:
                return unmodified(per_entry.mean())
            if cfg.ll_selection == "official":
                modified, corrections = select_official(detached, unknown, k_raw)
                k, num_modified = _count(k_raw, x.device), modified.sum()
            else:
                with torch.no_grad():
                    modified = _topk_positional(_masked_flat(detached, unknown), k_raw).view(unknown.shape)
                corrections = modified
                k = num_modified = unknown.sum().clamp(max=k_raw)
        if method != "ll_cp":
            corrections = none_modified
    else:  # absolute variants
        if epoch == 1 and cfg.abs_skip_first_epoch:
            return unmodified(per_entry.mean())
        threshold = abs_threshold(epoch, cfg)
        detached = per_entry.detach()
        modified = unknown & (detached > threshold)  # strict, as in the paper's "l_i > R(t)"
        k = num_modified = modified.sum()

    if method in _REJECT_METHODS:
        loss = per_entry.masked_fill(modified, 0.0).mean()
    else:
        # Temporary correction: the selected (unknown, target 0) entries are scored against target 1.
        loss = _bce(x, torch.where(modified, torch.ones_like(y), y)).mean()
    return LossOutput(loss, modified, num_modified, k, corrections,
                      _problems(detached, y, unknown, gather_order=gather_order))
