"""Build a multi-label image set from Fashion-MNIST, written as a Pascal VOC tree for ``ingest voc --classes``.

    python experiments/fashion_mnist/build_voc.py --out data/fmnist_voc [--n-train 4000] [--n-test 1000] [--seed 0]
    ingest voc --root data/fmnist_voc/VOCdevkit --folder FMNIST --classes data/fmnist_voc/classes.txt \\
        --dataset fashion_mnist_ml --out data/fmnist

Source: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), which installs
the four original IDX files under ``/usr/share/datasets/fashion-mnist/`` (``--source`` to point elsewhere).

Layout of an image (fixed; every draw from ``numpy.random.default_rng([seed, split])``, split 0 = train, 1 = test):

- 112 x 112 RGB, black background, a 2 x 2 grid of 56 x 56 cells (cell (row, col) covers
  x in [56 col, 56 col + 56), y in [56 row, 56 row + 56));
- 1, 2, 3 or 4 items with probabilities 0.25 / 0.35 / 0.25 / 0.15 (mean 2.3), put into distinct cells
  drawn uniformly; the items' classes are distinct, drawn uniformly without replacement from the 10;
- an item is a Fashion-MNIST image of that class (train images come from the Fashion-MNIST training
  set, test images from its test set; no source image is used twice within a split), upscaled 28 -> 56
  with bilinear interpolation and copied into the three channels;
- labels: the set of item classes (complete: every other class is negative);
- box of an item: the tight box of the source pixels > 0, scaled by 2 and moved into its cell, in VOC's
  1-based inclusive pixel convention;
- JPEG quality 95 (OpenCV). Train ids ``fm_000000`` ... come first, then the test ids, in sorted order.

Class names (one word each, as ``--classes`` requires; ``T-shirt/top`` has a slash): tshirt_top, trouser,
pullover, dress, coat, sandal, shirt, sneaker, bag, ankle_boot (Fashion-MNIST label order).

Written tree: ``OUT/classes.txt``, ``OUT/VOCdevkit/FMNIST/{JPEGImages,Annotations,ImageSets/Main}`` with
``<class>_train.txt`` (train images) and ``<class>_val.txt`` (test images: ``ingest voc`` makes its ``val``
lists the test split) in VOC's ``"%s %2d"`` row format, plus ``train.txt`` and ``val.txt``.
"""
from __future__ import annotations

