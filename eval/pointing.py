"""Pointing game (paper section 4.3, Table 4): does the class activation map point inside the object?

    python -m largeloss.train.pointing RUN_DIR [RUN_DIR ...] [--data DIR] [--split test] [--overlays N] [--max-images N]

For every test image and every class with at least one box in the image (``meta["boxes"]``, written by the
VOC and COCO adapters; VOC *difficult* and COCO *crowd* boxes count like the others), the class activation
map (CAM, Zhou et al. 2016) of the trained model is

    CAM_c(i, j) = sum_d W[c, d] * F[d, i, j]

with ``F = model.features(image)`` the last convolutional map [D, h, w] and ``W = model.head.weight`` (the
head's bias shifts the map and does not move its maximum). The point of the game:

- the CAM [h, w] is upsampled bilinearly (``align_corners=False``) to the network's input size S x S and
  its maximum taken there (``--mode upsample``, the default; ``--mode grid`` takes the maximum cell of the
  h x w map instead and uses the cell's centre). Ties go to the first position in row-major order;
- that pixel's centre is mapped back to the original image, which the loader squashed to S x S without
  keeping the aspect ratio: ``x = (col + 0.5) * width / S``, ``y = (row + 0.5) * height / S``, in continuous
  pixel coordinates (pixel (c, r) of the original covers [c, c+1) x [r, r+1));
- it is a **hit** when ``xmin <= x <= xmax`` and ``ymin <= y <= ymax`` for some box of that class (boxes as
  stored, absolute pixels), a **miss** otherwise.

Per class the accuracy is hits / (hits + misses) over the images where it has a box; the score of a run
is the mean over the classes that have a box in at least one evaluated image (classes without any are
listed as ``excluded_classes``). Everything is written to ``RUN_DIR/pointing.json`` as fractions in
[0, 1] (``report`` prints percent), with ``--overlays N`` PNGs of the first N evaluated images under
``RUN_DIR/pointing/`` (CAM heat map over the image, the class's boxes, the point: green hit, red miss).

Runs trained on cached features (``train.features``) keep only their head; their CAMs use the frozen
backbone they were trained on (config ``arch`` / ``weights``). Runs that share a frozen backbone and
input size are evaluated in one pass over the images.

This module is the game itself, given feature maps and head weights: the CAMs, the points, hits and
misses per class (``Tally``), the images with boxes of a dataset split and the overlays. Loading the
runs' models and the command line are train/pointing.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("upsample", "grid")


class PointingError(ValueError):
    """A run or dataset the pointing game cannot use; the message names the path and the fix."""


# ------------------------------------------------------------------------------------------- the game


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CAMs [B, K, h, w] from feature maps [B, D, h, w] and head weights [K, D]."""
    if features.dim() != 4 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"class_activation_maps: features {tuple(features.shape)} and weight {tuple(weight.shape)} "
                         "must be [B, D, h, w] and [K, D]")
    return torch.einsum("bdhw,kd->bkhw", features.float(), weight.float())


def argmax_points(cams: torch.Tensor, size: int, mode: str = "upsample") -> np.ndarray:
    """For CAMs [P, h, w]: the maximum as a point (x, y) in the S x S input's continuous pixel
    coordinates, float64 [P, 2] (see the module docstring; ties: first in row-major order)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if cams.dim() != 3:
        raise ValueError(f"argmax_points: expected CAMs [P, h, w], got {tuple(cams.shape)}")
    p, h, w = cams.shape
    if p == 0:
        return np.zeros((0, 2))
    if mode == "upsample":
        maps = F.interpolate(cams[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        rows, cols, scale_x, scale_y = size, size, 1.0, 1.0
    else:
        maps = cams.float()
        rows, cols, scale_x, scale_y = h, w, size / w, size / h
    flat = maps.reshape(p, -1).cpu().numpy()
    idx = np.argmax(flat, axis=1)  # numpy: the first maximum
    r, c = np.divmod(idx, cols)
    assert (r < rows).all()
    return np.stack([(c + 0.5) * scale_x, (r + 0.5) * scale_y], axis=1)


def to_original(points: np.ndarray, size: int, width: float, height: float) -> np.ndarray:
    """Points in the S x S input -> the original width x height image (the loader's squash resize)."""
    pts = np.asarray(points, dtype=np.float64)
    return np.stack([pts[:, 0] * width / size, pts[:, 1] * height / size], axis=1)


def inside_any(x: float, y: float, boxes: list[list[float]]) -> bool:
    """Whether (x, y) lies in some [xmin, ymin, xmax, ymax] box (edges included)."""
    return any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)


def boxes_by_class(meta: dict[str, Any], num_classes: int, where: str) -> dict[int, list[list[float]]]:
    out: dict[int, list[list[float]]] = {}
    for j, b in enumerate(meta.get("boxes") or []):
        c = b.get("class")
        bbox = b.get("bbox")
        if not isinstance(c, int) or not 0 <= c < num_classes or not (isinstance(bbox, list) and len(bbox) == 4):
            raise PointingError(f"{where}: boxes[{j}] = {b!r} is not {{'class': 0..{num_classes - 1}, "
                                "'bbox': [xmin, ymin, xmax, ymax]}}; re-run ingest")
        out.setdefault(c, []).append([float(v) for v in bbox])
    return out


