"""Label protocols: which of the truth labels training may observe, and the 80/20 train/val cut.

A protocol maps the truth ``SparseLabels`` of a whole split file to observed ``SparseLabels`` (same rows,
same classes), sparse throughout. Protocols are applied to every row of the official split file, before
the train/val cut, as Cole et al. do: the labels a sample gets never depend on which subset it falls in.

- ``full``: observed = truth of a completely annotated split; every unlisted entry is a negative (kept
  implicit, nothing is unknown). Refused for ``unlisted = unknown`` files, where it would turn unknowns
  into negatives: use ``given``.
- ``single_positive``: Cole et al.'s generator, reproduced call for call (see ``single_positive``).
- ``partial:<fraction>``: every known (sample, class) entry stays observed independently with
  probability ``fraction`` (see ``partial``); the rest becomes unknown.
- ``given``: observed = truth, ``unlisted`` unchanged (OpenImages: unlisted stays unknown).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .format import UNLISTED_NEGATIVE, UNLISTED_UNKNOWN
from .labels import SparseLabels, canonical_rows, csr_offsets, row_ids

#: Cole et al.'s seed, used for both the observation generator and the train/val cut
DEFAULT_SEED = 1200
#: protocol names (``Protocol.name``); ``partial`` is written ``partial:<fraction>``
FULL, SINGLE_POSITIVE, PARTIAL, GIVEN = "full", "single_positive", "partial", "given"
PROTOCOL_FORMS = (FULL, SINGLE_POSITIVE, f"{PARTIAL}:<fraction>", GIVEN)


@dataclass(frozen=True)
class Protocol:
    name: str  # FULL | SINGLE_POSITIVE | PARTIAL | GIVEN
    fraction: float | None = None  # partial only, 0 < fraction <= 1

    def __str__(self) -> str:
        return f"{PARTIAL}:{self.fraction:g}" if self.name == PARTIAL else self.name


def parse_protocol(text: str | Protocol) -> Protocol:
    """Parse "full", "single_positive", "partial:<fraction>" (0 < fraction <= 1) or "given"."""
    if isinstance(text, Protocol):
        return text
    if not isinstance(text, str):
        raise TypeError(f"protocol must be a string such as 'partial:0.1', got {type(text).__name__}")
    s = text.strip()
    if s in (FULL, SINGLE_POSITIVE, GIVEN):
        return Protocol(s)
    if s.startswith(PARTIAL):
        head, sep, tail = s.partition(":")
        if head != PARTIAL or not sep or not tail.strip():
            raise ValueError(f"protocol {text!r}: write the observed fraction after a colon, e.g. 'partial:0.1'")
        try:
            fraction = float(tail)
        except ValueError:
            raise ValueError(f"protocol {text!r}: fraction {tail!r} is not a number; e.g. 'partial:0.1'") from None
        if not (0.0 < fraction <= 1.0) or math.isnan(fraction):
            raise ValueError(f"protocol {text!r}: fraction must be in (0, 1], got {fraction}")
        return Protocol(PARTIAL, fraction)
    raise ValueError(f"unknown protocol {text!r}; expected one of {', '.join(PROTOCOL_FORMS)}")


def observe(truth: SparseLabels, protocol: str | Protocol, seed: int = DEFAULT_SEED) -> SparseLabels:
    """Observed labels of a whole split file under ``protocol``; ``seed`` drives the random protocols."""
    p = parse_protocol(protocol)
    if p.name == GIVEN:
        return truth
    if p.name == FULL:
        if truth.unlisted != UNLISTED_NEGATIVE:
            raise ValueError(
                f"{truth.source}: protocol 'full' needs complete labels but this file has unlisted=unknown "
                "(partial annotation); use protocol 'given'"
            )
        return truth
    if p.name == SINGLE_POSITIVE:
        return single_positive(truth, seed)
    assert p.name == PARTIAL, p
    return partial(truth, p.fraction, seed)


def single_positive(truth: SparseLabels, seed: int = DEFAULT_SEED) -> SparseLabels:
    """One random observed positive per sample, every other entry unknown: Cole et al.'s generator.

    Their reference code, for the dense 0/1 truth matrix of the whole official split file with
    ``rng = np.random.RandomState(seed)`` created afresh, does for each row in file (= sample id) order::

        idx = np.nonzero(row == 1)[0]; rng.shuffle(idx); positives = idx[:1]
        idx = np.nonzero(row == 0)[0]; rng.shuffle(idx); negatives = idx[:0]   # none kept

    The second shuffle keeps nothing but consumes random state, so it is mirrored: a legacy
    ``RandomState.shuffle`` of a 1-D array draws ``random_interval(i)`` for i = n-1 .. 1 whatever the
    values are, so shuffling a scratch array of the same length (K minus the number of positives) leaves
    the generator exactly where the reference leaves it, without building the dense row. The loop over
    rows is in Python (one RNG call sequence per row, as in the reference): about 3 us per row.
    A row without positives gets none (the reference keeps ``idx[:1]`` of an empty array).
    """
    if truth.unlisted != UNLISTED_NEGATIVE:
        raise ValueError(
            f"{truth.source}: single_positive draws from complete labels (Cole et al.), but this file has "
            "unlisted=unknown; use protocol 'given' or 'partial:<fraction>'"
        )
    k = truth.num_classes
    # the reference's np.nonzero gives the positives sorted ascending, without duplicates
    offsets, values = canonical_rows(truth.pos_offsets, truth.pos_values, k)
    offsets = np.asarray(offsets, dtype=np.int64).tolist()
    values = values.astype(np.int64)
    rng = np.random.RandomState(seed)
    scratch = np.empty(k, dtype=np.int64)
    n = truth.num_samples
    chosen = np.empty(n, dtype=np.uint16)
    has = np.zeros(n, dtype=bool)
    for i in range(n):
        a, b = offsets[i], offsets[i + 1]
        idx = values[a:b].copy()
        rng.shuffle(idx)
        if b > a:
            chosen[i] = idx[0]
            has[i] = True
        rng.shuffle(scratch[: k - (b - a)])  # the negatives' shuffle: only its length matters
    rows = np.flatnonzero(has)
    empty = np.zeros(n + 1, dtype=np.int64)
    return SparseLabels(
        csr_offsets(rows, n), chosen[rows], empty, np.zeros(0, dtype=np.uint16), k, UNLISTED_UNKNOWN,
        f"{truth.source} [single_positive seed={seed}]",
    )


def partial(truth: SparseLabels, fraction: float, seed: int = DEFAULT_SEED, *,
            chunk_entries: int = 1 << 22) -> SparseLabels:
    """Keep each known truth entry observed independently with probability ``fraction``.

    Rule (deterministic): ``rng = np.random.RandomState(seed)``; walk the known entries in
    (sample, class) order (with ``unlisted = negative`` that is every class of every sample, otherwise the
    listed positives and negatives merged by class) and draw one ``rng.random_sample()`` per entry; the
    entry stays observed, with its truth label, iff the draw is ``< fraction``. Everything else becomes
    unknown. Rows are processed in chunks of about ``chunk_entries`` known entries; the draws are a
    single stream, so the result does not depend on the chunking.
    """
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"partial: fraction must be in (0, 1], got {fraction}")
    k, n = truth.num_classes, truth.num_samples
    rng = np.random.RandomState(seed)
    pos_keys, neg_keys = [], []  # kept entries as sample * K + class, sorted within each chunk
    if truth.unlisted == UNLISTED_NEGATIVE:
        step = max(1, chunk_entries // k)
        for start in range(0, n, step):
            stop = min(n, start + step)
            keep = rng.random_sample((stop - start, k)) < fraction
            is_pos = np.zeros((stop - start, k), dtype=bool)
            a, b = int(truth.pos_offsets[start]), int(truth.pos_offsets[stop])
            is_pos[row_ids(truth.pos_offsets, start, stop) - start, truth.pos_values[a:b]] = True
            flat = np.flatnonzero(keep) + start * k
            kept_pos = is_pos.reshape(-1)[flat - start * k]
            pos_keys.append(flat[kept_pos])
            neg_keys.append(flat[~kept_pos])
    else:
        known = np.diff(truth.pos_offsets).astype(np.int64) + np.diff(truth.neg_offsets).astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(known)])
        start = 0
        while start < n:
            stop = max(start + 1, int(np.searchsorted(cum, cum[start] + chunk_entries, side="right")) - 1)
            stop = min(stop, n)
            pk = _keys(truth.pos_offsets, truth.pos_values, start, stop, k)
            nk = _keys(truth.neg_offsets, truth.neg_values, start, stop, k)
            keys = np.concatenate([pk, nk])
            is_pos = np.concatenate([np.ones(len(pk), dtype=bool), np.zeros(len(nk), dtype=bool)])
            order = np.argsort(keys, kind="stable")
            keys, is_pos = keys[order], is_pos[order]
            keep = rng.random_sample(len(keys)) < fraction
            pos_keys.append(keys[keep & is_pos])
            neg_keys.append(keys[keep & ~is_pos])
            start = stop
    pos_off, pos_val = _csr_from_keys(pos_keys, n, k)
    neg_off, neg_val = _csr_from_keys(neg_keys, n, k)
    source = f"{truth.source} [partial:{fraction:g} seed={seed}]"
    return SparseLabels(pos_off, pos_val, neg_off, neg_val, k, UNLISTED_UNKNOWN, source)


def _keys(offsets: np.ndarray, values: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    a, b = int(offsets[start]), int(offsets[stop])
    return row_ids(offsets, start, stop) * k + values[a:b].astype(np.int64)


def _csr_from_keys(chunks: list[np.ndarray], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return csr_offsets(keys // k, n), (keys % k).astype(np.uint16)


def train_val_split(num_samples: int, val_frac: float = 0.2, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Cole et al.'s cut of the official train split into (train ids, val ids), both sorted int64.

    ``rng = RandomState(seed); n_val = int(np.round(val_frac * N)); perm = rng.permutation(N);
    train = sort(perm[:N - n_val]); val = sort(perm[-n_val:])``. ``perm[N - n_val:]`` is used for the
    val part: equal to ``perm[-n_val:]`` for n_val > 0 and, unlike it, empty for n_val = 0.
    """
    n = int(num_samples)
    if n < 0:
        raise ValueError(f"train_val_split: num_samples must be >= 0, got {num_samples}")
    if not (0.0 <= val_frac < 1.0):
        raise ValueError(f"train_val_split: val_frac must be in [0, 1), got {val_frac}")
    n_val = int(np.round(val_frac * n))
    n_train = n - n_val
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[:n_train]).astype(np.int64), np.sort(perm[n_train:]).astype(np.int64)
