"""Benchmark: the CPU shard loader against the usual PIL + torchvision pipeline, in one run.

Generates its own JPEGs (gradients, random shapes and noise; 500x375 by default, quality 90, 4:2:0),
writes them once as plain files and once as shards with the project's writer, then times:

1. single-image JPEG decoding to RGB, one thread: simplejpeg vs OpenCV (why the loader uses simplejpeg);
2. one training epoch through ``shards.loader.ShardLoader`` (uint8 [B,3,S,S] batches; normalisation is
   done later on the device), and one through the reference: ``PIL.Image.open(...).convert("RGB")`` +
   torchvision ``Resize((S,S))``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` in a
   ``DataLoader(shuffle=True)`` over the same files, with the same batch size and number of workers.
   Each pipeline runs ``--repeats`` epochs, interleaved so that drift on a shared machine hits both
   alike; the best epoch of each counts. Worker start-up is inside the timed epoch for both. The main
   process runs torch with ``--torch-threads`` (default 1) for both.

The ratio (ours / reference images per second) is printed last.

    python tests/bench/loader.py                              # 400 images, 2 workers, 448 px
    python tests/bench/loader.py --images 300 --workers 2 --repeats 2
    python tests/bench/loader.py --bounded 224:256,448:512 --width 1024 --height 768   # ingest --max-side

It also prints the loader's CPU time per image divided by that of ``shards.jpeg.decode_image`` alone
(decode + resize, one thread) on the same files: what the loader costs beyond the work it cannot avoid.
``--bounded S:N,...`` measures instead, on the same generated JPEGs, the loader at S px over shards of the
source bytes and over ``ingest --max-side N`` shards (CPU time of all processes per image, and images per
CPU second = per core), and the ingest CPU per image of each.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

if "largeloss" not in sys.modules:  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2])]
    sys.modules["largeloss"] = _pkg

from largeloss.shards.format import UNLISTED_NEGATIVE, IngestPlan, Record  # noqa: E402
from largeloss.shards.jpeg import decode_image  # noqa: E402
from largeloss.shards.loader import ShardLoader  # noqa: E402
from largeloss.shards.tar import iter_samples  # noqa: E402
from largeloss.shards.writer import write_dataset  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like BGR image: a smooth two-axis gradient, 6-12 filled shapes, Gaussian noise (sigma 6)."""
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    a, b, c = rng.uniform(0, 255, (3, 3))
    img = a + (b - a) * x + (c - a) * y * 0.5
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(6, 13)):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, min(width, height) // 3))
        if rng.random() < 0.5:
            cv2.circle(img, (cx, cy), r, colour, thickness=-1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r // 2), colour, thickness=-1)
    noisy = img.astype(np.int16) + rng.normal(0, 6, img.shape).astype(np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def ingest(files: list[Path], out: Path, shard_size: int, max_side: int | None = None) -> float:
    """Write ``files`` as shards with the project's writer (one loader thread); its CPU seconds (all threads)."""
    records = [Record(source_id=str(i), rel_path=p.name, pos=[0], path=str(p)) for i, p in enumerate(files)]
    plan = IngestPlan(
        dataset="bench",
        classes=[{"index": 0, "id": "c0", "name": "c0"}],
        splits={"train": records},
        unlisted=UNLISTED_NEGATIVE,
    )
    c0 = time.process_time()
    bound = {} if max_side is None else {"max_side": max_side}  # so that the bench also runs on older checkouts
    write_dataset(out, plan, shard_size=shard_size, workers=1, progress=False, **bound)
    return time.process_time() - c0


def generate(out: Path, n: int, width: int, height: int, shard_size: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    (out / "jpg").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ok, buf = cv2.imencode(".jpg", make_image(rng, width, height), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        path = out / "jpg" / f"{i:06d}.jpg"
        path.write_bytes(buf.tobytes())
        files.append(path)
    ingest(files, out / "shards", shard_size)
    return files


def time_decode_resize(blobs: list[bytes], size: int, rounds: int = 3) -> float:
    """CPU milliseconds per image of ``shards.jpeg.decode_image`` (decode + antialiased resize to S x S), one
    thread, best of ``rounds`` passes: the floor of any loader's CPU cost per image on these files."""
    best = float("inf")
    for _ in range(rounds):
        c0 = time.process_time()
        for b in blobs:
            decode_image(b, size)
        best = min(best, time.process_time() - c0)
    return best / len(blobs) * 1e3


def time_decoders(files: list[Path], rounds: int = 5) -> dict[str, float]:
    """Milliseconds per image to decode to RGB, one thread, best of ``rounds`` interleaved passes."""
    blobs = [p.read_bytes() for p in files]
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)

    def opencv(b: bytes) -> np.ndarray:
        if rgb_flag is not None:
            return cv2.imdecode(np.frombuffer(b, np.uint8), rgb_flag | cv2.IMREAD_IGNORE_ORIENTATION)
        bgr = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    decoders = {
        "simplejpeg": lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"),
        "opencv": opencv,
    }
    best = {name: float("inf") for name in decoders}
    for _ in range(rounds):  # interleaved, so that load from elsewhere hits both decoders alike
        for name, fn in decoders.items():
            t0 = time.perf_counter()
            for b in blobs:
                fn(b)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: secs / len(blobs) * 1e3 for name, secs in best.items()}


class ReferenceFiles(Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files = files
        self.transform = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), i


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the DataLoader workers, joined per epoch)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_epoch(loader, size: int) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds of all processes) of one pass; workers start inside it."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    n = 0
    for images, ids in loader:
        assert images.shape[1:] == (3, size, size)
        n += len(ids)
    wall = time.perf_counter() - t0
    del loader  # joins the workers so that their CPU time is counted
    return n, wall, cpu_seconds() - c0


