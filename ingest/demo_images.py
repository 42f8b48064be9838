"""The demo dataset's generator: draws a small synthetic multi-label image set as a Pascal VOC tree.

It is the demo's stand-in for a download: ``ensure_voc_tree`` writes (or reuses) a VOC-layout folder,
which ``ingest demo`` (``ingest/demo.py``) then ingests with the VOC adapter like any VOC dataset. This
module knows nothing of shards or plans; its contract is the tree it writes, described below, and
``render_image``, a pure function of (seed, split, index).

How the demo data is generated
==============================

Every image is drawn from scratch with numpy and OpenCV; nothing is downloaded.

- **Classes.** 20 object classes (``CLASSES``), each a shape or glyph: circle, ring (annulus), square,
  frame (hollow square), triangle, hexagon, star (five points), cross (plus sign), arrow, crescent,
  heart, ellipse (elongated), zigzag (thick polyline), checker (3x3 checkerboard), and the glyphs
  ``A K R 3 7 8`` drawn with ``cv2.putText`` in one of four Hershey fonts (``letterA`` ... ``digit8``).
- **Appearance.** Each object gets a random size (its nominal diameter is 20-45 % of the image's
  shorter side), a random anisotropic stretch (each axis x0.85-1.15), a random rotation (any angle for
  shapes; +-30 degrees for glyphs so that they stay readable), a random position (the object lies fully
  inside the image) and a solid colour. Each class has a typical hue (``CLASS_HUES``: the 20 multiples
  of 18 degrees, permuted so that classes adjacent in index or frequency are far apart in hue); an
  object's hue is its class hue +- 12 degrees, its saturation and value are uniform in 0.55-1. So colour
  narrows a class down to itself and its two hue neighbours and the shape decides among them, much as
  colour is a cue but not the answer in photos. The colour is resampled (same class hue range, up to
  30 times, keeping the best) until it differs from the mean background under the object by
  ``MIN_CONTRAST`` (RGB distance), so that every labelled object stands out. Shape parameters vary
  too (ring and stroke thickness, star depth, arrow proportions, font, glyph stroke width).
- **Objects per image.** 1, 2, 3 or 4 objects with probabilities ``N_OBJECTS_P`` = 0.30 / 0.35 / 0.25
  / 0.10 (mean 2.15). The first object's class is drawn with weights ``CLASS_DECAY ** index``
  (0.95^c: mild imbalance, the most frequent class ``circle`` is about 2.6x as frequent as the least
  frequent ``digit8``); each further object repeats a class already in the image with probability
  ``REPEAT_P`` = 0.15 (VOC-like repeated instances), otherwise it takes a new class drawn with the same
  weights among the classes not yet present. An object is placed so that its box overlaps any earlier
  box by at most ``MAX_OVERLAP`` = 20 % of the smaller box (objects shrink when they do not fit; an
  object that still does not fit is dropped, so labels always match what is drawn). Because labels
  are the set of classes drawn, an image has about 2.0 positives on average: under the
  single-positive protocol about half of the true positives of the training set are missing and
  would be assumed negative.
- **Background clutter.** A linear gradient between two muted colours (saturation 0-0.3) in a random
  direction, low-frequency colour blotches (a coarse random field upsampled with bicubic
  interpolation), 1-4 thin anti-aliased lines and up to 15 small specks (saturation 0-0.5, any hue)
  behind the objects, 0-2 thin lines over them, then per-pixel Gaussian noise (sigma 2-10). None of
  the clutter is a class.
- **Sizes.** Width and height are drawn independently and uniformly from ``[min_size, max_size]``
  (default 128-256 px), so most images are not square. JPEG quality 90 (``cv2.imencode``).
- **Determinism.** Image ``i`` of split ``s`` is drawn from its own generator,
  ``numpy.random.default_rng([seed, s, i])`` (s = 0 train, 1 test): the output does not depend on the
  number of worker processes, and the test images do not depend on ``n_train``. Two runs with the same
  arguments on the same numpy/OpenCV install write byte-identical files (another OpenCV build may
  encode JPEGs or rasterise anti-aliased edges differently).

The tree, returned as ``<tree>/VOCdevkit/VOCDEMO``, follows VOC 2012:

- ``JPEGImages/<id>.jpg`` with ids ``demo_000000`` ... in sorted order: the ``n_train`` training images
  first, then the ``n_test`` test images (the VOC ``val`` split, which the VOC adapter uses as test);
- ``Annotations/<id>.xml``: ``size``, one ``object`` per drawn object with ``name``, ``pose``
  (Unspecified), ``truncated`` 0, ``difficult`` 0 and ``bndbox``: the tight rectangle around the
  object's pixels of coverage >= 50 %, in VOC's 1-based inclusive pixel convention
  (``1 <= xmin <= xmax <= width``);
- ``ImageSets/Main/<class>_{train,val,trainval}.txt`` with VOC's ``"%s %2d"`` rows (``demo_000003  1``,
  ``demo_000004 -1``; there are no ``0``/difficult rows) and ``{train,val,trainval}.txt``;
- ``classes.txt`` (the 20 names in class-index order) and ``params.json`` (the generation arguments,
  written last: a tree with a matching ``params.json`` is complete and is reused by ``ensure_voc_tree``).

The tree is built in a sibling temporary folder and renamed into place, so an interrupted run never
leaves a half-written ``VOCDEMO`` behind.
"""
from __future__ import annotations