@dataclass
class Tally:
    """Hits and misses per class of one run."""

    num_classes: int
    hits: np.ndarray = field(init=False)
    misses: np.ndarray = field(init=False)
    images: int = 0

    def __post_init__(self) -> None:
        self.hits = np.zeros(self.num_classes, np.int64)
        self.misses = np.zeros(self.num_classes, np.int64)

    def add(self, cls: int, hit: bool) -> None:
        (self.hits if hit else self.misses)[cls] += 1

    def result(self, class_names: list[str]) -> dict[str, Any]:
        n = self.hits + self.misses
        acc = [None if n[c] == 0 else float(self.hits[c] / n[c]) for c in range(self.num_classes)]
        used = [a for a in acc if a is not None]
        return {
            "pointing_accuracy": float(np.mean(used)) if used else None,
            "hits": int(self.hits.sum()),
            "misses": int(self.misses.sum()),
            "images_evaluated": self.images,
            "per_class": [{"class": c, "name": class_names[c], "hits": int(self.hits[c]),
                           "misses": int(self.misses[c]), "accuracy": acc[c]} for c in range(self.num_classes)],
            "excluded_classes": [c for c in range(self.num_classes) if n[c] == 0],
        }


# ----------------------------------------------------------------------------------------------- data


def batches(ds, split: str, size: int, batch_size: int, max_images: int | None) -> Iterator[tuple[torch.Tensor, list]]:
    """(uint8 images [B, 3, S, S], [(sample id, width, height, {class: boxes})]) of the images that have boxes."""
    from ..shards.jpeg import decode_image

    k = ds.num_classes
    images, items, taken = [], [], 0
    for s in ds.iter_samples(split):
        if max_images is not None and taken >= max_images:
            break
        boxes = boxes_by_class(s.meta, k, f"{ds.root}/{split} sample {s.key}")
        if not boxes:
            continue
        taken += 1
        images.append(decode_image(s.jpeg, size).transpose(2, 0, 1))
        items.append((s.sample_id, float(s.meta["width"]), float(s.meta["height"]), boxes))
        if len(images) == batch_size:
            yield torch.from_numpy(np.stack(images)), items
            images, items = [], []
    if images:
        yield torch.from_numpy(np.stack(images)), items


# -------------------------------------------------------------------------------------------- overlays


def _overlay(image_chw: np.ndarray, cams: np.ndarray, classes: list[int], boxes: dict[int, list], hits: list[bool],
             points_input: np.ndarray, size: int, width: float, height: float, names: list[str]) -> np.ndarray:
    """One BGR panel per class: the image (S x S) with the upsampled CAM as a jet heat map, the class's
    boxes (white) and the point (green hit, red miss)."""
    import cv2

    rgb = np.ascontiguousarray(image_chw.transpose(1, 2, 0))
    base = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    panels = []
    for cam, c, hit, (px, py) in zip(cams, classes, hits, points_input):
        up = cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        lo, hi = float(up.min()), float(up.max())
        norm = np.zeros_like(up, np.uint8) if hi <= lo else ((up - lo) / (hi - lo) * 255).astype(np.uint8)
        panel = cv2.addWeighted(base, 0.5, cv2.applyColorMap(norm, cv2.COLORMAP_JET), 0.5, 0)
        for b in boxes[c]:
            p0 = (int(round(b[0] * size / width)), int(round(b[1] * size / height)))
            p1 = (int(round(b[2] * size / width)), int(round(b[3] * size / height)))
            cv2.rectangle(panel, p0, p1, (255, 255, 255), 2)
        colour = (0, 200, 0) if hit else (0, 0, 255)
        cv2.circle(panel, (int(px), int(py)), max(3, size // 60), colour, -1)
        cv2.putText(panel, f"{names[c]}: {'hit' if hit else 'miss'}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, colour, 1, cv2.LINE_AA)
        panels.append(panel)
    return np.concatenate(panels, axis=1)


def score_batch(cams: torch.Tensor, items: list, size: int, mode: str, tally: Tally) -> tuple[np.ndarray, dict]:
    """Play a batch of ``batches``: for every image and every class with a box in it, the CAM maximum
    mapped to the original image is a hit or a miss in ``tally``. Returns the points in the S x S input
    (in the order image, class) and the hits per image, for ``draw_overlays``."""
    pairs = [(b, c) for b, it in enumerate(items) for c in sorted(it[3])]
    pts = argmax_points(torch.stack([cams[b, c] for b, c in pairs]), size, mode)
    hits_of: dict[int, list[bool]] = {}
    for (b, c), pt in zip(pairs, pts):
        _, w, h, boxes = items[b]
        (x, y), = to_original(pt[None], size, w, h)
        hit = inside_any(x, y, boxes[c])
        tally.add(c, hit)
        hits_of.setdefault(b, []).append(hit)
    tally.images += len(items)
    return pts, hits_of


def draw_overlays(out_dir: Path, images: torch.Tensor, cams: torch.Tensor, items: list, pts: np.ndarray,
                  hits_of: dict, size: int, class_names: list[str], limit: int) -> None:
    """``out_dir/<sample id>.png`` for the first ``limit`` images of a batch (see ``_overlay``)."""
    import cv2

    j = 0
    for b, it in enumerate(items):
        classes = sorted(it[3])
        if b < limit:
            panel = _overlay(images[b].numpy(), cams[b, classes].cpu().numpy(), classes, it[3], hits_of[b],
                             pts[j:j + len(classes)], size, it[1], it[2], class_names)
            cv2.imwrite(str(out_dir / f"{it[0]:06d}.png"), panel)
        j += len(classes)