def epoch_ours(root: Path, args: argparse.Namespace, epoch: int, size: int | None = None) -> tuple[int, float, float]:
    loader = ShardLoader(root, "train", batch_size=args.batch_size, image_size=size or args.size, train=True,
                         num_workers=args.workers, seed=args.seed)
    loader.set_epoch(epoch)
    return run_epoch(loader, size or args.size)


def epoch_reference(files: list[Path], args: argparse.Namespace, epoch: int) -> tuple[int, float, float]:
    torch.manual_seed(args.seed + epoch)
    loader = DataLoader(ReferenceFiles(files, args.size), batch_size=args.batch_size, shuffle=True,
                        num_workers=args.workers, persistent_workers=False)
    return run_epoch(loader, args.size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="number of generated JPEGs (default 400)")
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--size", type=int, default=448, help="output side S (default 448, the paper's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same for both pipelines")
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2, help="epochs per pipeline, interleaved; the best counts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads of the main process, for both pipelines (default 1: on a busy "
                         "machine more threads made the reference's batch collation, a plain copy, ~100x slower)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--bounded", metavar="S:N,...", default=None,
                    help="instead: the loader at S px on the source shards against `ingest --max-side N` shards of "
                         "the same JPEGs, per S:N pair (use with --width 1024 --height 768), and the ingest CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    if args.bounded:
        cv2.setNumThreads(1)
        return bounded(args)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        work = args.dir or Path(tmp)
        t0 = time.perf_counter()
        files = generate(work, args.images, args.width, args.height, args.shard_size, args.seed)
        mean_kb = sum(p.stat().st_size for p in files) / len(files) / 1024
        print(f"generated {len(files)} JPEGs {args.width}x{args.height} (mean {mean_kb:.0f} KiB) and shards "
              f"in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
              f"workers {args.workers}, batch {args.batch_size}, S {args.size}")

        cv2.setNumThreads(1)
        dec = time_decoders(files)
        print("\ndecode to RGB, one thread (ms/image):")
        for name, ms in dec.items():
            print(f"  {name:<11} {ms:6.2f}")
        print(f"  -> {min(dec, key=dec.get)} is faster ({max(dec.values()) / min(dec.values()):.2f}x)")
        floor_ms = time_decode_resize([p.read_bytes() for p in files], args.size)
        print(f"decode + resize to {args.size} px alone (shards.jpeg.decode_image, one thread): {floor_ms:.2f} CPU "
              "ms/image")

        best = {"ours": (0, float("inf"), 0.0), "reference": (0, float("inf"), 0.0)}
        for rep in range(args.repeats):
            for name, fn in (("ours", lambda rep=rep: epoch_ours(work / "shards", args, rep)),
                             ("reference", lambda rep=rep: epoch_reference(files, args, rep))):
                n, wall, cpu = fn()
                if n != len(files):
                    raise RuntimeError(f"{name} yielded {n} images, expected {len(files)}")
                if wall < best[name][1]:
                    best[name] = (n, wall, cpu)

        rate = {name: n / wall for name, (n, wall, _) in best.items()}
        cpu_ms = {name: cpu / n * 1e3 for name, (n, _, cpu) in best.items()}
        print(f"\n{'pipeline (best of ' + str(args.repeats) + ' epochs)':<46} {'images':>7} {'seconds':>8} "
              f"{'images/s':>9} {'CPU ms/image':>13}")
        labels = {
            "ours": "ShardLoader (shards, simplejpeg+AA, uint8)",
            "reference": "PIL + torchvision (files, float, normalized)",
        }
        for name, (n, wall, _) in best.items():
            print(f"{labels[name]:<46} {n:>7} {wall:>8.2f} {rate[name]:>9.1f} {cpu_ms[name]:>13.2f}")
        print(f"\nCPU time per image, reference / ours: {cpu_ms['reference'] / cpu_ms['ours']:.2f}x "
              "(all processes; less sensitive to other load on the machine)")
        print(f"loader CPU / decode+resize CPU per image: {cpu_ms['ours']:.2f} / {floor_ms:.2f} ms = "
              f"{cpu_ms['ours'] / floor_ms:.2f}x (goal <= 1.4x)")
        print(f"ratio ours / reference (images/s): {rate['ours'] / rate['reference']:.2f}x (goal > 3x)")
    return 0


def bounded(args: argparse.Namespace) -> int:
    """``--bounded``: shards of the source JPEGs against ``ingest --max-side N`` shards, per (S, N) pair."""
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.bounded.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_bounded_") as tmp:
        work = args.dir or Path(tmp)
        files = generate(work, args.images, args.width, args.height, args.shard_size, args.seed)
        n = len(files)
        mean_kb = sum(p.stat().st_size for p in files) / n / 1024
        plain_cpu = min(ingest(files, work / f"plain{r}", args.shard_size) for r in range(2))
        print(f"{n} JPEGs {args.width}x{args.height} (mean {mean_kb:.0f} KiB); workers {args.workers}, batch "
              f"{args.batch_size}; ingest of the source bytes: {plain_cpu / n * 1e3:.2f} CPU ms/image (best of 2)")
        print(f"\n{'S':>4} {'shards':<16} {'KiB/img':>8} {'ingest CPU ms/img':>18} {'decode+resize ms':>17} "
              f"{'loader CPU ms/img':>18} {'img/s per core':>15} {'img/s (wall)':>13}")
        for size, max_side in pairs:
            roots = {"source bytes": work / "shards", f"--max-side {max_side}": work / f"max{max_side}"}
            ingest_ms = {"source bytes": plain_cpu / n * 1e3,
                         f"--max-side {max_side}": ingest(files, roots[f"--max-side {max_side}"], args.shard_size,
                                                          max_side) / n * 1e3}
            best = {name: (float("inf"), float("inf")) for name in roots}
            for rep in range(args.repeats):  # alternating, so that load from elsewhere hits both alike
                for name, root in roots.items():
                    got, wall, cpu = epoch_ours(root, args, rep, size)
                    assert got == n, (name, got)
                    best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
            for name, root in roots.items():
                blobs = []
                for tar in sorted((root / "train").glob("*.tar")):
                    blobs += [s.jpeg for s in iter_samples(tar)]
                floor_ms = time_decode_resize(blobs, size)
                cpu, wall = best[name]
                print(f"{size:>4} {name:<16} {sum(map(len, blobs)) / n / 1024:>8.1f} {ingest_ms[name]:>18.2f} "
                      f"{floor_ms:>17.2f} {cpu / n * 1e3:>18.2f} {n / cpu:>15.0f} {n / wall:>13.0f}")
            extra = ingest_ms[f"--max-side {max_side}"] - ingest_ms["source bytes"]
            gain = best["source bytes"][0] / best[f"--max-side {max_side}"][0]
            print(f"     -> at {size} px, --max-side {max_side}: x{gain:.2f} images per CPU second in the loader, "
                  f"for {extra:.2f} ms of ingest CPU per image once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