import colorsys
import ctypes
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

#: class names in class-index order (the order of the manifest and of classes.txt)
CLASSES: tuple[str, ...] = (
    "circle", "ring", "square", "frame", "triangle", "hexagon", "star", "cross", "arrow", "crescent",
    "heart", "ellipse", "zigzag", "checker", "letterA", "letterK", "letterR", "digit3", "digit7", "digit8",
)
#: P(1, 2, 3, 4 objects in an image)
N_OBJECTS_P = (0.30, 0.35, 0.25, 0.10)
#: class c is drawn with weight CLASS_DECAY ** c (mild, stated imbalance)
CLASS_DECAY = 0.95
#: probability that a further object repeats a class already in the image
REPEAT_P = 0.15
#: largest allowed box intersection, as a fraction of the smaller of the two boxes
MAX_OVERLAP = 0.20
#: nominal object diameter as a fraction of the image's shorter side
OBJECT_SIZE = (0.20, 0.45)
#: smallest RGB distance between an object's colour and the mean background under it
MIN_CONTRAST = 100.0
#: each class has a typical hue (degrees): a fixed permutation of 0, 18, ..., 342, so that classes adjacent
#: in index (and in frequency) are not adjacent in hue; an object's hue is its class hue +- HUE_JITTER,
#: so colour narrows a class down to it and its hue neighbours and the shape decides among them
CLASS_HUES = (0, 198, 54, 270, 126, 324, 90, 234, 18, 162, 306, 72, 216, 288, 36, 180, 342, 108, 252, 144)
HUE_JITTER = 12.0
OBJECT_SAT = (0.55, 1.0)
OBJECT_VAL = (0.55, 1.0)
#: the background and the clutter are muted (low saturation) so that objects stand out, as in photos
BACKGROUND_SAT = (0.0, 0.3)
CLUTTER_SAT = (0.0, 0.5)
LINES_BEHIND = (1, 5)  # [low, high) lines drawn under the objects
JPEG_QUALITY = 90
#: bump when the drawing code changes, so that cached trees are regenerated
GENERATOR_VERSION = 1
#: the generator's name in params.json and in the manifest's ``source``: an identity, not an import path (it is
#: the module path of the time the generator lived in ingest/demo.py); changing it would make every cached tree
#: stale and every demo dataset refuse to resume
GENERATOR_ID = "largeloss.ingest.demo"

DEVKIT_NAME = "VOCDEMO"
ID_PREFIX = "demo_"
MIN_IMAGE_SIZE = 64  # below this the objects (>= 20 % of the side) become a few pixels
MAX_IMAGE_SIZE = 4096

_GLYPHS = {"letterA": "A", "letterK": "K", "letterR": "R", "digit3": "3", "digit7": "7", "digit8": "8"}
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX)
_SHIFT = 4  # sub-pixel bits for cv2 polygon drawing: coordinates are multiplied by 2**_SHIFT


# --------------------------------------------------------------------------------------------- drawing
# Each shape function draws one object, unrotated, filled with 255 on a uint8 mask, centred at (c, c)
# within radius r; rotation and stretch are applied afterwards by ``_render_object``.


def _poly(mask: np.ndarray, pts: np.ndarray) -> None:
    cv2.fillPoly(mask, [np.round(pts * (1 << _SHIFT)).astype(np.int32)], 255, cv2.LINE_AA, _SHIFT)


