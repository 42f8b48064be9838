"""The demo dataset's generator: real handwritten digits composed into a multi-label image set, as a VOC tree.

It is the demo's stand-in for a download: ``ensure_voc_tree`` writes (or reuses) a VOC-layout folder,
which ``ingest demo`` (``ingest/demo.py``) then ingests with the VOC adapter like any VOC dataset. This
module knows nothing of shards or plans; its contract is the tree it writes, described below, and
``compose_image``, a pure function of (digits, seed, split, index).

Where the pixels come from
==========================

The 1,797 handwritten digits that ship inside scikit-learn (``sklearn.datasets.load_digits``: the test
set of the UCI "Optical Recognition of Handwritten Digits" data: digits 0-9 written by 13 people on NIST
forms, reduced to 8 x 8 pixels of 17 grey levels; CC BY 4.0). They are real handwriting that nobody on
this project drew or chose, which is why the demo uses them rather than shapes drawn for the purpose: a
generator written by the same people as the method could, without meaning to, make the method look good.
Nothing is downloaded.

How an image is composed
========================

- **Digit pools.** The 1,797 digits are cut once into a training pool (80 %) and a test pool (20 %),
  per class, by a fixed permutation (``POOL_SEED``); training images use only training-pool digits and
  test images only test-pool digits, so no handwritten digit of a test image was ever seen in training
  (the pools share writers: scikit-learn's copy does not say who wrote which digit).
- **Layout.** A ``size`` x ``size`` grey image (default 64 px) is a 2 x 2 grid of cells. It holds 1, 2,
  3 or 4 digits with probabilities ``N_DIGITS_P`` = 0.25 / 0.35 / 0.25 / 0.15 (mean 2.3), of distinct
  classes drawn uniformly, in distinct cells drawn uniformly. A digit is a random pool digit of its
  class, scaled (bilinear) to ``DIGIT_SCALE`` = 75-100 % of the cell's side and put at a random position
  inside its cell; everything else is black (as in the source).
- **Labels** are the classes of the digits shown (complete annotation: every other class is negative).
  Under the single-positive protocol an image keeps one of its 2.3 positives on average, so about 57 %
  of the true positives of the training set are missing and would be assumed negative.
- **Boxes** (for the pointing game): the tight box of the digit's non-black pixels, in VOC's 1-based
  inclusive pixel convention.
- **Determinism.** Image ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i])``
  (s = 0 train, 1 test): the test images do not depend on ``n_train``, and two runs with the same
  arguments on the same numpy / OpenCV install write byte-identical files. JPEG quality 95
  (``cv2.imencode``), three identical channels.

The tree, returned as ``<tree>/VOCdevkit/VOCDEMO``, follows VOC 2012:

- ``JPEGImages/<id>.jpg`` with ids ``demo_000000`` ... in sorted order: the ``n_train`` training images
  first, then the ``n_test`` test images (the VOC ``val`` split, which the VOC adapter uses as test);
- ``Annotations/<id>.xml``: ``size``, one ``object`` per digit with ``name``, ``pose`` (Unspecified),
  ``truncated`` 0, ``difficult`` 0 and ``bndbox``;
- ``ImageSets/Main/<class>_{train,val,trainval}.txt`` with VOC's ``"%s %2d"`` rows (``demo_000003  1``,
  ``demo_000004 -1``) and ``{train,val,trainval}.txt``;
- ``classes.txt`` (``zero`` ... ``nine`` in class-index order) and ``params.json`` (the generation
  arguments, written last: a tree with a matching ``params.json`` is complete and is reused by
  ``ensure_voc_tree``).

The tree is built in a sibling temporary folder and renamed into place, so an interrupted run never
leaves a half-written ``VOCDEMO`` behind.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

#: class names in class-index order (the order of the manifest and of classes.txt): one word each
CLASSES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: P(1, 2, 3, 4 digits in an image)
N_DIGITS_P = (0.25, 0.35, 0.25, 0.15)
#: a digit's side as a fraction of its cell's side
DIGIT_SCALE = (0.75, 1.0)
#: the share of each class's digits that goes to the training pool
TRAIN_POOL = 0.8
#: the fixed permutation that cuts the digits into the two pools (independent of the generator seed, so that
#: every demo tree keeps the same test digits out of training)
POOL_SEED = 1797
JPEG_QUALITY = 95
#: bump when the composition changes, so that cached trees are regenerated
GENERATOR_VERSION = 2
#: the generator's name in params.json and in the manifest's ``source``: an identity, not an import path
GENERATOR_ID = "largeloss.ingest.demo"

DEVKIT_NAME = "VOCDEMO"
ID_PREFIX = "demo_"
MIN_IMAGE_SIZE = 16  # a cell of 8 px: the source resolution
MAX_IMAGE_SIZE = 1024


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (uint8 [1797, 8, 8] in 0..255, int64 [1797] labels)."""
    from sklearn.datasets import load_digits as sklearn_digits  # ships its data: no download

    d = sklearn_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 17 grey levels 0..16 -> 0..255
    return images, d.target.astype(np.int64)