import argparse
import gzip
import struct
import sys
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FILES = {0: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         1: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
SIZE, CELL = 112, 56
N_ITEMS_P = (0.25, 0.35, 0.25, 0.15)  # 1, 2, 3, 4 items
FOLDER = "FMNIST"


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array: images (magic 2051) [N, 28, 28] or labels (2049) [N]."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found; `apt-get install dataset-fashion-mnist` installs it, or pass --source"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    got = struct.unpack(">I", data[:4])[0]
    if got != magic:
        raise ValueError(f"{path}: IDX magic {got}, expected {magic}")
    if magic == 2049:
        (n,) = struct.unpack(">I", data[4:8])
        arr = np.frombuffer(data, np.uint8, n, 8)
    else:
        n, rows, cols = struct.unpack(">III", data[4:16])
        arr = np.frombuffer(data, np.uint8, n * rows * cols, 16).reshape(n, rows, cols)
    return arr


def compose(rng: np.random.Generator, pools: list[np.ndarray], images: np.ndarray, cursor: list[int]):
    """One image: (uint8 [112, 112, 3], [(class, [xmin, ymin, xmax, ymax])])."""
    n = int(rng.choice(4, p=N_ITEMS_P)) + 1
    cells = rng.choice(4, size=n, replace=False)
    classes = rng.choice(len(CLASSES), size=n, replace=False)
    canvas = np.zeros((SIZE, SIZE), np.uint8)
    objects = []
    for cell, c in zip(cells, classes):
        if cursor[c] >= len(pools[c]):
            raise ValueError(f"Fashion-MNIST has only {len(pools[c])} images of class {CLASSES[c]} in this split; "
                             "ask for fewer images")
        src = images[pools[c][cursor[c]]]
        cursor[c] += 1
        r0, c0 = CELL * (cell // 2), CELL * (cell % 2)
        canvas[r0:r0 + CELL, c0:c0 + CELL] = cv2.resize(src, (CELL, CELL), interpolation=cv2.INTER_LINEAR)
        ys, xs = np.nonzero(src)
        # source pixel k covers upscaled pixels 2k, 2k+1 (0-based); VOC boxes are 1-based inclusive
        box = [c0 + 2 * int(xs.min()) + 1, r0 + 2 * int(ys.min()) + 1,
               c0 + 2 * int(xs.max()) + 2, r0 + 2 * int(ys.max()) + 2]
        objects.append((int(c), box))
    return np.repeat(canvas[:, :, None], 3, axis=2), objects


def annotation_xml(image_id: str, objects: list[tuple[int, list[int]]]) -> str:
    parts = ["<annotation>", f"\t<folder>{FOLDER}</folder>", f"\t<filename>{image_id}.jpg</filename>",
             f"\t<size><width>{SIZE}</width><height>{SIZE}</height><depth>3</depth></size>"]
    for c, (x0, y0, x1, y1) in objects:
        parts += ["\t<object>", f"\t\t<name>{CLASSES[c]}</name>", "\t\t<pose>Unspecified</pose>",
                  "\t\t<truncated>0</truncated>", "\t\t<difficult>0</difficult>",
                  f"\t\t<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>",
                  "\t</object>"]
    return "\n".join(parts + ["</annotation>"]) + "\n"


def build(out: Path, n_train: int, n_test: int, seed: int, source: Path = DEFAULT_SOURCE) -> Path:
    """Write the VOC tree under ``out``; returns the VOC folder (``out/VOCdevkit/FMNIST``)."""
    voc = out / "VOCdevkit" / FOLDER
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    lists: dict[str, list[tuple[str, set[int]]]] = {"train": [], "val": []}
    next_id = 0
    for split, count, list_name in ((0, n_train, "train"), (1, n_test, "val")):
        img_file, lab_file = FILES[split]
        images = read_idx(source / img_file, 2051)
        labels = read_idx(source / lab_file, 2049)
        rng = np.random.default_rng([seed, split])
        # per class, the source images in a random order; each is used at most once
        pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(CLASSES))]
        cursor = [0] * len(CLASSES)
        for _ in range(count):
            image_id = f"fm_{next_id:06d}"
            next_id += 1
            pixels, objects = compose(rng, pools, images, cursor)
            ok, jpg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError(f"OpenCV could not encode {image_id}")
            (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpg.tobytes())
            (voc / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, objects), encoding="utf-8")
            lists[list_name].append((image_id, {c for c, _ in objects}))
    main = voc / "ImageSets" / "Main"
    for list_name, rows in lists.items():
        (main / f"{list_name}.txt").write_text("".join(f"{i}\n" for i, _ in rows), encoding="utf-8")
        for c, name in enumerate(CLASSES):
            (main / f"{name}_{list_name}.txt").write_text(
                "".join("%s %2d\n" % (i, 1 if c in pos else -1) for i, pos in rows), encoding="utf-8")
    return voc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to write (classes.txt + VOCdevkit/FMNIST)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the Fashion-MNIST IDX .gz files")
    args = p.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1:
        p.error("--n-train and --n-test must be >= 1")
    try:
        voc = build(args.out, args.n_train, args.n_test, args.seed, args.source)
    except (FileNotFoundError, ValueError) as e:
        print(f"build_voc: error: {e}", file=sys.stderr)
        return 1
    print(f"build_voc: {args.n_train} train + {args.n_test} test images in {voc}; "
          f"classes in {args.out / 'classes.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