def _regular(c: float, r: float, n: int, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([c + r * np.cos(a), c + r * np.sin(a)], axis=1)


def _circle(m, c, r, rng):
    cv2.circle(m, (round(c), round(c)), round(r), 255, -1, cv2.LINE_AA)


def _ring(m, c, r, rng):
    t = max(2, round(r * rng.uniform(0.18, 0.32)))
    cv2.circle(m, (round(c), round(c)), round(r - t / 2), 255, t, cv2.LINE_AA)


def _square(m, c, r, rng):
    h = 0.8 * r
    _poly(m, np.array([[c - h, c - h], [c + h, c - h], [c + h, c + h], [c - h, c + h]]))


def _frame(m, c, r, rng):
    h = 0.8 * r
    t = max(2.0, r * rng.uniform(0.18, 0.3))
    _poly(m, np.array([[c - h, c - h], [c + h, c - h], [c + h, c + h], [c - h, c + h]]))
    g = h - t
    inner = np.array([[c - g, c - g], [c + g, c - g], [c + g, c + g], [c - g, c + g]])
    cv2.fillPoly(m, [np.round(inner * (1 << _SHIFT)).astype(np.int32)], 0, cv2.LINE_AA, _SHIFT)


def _triangle(m, c, r, rng):
    _poly(m, _regular(c, r, 3))


def _hexagon(m, c, r, rng):
    _poly(m, _regular(c, r, 6))


def _star(m, c, r, rng):
    outer = _regular(c, r, 5)
    inner = _regular(c, r * rng.uniform(0.38, 0.5), 5, phase=-math.pi / 2 + math.pi / 5)
    _poly(m, np.stack([outer, inner], axis=1).reshape(-1, 2))


def _cross(m, c, r, rng):
    w = r * rng.uniform(0.28, 0.4)
    _poly(m, np.array([[c - w, c - r], [c + w, c - r], [c + w, c + r], [c - w, c + r]]))
    _poly(m, np.array([[c - r, c - w], [c + r, c - w], [c + r, c + w], [c - r, c + w]]))


def _arrow(m, c, r, rng):
    w = r * rng.uniform(0.15, 0.25)  # shaft half-width
    head = r * rng.uniform(0.7, 0.9)  # head length
    hw = r * rng.uniform(0.5, 0.7)  # head half-width
    x0, x1 = c - r, c + r
    _poly(m, np.array([[x0, c - w], [x1 - head, c - w], [x1 - head, c - hw], [x1, c],
                       [x1 - head, c + hw], [x1 - head, c + w], [x0, c + w]]))


def _crescent(m, c, r, rng):
    cv2.circle(m, (round(c), round(c)), round(r), 255, -1, cv2.LINE_AA)
    off = r * rng.uniform(0.4, 0.55)
    cv2.circle(m, (round(c + off), round(c - off * 0.3)), round(r * 0.9), 0, -1, cv2.LINE_AA)


def _heart(m, c, r, rng):
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    s = r / 17.0
    _poly(m, np.stack([c + s * x, c + s * (y + 2.5)], axis=1))


def _ellipse(m, c, r, rng):
    cv2.ellipse(m, (round(c), round(c)), (round(r), max(2, round(r * rng.uniform(0.3, 0.45)))), 0, 0, 360, 255, -1,
                cv2.LINE_AA)


def _zigzag(m, c, r, rng):
    n = int(rng.integers(3, 6))  # segments
    xs = np.linspace(c - r * 0.85, c + r * 0.85, n + 1)
    amp = r * rng.uniform(0.4, 0.6)
    ys = c + amp * np.where(np.arange(n + 1) % 2 == 0, -1.0, 1.0)
    t = max(2, round(r * rng.uniform(0.15, 0.25)))
    pts = np.round(np.stack([xs, ys], axis=1) * (1 << _SHIFT)).astype(np.int32)
    cv2.polylines(m, [pts], False, 255, t, cv2.LINE_AA, _SHIFT)


def _checker(m, c, r, rng):
    h = 0.8 * r
    cell = 2 * h / 3
    for i in range(3):
        for j in range(3):
            if (i + j) % 2 == 0:
                x, y = c - h + j * cell, c - h + i * cell
                _poly(m, np.array([[x, y], [x + cell, y], [x + cell, y + cell], [x, y + cell]]))


def _glyph(text: str) -> Callable:
    def draw(m, c, r, rng):
        font = _FONTS[int(rng.integers(len(_FONTS)))]
        thick = max(1, round(r * rng.uniform(0.12, 0.22)))
        (_, h0), _ = cv2.getTextSize(text, font, 1.0, thick)
        scale = 1.7 * r / h0
        (w, h), _ = cv2.getTextSize(text, font, scale, thick)
        cv2.putText(m, text, (round(c - w / 2), round(c + h / 2)), font, scale, 255, thick, cv2.LINE_AA)

    return draw


_DRAW: dict[str, Callable] = {
    "circle": _circle, "ring": _ring, "square": _square, "frame": _frame, "triangle": _triangle,
    "hexagon": _hexagon, "star": _star, "cross": _cross, "arrow": _arrow, "crescent": _crescent,
    "heart": _heart, "ellipse": _ellipse, "zigzag": _zigzag, "checker": _checker,
    **{name: _glyph(text) for name, text in _GLYPHS.items()},
}
assert tuple(_DRAW) == CLASSES


def _render_object(cls: int, r: float, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Draw class ``cls`` at radius ``r``, stretched and rotated.

    Returns the coverage mask cropped to its non-zero pixels (uint8, 255 = fully covered) and the box
    of the pixels with coverage >= 50 % inside that crop, as 0-based inclusive (x0, y0, x1, y1).
    """
    name = CLASSES[cls]
    half = math.ceil(1.6 * r) + 2  # room for stretch x1.15 and rotation of the farthest corner
    size = 2 * half + 1
    mask = np.zeros((size, size), np.uint8)
    _DRAW[name](mask, float(half), r, rng)
    angle = rng.uniform(-30.0, 30.0) if name in _GLYPHS else rng.uniform(0.0, 360.0)
    sx, sy = rng.uniform(0.85, 1.15, size=2)
    a = math.radians(angle)
    # affine map about the centre: rotate(angle) @ diag(sx, sy)
    lin = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.diag([sx, sy])
    mat = np.hstack([lin, (np.array([half, half]) - lin @ np.array([half, half]))[:, None]])
    mask = cv2.warpAffine(mask, mat, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    ys, xs = np.nonzero(mask)
    mask = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    ys, xs = np.nonzero(mask >= 128)
    if len(xs) == 0:  # a hairline glyph a few pixels tall (tiny --size): fall back to any coverage
        ys, xs = np.nonzero(mask)
    return mask, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def _hsv(hue: float, sat: float, val: float) -> tuple[float, float, float]:
    """A colour in OpenCV's BGR order, 0..255, from hue in degrees and saturation/value in 0..1."""
    r, g, b = colorsys.hsv_to_rgb((hue % 360.0) / 360.0, sat, val)
    return (255.0 * b, 255.0 * g, 255.0 * r)


def _muted(rng: np.random.Generator) -> tuple[float, float, float]:
    return _hsv(rng.uniform(0, 360), rng.uniform(*BACKGROUND_SAT), rng.uniform(0.15, 0.9))


def _clutter(rng: np.random.Generator) -> tuple[float, float, float]:
    return _hsv(rng.uniform(0, 360), rng.uniform(*CLUTTER_SAT), rng.uniform(0.2, 1.0))


def _object_colour(rng: np.random.Generator, cls: int) -> tuple[float, float, float]:
    return _hsv(CLASS_HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(*OBJECT_SAT),
                rng.uniform(*OBJECT_VAL))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = np.array(_muted(rng), np.float32), np.array(_muted(rng), np.float32)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx - w / 2) * math.cos(a) + (yy - h / 2) * math.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + t[..., None] * (c1 - c0)
    gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    blotch = rng.standard_normal((gh, gw, 3)).astype(np.float32) * np.float32(rng.uniform(8, 25))
    img += cv2.resize(blotch, (w, h), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(*LINES_BEHIND))):
        _random_line(img, rng, thickness=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 16))):
        centre = (int(rng.integers(w)), int(rng.integers(h)))
        cv2.circle(img, centre, int(rng.integers(1, 3)), _clutter(rng), -1, cv2.LINE_AA)
    return img


