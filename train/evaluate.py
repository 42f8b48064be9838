"""Validation and test scoring under Accelerate: every sample scored exactly once across ranks, then mAP.

The model is whatever the trainer trains (a MultiLabelNet on images, or a linear head on cached features):
``model(inputs)`` gives logits for a batch of the loader's ``(inputs, sample ids)``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..eval import metrics
from ..shards.format import UNLISTED_UNKNOWN
from ..shards.labelstore import LabelStore


def labels_as_int8(target: torch.Tensor, unknown: torch.Tensor) -> np.ndarray:
    """(AN target, unknown mask) -> +1 / -1 / 0 for evaluation."""
    lab = np.where(target.numpy() > 0.5, 1, -1).astype(np.int8)
    lab[unknown.numpy()] = 0
    return lab


@torch.no_grad()
def predict(model, loader, accelerator, expected: np.ndarray, sparse_store: LabelStore | None = None):
    """Score every sample in ``expected`` exactly once across ranks and workers (checked with sample ids).

    Returns (sample ids sorted, scores): dense scores [N, K] gathered from all ranks; or, with
    ``sparse_store`` (partially labelled sets: OpenImages test has ~13 known of 5,000 labels per image),
    only the scores of the known entries, kept per rank and gathered once at the end as flat arrays
    (class ids, scores, is_positive), so the N x K matrix (2.5 GB for OpenImages test) never exists.
    """
    model.eval()
    all_ids, all_scores, known = [], [], []
    for images, ids in loader:
        images = images.to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        scores = torch.sigmoid(logits.float())
        if sparse_store is not None:
            rows, cols, is_pos = sparse_store.known_entries(ids.numpy())
            vals = scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)]
            known.append((cols.astype(np.int32), vals.cpu().numpy(), is_pos))
        ids = ids.to(accelerator.device)
        # ranks may hold batches that differ by one sample: pad, gather, drop the padding (id -1)
        ids = accelerator.pad_across_processes(ids, dim=0, pad_index=-1)
        if sparse_store is None:
            scores = accelerator.pad_across_processes(scores, dim=0, pad_index=0)
            ids, scores = accelerator.gather((ids, scores))
            all_scores.append(scores[ids >= 0].cpu())
        else:
            ids = accelerator.gather(ids)
        all_ids.append(ids[ids >= 0].cpu())
    ids = torch.cat(all_ids).numpy() if all_ids else np.zeros(0, dtype=np.int64)
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
        raise RuntimeError(f"evaluation saw {len(ids) - len(uniq)} samples twice across ranks/workers")
    if not np.array_equal(uniq, np.sort(expected)):
        missing = np.setdiff1d(expected, uniq)
        raise RuntimeError(
            f"evaluation scored {len(uniq)} samples, expected {len(expected)} (missing e.g. {missing[:5]})"
        )
    if sparse_store is not None:
        local = tuple(np.concatenate(parts) if known else np.zeros(0, dt)
                      for parts, dt in zip(zip(*known) if known else ((), (), ()), (np.int32, np.float32, bool)))
        from accelerate.utils import gather_object

        gathered = gather_object([local])  # one (cols, scores, is_pos) per rank, in rank order
        flat = tuple(np.concatenate([g[i] for g in gathered]) for i in range(3))
        return uniq, flat
    scores = torch.cat(all_scores).numpy() if all_scores else np.zeros((0, 0), dtype=np.float32)
    return uniq, scores[first]


def evaluate(model, loader, store: LabelStore, accelerator, expected: np.ndarray, convention: str):
    if store.unlisted == UNLISTED_UNKNOWN:
        # partial labels: AP from the known entries only (eval/metrics.py's flat path)
        ids, (cols, vals, is_pos) = predict(model, loader, accelerator, expected, sparse_store=store)
        return metrics.mean_average_precision_flat(cols, vals, is_pos, store.num_classes, convention), ids, None
    ids, scores = predict(model, loader, accelerator, expected)
    target, unknown = store.targets(ids)
    res = metrics.mean_average_precision(scores, labels_as_int8(target, unknown), convention=convention)
    return res, ids, scores
