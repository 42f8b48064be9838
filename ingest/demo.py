"""``ingest demo``: the built-in synthetic dataset, generated on the spot and ingested as a VOC tree.

The demo exists so that the whole pipeline (ingest -> shards -> train with the large-loss schemes -> eval)
runs on a laptop CPU in minutes with no download. ``plan`` has ``ingest/demo_images.py`` write (or
reuse) a VOC-layout folder and hands it to the VOC adapter (``voc.plan_from_devkit``), so the demo also
exercises the real VOC parser. How the demo data is generated, and the tree it is written as, is the
docstring of ``ingest/demo_images.py``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..shards.format import IngestError, IngestPlan
from . import voc
from .argtypes import positive_int
from .demo_images import (
    CLASSES,
    GENERATOR_ID,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    ensure_voc_tree,
    tree_params,
)

NAME = "demo"
HELP = "generate the built-in synthetic demo dataset (20 shape/glyph classes, VOC layout) and ingest it"
DESCRIPTION = """\
Generate a small synthetic multi-label dataset and ingest it; nothing is downloaded.

Each image (128-256 px per side by default) shows 1-4 objects from 20 classes: shapes (circle, ring,
square, frame, triangle, hexagon, star, cross, arrow, crescent, heart, ellipse, zigzag, checker) and
glyphs (A, K, R, 3, 7, 8), in random sizes, positions and rotations and in colours around a
per-class hue, over a muted, cluttered background (gradient, blotches, lines, specks, noise).
Labels are complete: every class drawn is positive, every other class negative. About 2 positives
per image, so the single-positive protocol hides about half of the true positives.

The generator writes a Pascal VOC tree (JPEGImages, Annotations, ImageSets/Main lists, classes.txt)
to --tree (default: OUT/_source_voc/VOCdevkit/VOCDEMO) and ingests it with the VOC adapter: "train"
is the VOC train list, "test" the VOC val list. The same arguments give byte-identical files; a
complete tree written with the same arguments is reused. See the docstring of ingest/demo.py,
"How the demo data is generated", for the exact distributions.
"""
#: where the tree goes under the output folder when no ``tree`` is given
DEFAULT_TREE = "_source_voc"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=2000, help="training images (default 2000)")
    parser.add_argument("--n-test", type=positive_int, default=500, help="test images (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--size", type=int, nargs=2, default=(128, 256), metavar=("MIN", "MAX"),
                        help="image width and height are drawn uniformly from MIN..MAX px (default 128 256)")
    parser.add_argument("--tree", "--keep-tree", dest="tree", type=Path, default=None, metavar="DIR",
                        help="where to write the generated VOC tree (DIR/VOCdevkit/VOCDEMO); "
                             f"default OUT/{DEFAULT_TREE}. A complete tree with the same arguments is reused")


def plan(tree: Path | None = None, *, out: Path | None = None, n_train: int = 2000, n_test: int = 500,
         seed: int = 0, size: tuple[int, int] = (128, 256), workers: int = 1, progress: bool = True) -> IngestPlan:
    """Generate (or reuse) the demo tree under ``tree`` (default ``out/_source_voc``) and plan its ingest.

    ``workers`` processes draw the images (the files do not depend on it); ``progress`` prints one line
    about the tree to stderr.
    """
    min_size, max_size = size
    if not MIN_IMAGE_SIZE <= min_size <= max_size <= MAX_IMAGE_SIZE:
        raise IngestError(f"--size {min_size} {max_size}: expected MIN MAX with "
                          f"{MIN_IMAGE_SIZE} <= MIN <= MAX <= {MAX_IMAGE_SIZE}")
    if tree is None:
        if out is None:
            raise ValueError("pass tree (where the VOC tree goes) or out (the dataset folder: the tree goes under it)")
        tree = Path(out) / DEFAULT_TREE
    devkit, _ = ensure_voc_tree(Path(tree), n_train=n_train, n_test=n_test, seed=seed, min_size=min_size,
                                max_size=max_size, workers=workers, verbose=progress)
    # Only what the output depends on: the writer compares ``source`` when it resumes an interrupted
    # ingest, so nothing here may differ between a run that generated the tree and one that reused it.
    source = {
        "generator": GENERATOR_ID,
        "tree": str(devkit.resolve()),
        "params": tree_params(n_train, n_test, seed, min_size, max_size),
    }
    return voc.plan_from_devkit(devkit, list(CLASSES), NAME, source)