def _random_line(img: np.ndarray, rng: np.random.Generator, thickness: int) -> None:
    h, w = img.shape[:2]
    p0 = (int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-h // 4, h + h // 4)))
    p1 = (int(rng.integers(-w // 4, w + w // 4)), int(rng.integers(-h // 4, h + h // 4)))
    cv2.line(img, p0, p1, _clutter(rng), thickness, cv2.LINE_AA)


def _pick_classes(rng: np.random.Generator) -> list[int]:
    """Classes of the objects of one image, in drawing order (repeats allowed, see the docstring)."""
    k = len(CLASSES)
    weights = CLASS_DECAY ** np.arange(k)
    n = int(rng.choice(len(N_OBJECTS_P), p=N_OBJECTS_P)) + 1
    chosen: list[int] = []
    for _ in range(n):
        if chosen and rng.random() < REPEAT_P:
            chosen.append(chosen[int(rng.integers(len(chosen)))])
            continue
        w = weights.copy()
        w[list(set(chosen))] = 0.0
        chosen.append(int(rng.choice(k, p=w / w.sum())))
    return chosen


def _overlap_ok(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for a0, b0, a1, b1 in others:
        iw = min(x1, a1) - max(x0, a0) + 1
        ih = min(y1, b1) - max(y0, b0) + 1
        if iw > 0 and ih > 0:
            if iw * ih > MAX_OVERLAP * min(area, (a1 - a0 + 1) * (b1 - b0 + 1)):
                return False
    return True


def render_image(seed: int, split: int, index: int, min_size: int = 128, max_size: int = 256
                 ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw image ``index`` of split ``split`` (0 = train, 1 = test); a pure function of its arguments.

    Returns the image (uint8 HxWx3, OpenCV's BGR order) and its objects in drawing order, each
    ``{"class": index, "bbox": [xmin, ymin, xmax, ymax]}`` in 0-based inclusive pixel coordinates.
    """
    rng = np.random.default_rng([seed, split, index])
    h = int(rng.integers(min_size, max_size + 1))
    w = int(rng.integers(min_size, max_size + 1))
    img = _background(rng, h, w)
    short = min(h, w)
    objects: list[dict[str, Any]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for cls in _pick_classes(rng):
        r = 0.5 * short * rng.uniform(*OBJECT_SIZE)
        placed = None
        for attempt in range(40):
            if attempt % 10 == 0:  # (re)draw, smaller after every 10 failed placements
                mask, (bx0, by0, bx1, by1) = _render_object(cls, r * 0.85 ** (attempt // 10), rng)
                mh, mw = mask.shape
            if mh > h or mw > w:
                continue
            x0, y0 = int(rng.integers(0, w - mw + 1)), int(rng.integers(0, h - mh + 1))
            box = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1)
            if _overlap_ok(box, boxes):
                placed = (x0, y0, box)
                break
        if placed is None:  # dropped: the labels only name what is drawn
            continue
        x0, y0, box = placed
        roi = img[y0: y0 + mh, x0: x0 + mw].astype(np.float32)
        alpha = (mask.astype(np.float32) / 255.0)[..., None]
        under = (roi * alpha).sum(axis=(0, 1)) / max(float(alpha.sum()), 1e-6)
        best, best_d = None, -1.0
        for _ in range(30):
            c = np.array(_object_colour(rng, cls), np.float32)
            d = float(np.linalg.norm(c - under))
            if d > best_d:
                best, best_d = c, d
            if d >= MIN_CONTRAST:
                break
        img[y0: y0 + mh, x0: x0 + mw] = np.clip(roi * (1.0 - alpha) + best * alpha + 0.5, 0, 255).astype(np.uint8)
        boxes.append(box)
        objects.append({"class": cls, "bbox": list(box)})
    for _ in range(int(rng.integers(0, 3))):
        _random_line(img, rng, thickness=1)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    img = np.clip(img.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
    # _pick_classes always yields >= 1 object and the first one always fits an empty image
    assert objects, "the first object of an image must always be placed"
    return img, objects


# ------------------------------------------------------------------------------------------ VOC writing

def _image_id(i: int, width: int) -> str:
    return f"{ID_PREFIX}{i:0{width}d}"


def _id_width(n: int) -> int:
    return max(6, len(str(n - 1)))


def _annotation_xml(image_id: str, w: int, h: int, objects: list[dict[str, Any]]) -> str:
    # VOC boxes are 1-based and inclusive: the top-left pixel is (1, 1), xmax is the last column + 1
    objs = "".join(
        "\t<object>\n"
        f"\t\t<name>{CLASSES[o['class']]}</name>\n"
        "\t\t<pose>Unspecified</pose>\n"
        "\t\t<truncated>0</truncated>\n"
        "\t\t<difficult>0</difficult>\n"
        "\t\t<bndbox>\n"
        f"\t\t\t<xmin>{o['bbox'][0] + 1}</xmin>\n"
        f"\t\t\t<ymin>{o['bbox'][1] + 1}</ymin>\n"
        f"\t\t\t<xmax>{o['bbox'][2] + 1}</xmax>\n"
        f"\t\t\t<ymax>{o['bbox'][3] + 1}</ymax>\n"
        "\t\t</bndbox>\n"
        "\t</object>\n"
        for o in objects
    )
    return (
        "<annotation>\n"
        f"\t<folder>{DEVKIT_NAME}</folder>\n"
        f"\t<filename>{image_id}.jpg</filename>\n"
        "\t<source>\n\t\t<database>largeloss synthetic demo</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        "\t<segmented>0</segmented>\n"
        f"{objs}"
        "</annotation>\n"
    )


def _write_chunk(devkit: str, seed: int, split: int, first: int, count: int, id_offset: int, id_width: int,
                 min_size: int, max_size: int) -> list[list[int]]:
    """Render and write images ``first .. first+count-1`` of a split; return each one's sorted class set."""
    labels = []
    for i in range(first, first + count):
        img, objects = render_image(seed, split, i, min_size, max_size)
        image_id = _image_id(id_offset + i, id_width)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cv2.imencode failed for {image_id} ({img.shape})")
        with open(os.path.join(devkit, "JPEGImages", image_id + ".jpg"), "wb") as f:
            f.write(buf.tobytes())
        xml = _annotation_xml(image_id, img.shape[1], img.shape[0], objects)
        with open(os.path.join(devkit, "Annotations", image_id + ".xml"), "w", encoding="utf-8", newline="\n") as f:
            f.write(xml)
        labels.append(sorted({o["class"] for o in objects}))
    return labels


#: prctl(2) option: the signal a process gets when its parent dies
_PR_SET_PDEATHSIG = 1


def _worker_init(parent: int) -> None:
    cv2.setNumThreads(1)  # one process per core already; the drawing calls are small
    _die_with(parent)


def _die_with(parent: int) -> None:
    """Make this worker exit when process ``parent`` (the generator) dies, even by kill -9, which gives the pool
    no chance to stop its workers (a worker left alive also keeps multiprocessing's resource tracker alive).

    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG; it fires when the thread
    that started the worker exits: the pool starts its workers from the thread that submits, the main
    thread, as long as max_tasks_per_child is not set). Elsewhere, or if prctl fails: a daemon thread
    checks the parent pid every second.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
        if ok:
            if os.getppid() != parent:  # it died before the prctl call
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def tree_params(n_train: int, n_test: int, seed: int, min_size: int, max_size: int) -> dict[str, Any]:
    """The generation arguments as params.json records them: a tree is reused only if they are equal."""
    return {"generator": GENERATOR_ID, "version": GENERATOR_VERSION, "n_train": n_train, "n_test": n_test,
            "seed": seed, "min_size": min_size, "max_size": max_size, "classes": list(CLASSES)}


def _validate(n_train: int, n_test: int, min_size: int, max_size: int) -> None:
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    if not MIN_IMAGE_SIZE <= min_size <= max_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size range must satisfy {MIN_IMAGE_SIZE} <= min <= max <= {MAX_IMAGE_SIZE}, "
                         f"got {min_size}..{max_size}")


def _remove_stale_partials(parent: Path) -> None:
    """Delete temporary trees left by killed runs (their pid suffix names a process that is gone)."""
    for p in parent.glob(f".{DEVKIT_NAME}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # a live process of another user
            pass


def write_voc_tree(root: Path, *, n_train: int = 2000, n_test: int = 500, seed: int = 0, min_size: int = 128,
                   max_size: int = 256, workers: int = 1) -> Path:
    """Generate the demo dataset as a VOC tree under ``root``; return ``root/VOCdevkit/VOCDEMO``.

    Always regenerates. An existing ``VOCDEMO`` is replaced only if it carries this generator's
    ``params.json`` (i.e. it is a demo tree); anything else there is an error, never deleted.
    """
    _validate(n_train, n_test, min_size, max_size)
    root = Path(root)
    parent = root / "VOCdevkit"
    devkit = parent / DEVKIT_NAME
    if devkit.exists() and not (devkit / "params.json").is_file():
        raise FileExistsError(
            f"{devkit} exists but is not a demo tree (no params.json); delete it or pass another --tree")
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(parent)
    tmp = parent / f".{DEVKIT_NAME}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        id_width = _id_width(n_train + n_test)
        # (split code, count, id offset): test ids follow the train ids so that all ids are unique
        layout = [(0, n_train, 0), (1, n_test, n_train)]
        jobs = []
        chunk = 64
        for split, count, offset in layout:
            for first in range(0, count, chunk):
                jobs.append((str(tmp), seed, split, first, min(chunk, count - first), offset, id_width,
                             min_size, max_size))
        if workers > 1:
            # spawn, not fork: a forked child could inherit OpenCV's or torch's thread pools mid-operation
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_worker_init, initargs=(os.getpid(),)) as ex:
                results = list(ex.map(_write_chunk, *zip(*jobs)))
        else:
            results = [_write_chunk(*job) for job in jobs]
        labels: list[list[int]] = [lab for res in results for lab in res]  # jobs are in id order
        assert len(labels) == n_train + n_test
        ids = [_image_id(i, id_width) for i in range(n_train + n_test)]
        _write_lists(tmp / "ImageSets" / "Main", ids, labels, n_train)
        (tmp / "classes.txt").write_text("".join(c + "\n" for c in CLASSES), encoding="utf-8")
        stats = {
            split: {
                "images": len(part),
                "positives_per_class": [sum(c in lab for lab in part) for c in range(len(CLASSES))],
                "mean_positives": round(sum(map(len, part)) / len(part), 4),
            }
            for split, part in (("train", labels[:n_train]), ("val", labels[n_train:]))
        }
        info = {"params": tree_params(n_train, n_test, seed, min_size, max_size), "stats": stats}
        # params.json is written last: its presence marks a complete tree
        (tmp / "params.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if devkit.exists():
            shutil.rmtree(devkit)
        os.replace(tmp, devkit)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return devkit


def _write_lists(main: Path, ids: list[str], labels: list[list[int]], n_train: int) -> None:
    parts = {"train": range(0, n_train), "val": range(n_train, len(ids)), "trainval": range(len(ids))}
    for split, rows in parts.items():
        (main / f"{split}.txt").write_text("".join(ids[i] + "\n" for i in rows), encoding="utf-8")
        for c, name in enumerate(CLASSES):
            # VOC's "%s %2d": "id  1" for present, "id -1" for absent (no difficult-only "0" rows here)
            text = "".join("%s %2d\n" % (ids[i], 1 if c in labels[i] else -1) for i in rows)
            (main / f"{name}_{split}.txt").write_text(text, encoding="utf-8")


def complete_tree(root: Path, *, n_train: int, n_test: int, seed: int, min_size: int, max_size: int) -> Path | None:
    """The ``VOCDEMO`` folder under ``root`` if it is complete and was written with these arguments."""
    devkit = Path(root) / "VOCdevkit" / DEVKIT_NAME
    try:
        info = json.loads((devkit / "params.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("params") != tree_params(n_train, n_test, seed, min_size, max_size):
        return None
    n = n_train + n_test
    if sum(1 for _ in (devkit / "JPEGImages").glob("*.jpg")) != n or \
            sum(1 for _ in (devkit / "Annotations").glob("*.xml")) != n:
        return None
    return devkit


def ensure_voc_tree(root: Path, *, n_train: int = 2000, n_test: int = 500, seed: int = 0, min_size: int = 128,
                    max_size: int = 256, workers: int = 1, verbose: bool = True) -> tuple[Path, bool]:
    """Reuse a complete tree written with the same arguments, or (re)generate it; returns (devkit, reused)."""
    _validate(n_train, n_test, min_size, max_size)
    found = complete_tree(root, n_train=n_train, n_test=n_test, seed=seed, min_size=min_size, max_size=max_size)
    if found is not None:
        if verbose:
            print(f"demo: reusing the complete tree {found}", file=sys.stderr)
        return found, True
    t0 = time.perf_counter()
    devkit = write_voc_tree(root, n_train=n_train, n_test=n_test, seed=seed, min_size=min_size,
                            max_size=max_size, workers=workers)
    if verbose:
        print(f"demo: generated {n_train + n_test} images in {time.perf_counter() - t0:.1f} s -> {devkit}",
              file=sys.stderr)
    return devkit, False
