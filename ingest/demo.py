"""``ingest demo``: the built-in demo dataset, composed on the spot from real handwritten digits and ingested as a
VOC tree.

The demo exists so that the whole pipeline (ingest -> shards -> train with the large-loss schemes -> eval)
runs on a laptop CPU in minutes with no download. ``plan`` has ``ingest/demo_images.py`` write (or
reuse) a VOC-layout folder and hands it to the VOC adapter (``voc.plan_from_devkit``), so the demo also
exercises the real VOC parser. Where the pixels come from, how the images are composed and the tree they
are written as: the docstring of ``ingest/demo_images.py``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..shards.format import IngestError, IngestPlan
from . import voc
from .argtypes import positive_int
from .demo_images import CLASSES, GENERATOR_ID, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ensure_voc_tree, tree_params

NAME = "demo"
HELP = "compose the built-in demo dataset (real handwritten digits, 10 classes, VOC layout) and ingest it"
DESCRIPTION = """\
Compose a small multi-label image set from real handwritten digits and ingest it; nothing is downloaded.

The digits are the 1,797 8 x 8 handwritten digits that ship inside scikit-learn (the UCI "Optical
Recognition of Handwritten Digits" test set). Each image (--size px square, default 64) is a 2 x 2 grid
holding 1-4 digits of distinct classes (mean 2.3), each at 75-100 % of its cell and a random position in
it. Labels are complete: every digit shown is positive, every other class negative. Training and test
images draw their digits from disjoint pools (80 / 20 % of each class), so no digit of a test image was
seen in training. Under the single-positive protocol about 57 % of the true positives are missing.

The composed images are written as a Pascal VOC tree (JPEGImages, Annotations, ImageSets/Main lists,
classes.txt) to --tree (default: OUT/_source_voc/VOCdevkit/VOCDEMO) and ingested with the VOC adapter:
"train" is the VOC train list, "test" the VOC val list. The same arguments give byte-identical files; a
complete tree written with the same arguments is reused. The docstring of ingest/demo_images.py gives the
exact distributions.
"""
#: where the tree goes under the output folder when no ``tree`` is given
DEFAULT_TREE = "_source_voc"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-train", type=positive_int, default=2000, help="training images (default 2000)")
    parser.add_argument("--n-test", type=positive_int, default=500, help="test images (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="composition seed (default 0)")
    parser.add_argument("--size", type=positive_int, default=64, metavar="PX",
                        help=f"image side in pixels, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (default 64)")
    parser.add_argument("--tree", "--keep-tree", dest="tree", type=Path, default=None, metavar="DIR",
                        help="where to write the composed VOC tree (DIR/VOCdevkit/VOCDEMO); "
                             f"default OUT/{DEFAULT_TREE}. A complete tree with the same arguments is reused")


def plan(tree: Path | None = None, *, out: Path | None = None, n_train: int = 2000, n_test: int = 500,
         seed: int = 0, size: int = 64, progress: bool = True) -> IngestPlan:
    """Compose (or reuse) the demo tree under ``tree`` (default ``out/_source_voc``) and plan its ingest.

    ``progress`` prints one line about the tree to stderr.
    """
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise IngestError(f"--size {size}: expected {MIN_IMAGE_SIZE} <= PX <= {MAX_IMAGE_SIZE}")
    if tree is None:
        if out is None:
            raise ValueError("pass tree (where the VOC tree goes) or out (the dataset folder: the tree goes under it)")
        tree = Path(out) / DEFAULT_TREE
    devkit, _ = ensure_voc_tree(Path(tree), n_train=n_train, n_test=n_test, seed=seed, size=size, verbose=progress)
    # Only what the output depends on: the writer compares ``source`` when it resumes an interrupted
    # ingest, so nothing here may differ between a run that composed the tree and one that reused it.
    source = {
        "generator": GENERATOR_ID,
        "tree": str(devkit.resolve()),
        "params": tree_params(n_train, n_test, seed, size),
    }
    return voc.plan_from_devkit(devkit, list(CLASSES), NAME, source)