def digit_pools(labels: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per class, the indices of its training-pool and test-pool digits (disjoint, fixed by POOL_SEED)."""
    rng = np.random.default_rng(POOL_SEED)
    train, test = [], []
    for c in range(len(CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(TRAIN_POOL * len(idx)))
        train.append(np.sort(idx[:cut]))
        test.append(np.sort(idx[cut:]))
    return train, test


def compose_image(digits: np.ndarray, pools: list[np.ndarray], seed: int, split: int, index: int,
                  size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image: (uint8 [size, size] grey pixels, objects [{"class", "bbox": [x0, y0, x1, y1]}])."""
    rng = np.random.default_rng([seed, split, index])
    n = int(rng.choice(len(N_DIGITS_P), p=N_DIGITS_P)) + 1
    cells = rng.choice(4, size=n, replace=False)
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    cell = size // 2
    image = np.zeros((size, size), np.uint8)
    objects = []
    for where, cls in zip(cells, classes):
        src = digits[pools[cls][rng.integers(len(pools[cls]))]]
        side = max(2, int(round(cell * rng.uniform(*DIGIT_SCALE))))
        y0 = cell * (where // 2) + int(rng.integers(cell - side + 1))
        x0 = cell * (where % 2) + int(rng.integers(cell - side + 1))
        image[y0:y0 + side, x0:x0 + side] = cv2.resize(src, (side, side), interpolation=cv2.INTER_LINEAR)
        ys, xs = np.nonzero(image[y0:y0 + side, x0:x0 + side])
        if len(xs) == 0:  # cannot happen with the source digits; guards the box below
            raise AssertionError(f"digit of class {cls} vanished at side {side}")
        objects.append({"class": int(cls), "bbox": [x0 + int(xs.min()) + 1, y0 + int(ys.min()) + 1,
                                                    x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]})
    return image, objects


def _annotation_xml(image_id: str, size: int, objects: list[dict[str, Any]]) -> str:
    parts = ["<annotation>", f"\t<folder>{DEVKIT_NAME}</folder>", f"\t<filename>{image_id}.jpg</filename>",
             f"\t<size>\n\t\t<width>{size}</width>\n\t\t<height>{size}</height>\n\t\t<depth>3</depth>\n\t</size>"]
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        parts += ["\t<object>", f"\t\t<name>{CLASSES[o['class']]}</name>", "\t\t<pose>Unspecified</pose>",
                  "\t\t<truncated>0</truncated>", "\t\t<difficult>0</difficult>",
                  f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n"
                  f"\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>", "\t</object>"]
    return "\n".join(parts + ["</annotation>"]) + "\n"


def tree_params(n_train: int, n_test: int, seed: int, size: int) -> dict[str, Any]:
    """The generation arguments as params.json records them: a tree is reused only if they are equal."""
    return {"generator": GENERATOR_ID, "version": GENERATOR_VERSION, "source": "sklearn.datasets.load_digits",
            "n_train": n_train, "n_test": n_test, "seed": seed, "size": size}


def _validate(n_train: int, n_test: int, size: int) -> None:
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {size}")


def _remove_stale_partials(parent: Path) -> None:
    """Delete the temporary folders of interrupted runs whose process is gone."""
    for p in parent.glob(f".{DEVKIT_NAME}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def write_voc_tree(root: Path, *, n_train: int = 2000, n_test: int = 500, seed: int = 0, size: int = 64) -> Path:
    """Generate the demo dataset as a VOC tree under ``root``; return ``root/VOCdevkit/VOCDEMO``.

    Always regenerates. An existing ``VOCDEMO`` is replaced only if it carries this generator's
    ``params.json`` (i.e. it is a demo tree); anything else there is an error, never deleted.
    """
    _validate(n_train, n_test, size)
    parent = Path(root) / "VOCdevkit"
    devkit = parent / DEVKIT_NAME
    if devkit.exists() and not (devkit / "params.json").is_file():
        raise FileExistsError(
            f"{devkit} exists but is not a demo tree (no params.json); delete it or pass another --tree")
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(parent)
    tmp = parent / f".{DEVKIT_NAME}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    digits, labels = load_digits()
    pools = digit_pools(labels)
    try:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        width = max(6, len(str(n_train + n_test - 1)))
        ids, positives = [], []
        # (split code, count): test ids follow the train ids so that all ids are unique
        for split, count in ((0, n_train), (1, n_test)):
            for i in range(count):
                image_id = f"{ID_PREFIX}{len(ids):0{width}d}"
                pixels, objects = compose_image(digits, pools[split], seed, split, i, size)
                ok, jpg = cv2.imencode(".jpg", np.repeat(pixels[:, :, None], 3, axis=2),
                                       [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not ok:
                    raise RuntimeError(f"OpenCV could not encode {image_id}")
                (tmp / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg.tobytes())
                (tmp / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id, size, objects),
                                                                    encoding="utf-8")
                ids.append(image_id)
                positives.append(sorted({o["class"] for o in objects}))
        _write_lists(tmp / "ImageSets" / "Main", ids, positives, n_train)
        (tmp / "classes.txt").write_text("".join(c + "\n" for c in CLASSES), encoding="utf-8")
        stats = {
            split: {
                "images": len(part),
                "positives_per_class": [sum(c in pos for pos in part) for c in range(len(CLASSES))],
                "mean_positives": round(sum(map(len, part)) / len(part), 4),
            }
            for split, part in (("train", positives[:n_train]), ("val", positives[n_train:]))
        }
        info = {"params": tree_params(n_train, n_test, seed, size), "stats": stats}
        # params.json is written last: its presence marks a complete tree
        (tmp / "params.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        if devkit.exists():
            shutil.rmtree(devkit)
        os.replace(tmp, devkit)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return devkit


def _write_lists(main: Path, ids: list[str], positives: list[list[int]], n_train: int) -> None:
    """VOC's per-class and per-split image lists ("%s %2d" rows: the id, then 1 or -1 in two characters)."""
    for list_name, part in (("train", slice(0, n_train)), ("val", slice(n_train, None)), ("trainval", slice(None))):
        rows = list(zip(ids[part], positives[part]))
        (main / f"{list_name}.txt").write_text("".join(f"{i}\n" for i, _ in rows), encoding="utf-8")
        for c, name in enumerate(CLASSES):
            (main / f"{name}_{list_name}.txt").write_text(
                "".join("%s %2d\n" % (i, 1 if c in pos else -1) for i, pos in rows), encoding="utf-8")


def complete_tree(root: Path, *, n_train: int, n_test: int, seed: int, size: int) -> Path | None:
    """The ``VOCDEMO`` folder under ``root`` if it is complete and was written with these arguments."""
    devkit = Path(root) / "VOCdevkit" / DEVKIT_NAME
    try:
        info = json.loads((devkit / "params.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("params") != tree_params(n_train, n_test, seed, size):
        return None
    n = n_train + n_test
    if sum(1 for _ in (devkit / "JPEGImages").glob("*.jpg")) != n or \
            sum(1 for _ in (devkit / "Annotations").glob("*.xml")) != n:
        return None
    return devkit


def ensure_voc_tree(root: Path, *, n_train: int = 2000, n_test: int = 500, seed: int = 0, size: int = 64,
                    verbose: bool = True) -> tuple[Path, bool]:
    """Reuse a complete tree written with the same arguments, or (re)generate it; returns (devkit, reused)."""
    _validate(n_train, n_test, size)
    found = complete_tree(root, n_train=n_train, n_test=n_test, seed=seed, size=size)
    if found is not None:
        if verbose:
            print(f"demo: reusing the complete tree {found}", file=sys.stderr)
        return found, True
    t0 = time.perf_counter()
    devkit = write_voc_tree(root, n_train=n_train, n_test=n_test, seed=seed, size=size)
    if verbose:
        print(f"demo: composed {n_train + n_test} images of real handwritten digits in "
              f"{time.perf_counter() - t0:.1f} s -> {devkit}", file=sys.stderr)
    return devkit, False
