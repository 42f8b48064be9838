"""GPU benchmark: the DALI data path against the CPU loader, and what feeds a ResNet-50 at 448 px.

Self-contained: generates ``--images`` JPEGs of 500x375 (VOC-like photos: colour fields, discs, sensor
noise; quality 90, ~90 KiB each) in a temporary folder, writes them as shards with ``shards.writer``, then
measures and prints ONE table:

1. loader images/s at ``--size`` (448) in training mode (shuffle + flip), second epoch of each (the first
   warms the page cache and DALI's buffers): ``DaliLoader`` (nvJPEG, ``device=cuda``) and ``ShardLoader``
   with ``--cpu-workers`` DataLoader workers (default: every core). The DALI loader is planned with the
   CPU loader's worker count, so both yield identical batches: the table says whether the ids matched;
2. DALI's host-side feed (``pread`` of the JPEG and the 4-byte ``.idx`` member, id check) in us/sample;
3. DALI GPU pixels against the CPU loader at 448 (eval and training mode, first batches): mean and max
   absolute difference (nvJPEG's IDCT differs from libjpeg-turbo by a few levels);
4. ResNet-50 training images/s (bf16 autocast, channels_last, ``--batch`` 64, SGD) on one synthetic
   in-memory uint8 batch, and fed by DALI exactly as train/loop.py does (``LabelStore.targets`` for the
   ids, copy to the device). Target: DALI-fed >= 90 % of synthetic;
5. LL-Ct vs Naive AN: the same training step (synthetic batch, single-positive targets over
   ``--classes`` classes, ``train.losses.compute_loss``) with method ``an`` and with ``ll_ct`` at epoch
   10 (k = 1.8 % of B*K, the largest k of a 10-epoch run), interleaved blocks, medians. Target <= 1 %;
6. peak GPU memory of the training runs: torch's peak allocation, and the device memory in use
   (``cudaMemGetInfo``: includes DALI's pools and the CUDA context).

Without a GPU the GPU rows are skipped with a note; the DALI rows then use DALI's CPU operators.
``--quick`` shrinks everything for a smoke run (on a CPU-only machine it also runs the training rows
with ``small_cnn`` at 64 px, marked as a smoke test, so that every code path runs)::

    python tests/bench/gpu.py                 # one H100/H200: a few minutes at most (budget: 8)
    python tests/bench/gpu.py --quick         # smoke run, CPU or GPU
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
if "largeloss" not in sys.modules:  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["largeloss"] = _pkg

import numpy as np  # noqa: E402
import torch  # noqa: E402

WIDTH, HEIGHT = 500, 375  # VOC's typical image


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: few images and steps")
    p.add_argument("--images", type=int, default=None, help="generated images (default 4096; --quick 96)")
    p.add_argument("--size", type=int, default=448, help="square input size (default 448)")
    p.add_argument("--batch", type=int, default=64, help="batch size of loaders and training (default 64)")
    p.add_argument("--classes", type=int, default=80, help="K of the training rows (default 80, COCO)")
    p.add_argument("--arch", default="resnet50", help="train.model architecture (default resnet50)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 40; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 10; --quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="AN / LL-Ct block pairs (default 7; --quick 1)")
    p.add_argument("--block", type=int, default=None, help="steps per AN / LL-Ct block (default 10; --quick 2)")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1, help="CPU loader workers (default: cores)")
    p.add_argument("--dali-threads", type=int, default=None, help="DALI CPU threads (default: the loader's)")
    p.add_argument("--hw-decoder-load", type=float, default=None,
                   help="share of images for the hardware JPEG decoder (default: DALI's)")
    p.add_argument("--tmp", default=None, help="where the generated dataset goes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the generated dataset")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("images", 4096, 96), ("steps", 40, 3), ("warmup", 10, 1), ("rounds", 7, 1),
                              ("block", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    return args


# ------------------------------------------------------------------------------------------ the dataset


NOISE_PAD = 256
_NOISE: list[np.ndarray] = []


def _noise() -> np.ndarray:
    """Gaussian noise, sigma 12, of (HEIGHT + NOISE_PAD) x (WIDTH + NOISE_PAD) x 3, drawn once."""
    if not _NOISE:
        rng = np.random.default_rng(12)
        _NOISE.append(rng.standard_normal((HEIGHT + NOISE_PAD, WIDTH + NOISE_PAD, 3), dtype=np.float32) * 12)
    return _NOISE[0]


def photo_jpeg(seed: int) -> bytes:
    """A 500x375 JPEG with photo-like statistics: colour field, discs and bars, sensor noise.

    The noise level is chosen so that the files average about 90 KiB, like VOC 2012's JPEGs (~95 KiB):
    JPEG decode time grows with the entropy-coded size.
    """
    import cv2

    rng = np.random.default_rng([seed, 0xB3])
    coarse = rng.random((HEIGHT // 10 + 2, WIDTH // 10 + 2, 3)).astype(np.float32) * 255
    img = cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(3, 9))):
        colour = tuple(float(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.circle(img, (int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))), int(rng.integers(10, 90)),
                       colour, -1, lineType=cv2.LINE_AA)
        else:
            x, y = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
            cv2.rectangle(img, (x, y), (x + int(rng.integers(10, 160)), y + int(rng.integers(10, 120))), colour, -1)
    # sensor noise: a random window of a shared noise field (drawing fresh normals per image would
    # dominate the generation time; the encoder sees independent noise in each image all the same)
    y, x = (int(v) for v in rng.integers(0, NOISE_PAD, 2))
    img = np.clip(img + _noise()[y : y + HEIGHT, x : x + WIDTH], 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def make_dataset(root: Path, n: int, classes: int) -> float:
    """Write ``n`` generated images as split ``train``; return the mean JPEG size in KiB."""
    from largeloss.shards.format import IngestPlan, Record
    from largeloss.shards.writer import write_dataset

    _noise()  # drawn once, before the threads share it
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # cv2 releases the GIL
        jpegs = list(pool.map(photo_jpeg, range(n)))
    rng = np.random.default_rng(0)
    records = [
        Record(source_id=str(i), rel_path=f"gen/{i}.jpg", pos=sorted(set(rng.integers(0, classes, 2).tolist())), data=j)
        for i, j in enumerate(jpegs)
    ]
    plan = IngestPlan(
        dataset="bench",
        classes=[{"index": c, "id": str(c), "name": f"class{c}"} for c in range(classes)],
        splits={"train": records},
        unlisted="negative",
    )
    write_dataset(root, plan, shard_size=256, workers=min(8, os.cpu_count() or 1), progress=False)
    return sum(len(j) for j in jpegs) / n / 1024


# ------------------------------------------------------------------------------------------ measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_epoch(loader, epoch: int, device: torch.device) -> tuple[float, list[list[int]]]:
    """(images/s, batch ids) of one full epoch, the images touched on ``device`` as a trainer would."""
    loader.set_epoch(epoch)
    ids_seen = []
    n = 0
    sync(device)
    t0 = time.perf_counter()
    for images, ids in loader:
        images = images.to(device, non_blocking=True)
        n += len(ids)
        ids_seen.append(ids.tolist())
    sync(device)
    return n / (time.perf_counter() - t0), ids_seen


def feed_cost_us(loader) -> float:
    """DALI's host-side work per sample: pread of the JPEG and the .idx member plus the id check."""
    ids = loader.schedule.plan().ids.tolist()
    reader = loader._reader
    for sid in ids[:64]:  # indexes parsed, files opened: steady state
        reader.read(sid)
    t0 = time.perf_counter()
    for sid in ids:
        reader.read(sid)
    return (time.perf_counter() - t0) / len(ids) * 1e6


def pixel_agreement(dali_loader, cpu_loader, batches: int) -> tuple[float, int, bool]:
    """(mean |diff|, max |diff|, ids equal) over the first ``batches`` batches of epoch 1."""
    dali_loader.set_epoch(1)
    cpu_loader.set_epoch(1)
    total, count, mx, same = 0.0, 0, 0, True
    for i, ((d_img, d_ids), (c_img, c_ids)) in enumerate(zip(dali_loader, cpu_loader)):
        if i >= batches:
            break
        same &= d_ids.tolist() == c_ids.tolist()
        diff = (d_img.cpu().int() - c_img.int()).abs()
        total += float(diff.double().sum())
        count += diff.numel()
        mx = max(mx, int(diff.max()))
    return total / max(count, 1), mx, same


class Trainer:
    """One training step as train/loop.py takes it (autocast, compute_loss, backward, SGD)."""

    def __init__(self, arch: str, classes: int, device: torch.device):
        from largeloss.train.model import build_model

        self.device = device
        self.model = build_model(arch, classes, "none").to(device).to(memory_format=torch.channels_last)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.amp = device.type == "cuda"

    def step(self, images: torch.Tensor, target: torch.Tensor, unknown: torch.Tensor, epoch: int, cfg) -> None:
        from largeloss.train.losses import compute_loss

        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(images)
        out = compute_loss(logits.float(), target, unknown, epoch, cfg)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()


def single_positive(batch: int, classes: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(batch, classes)
    target[torch.arange(batch), torch.randint(0, classes, (batch,), generator=g)] = 1.0
    return target.to(device), (target == 0).to(device)


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t0


def memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_now(device: torch.device) -> tuple[float, float]:
    """(torch's peak allocation, device memory in use) in GiB."""
    free, total = torch.cuda.mem_get_info(device)
    return torch.cuda.max_memory_allocated(device) / 2**30, (total - free) / 2**30


def endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 1
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from largeloss.shards import dali
    from largeloss.shards.jpeg import decode_scale
    from largeloss.shards.labelstore import LabelStore
    from largeloss.shards.loader import ShardLoader
    from largeloss.train.losses import LossConfig, num_to_modify

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        torch.backends.cudnn.benchmark = True
    have_dali = dali.available(device) if gpu else _dali_imports()
    rows: list[tuple[str, str, str]] = []  # (measurement, value, target / note)

    def row(what: str, value: str, note: str = "") -> None:
        rows.append((what, value, note))

    tmp = Path(tempfile.mkdtemp(prefix="largeloss-gpu-bench-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        kib = make_dataset(tmp / "ds", args.images, args.classes)
        root = str(tmp / "ds")
        row("dataset", f"{args.images} x {WIDTH}x{HEIGHT} JPEG",
            f"mean {kib:.0f} KiB, written in {time.perf_counter() - t0:.1f} s")
        S, B = args.size, args.batch
        common = dict(batch_size=B, image_size=S, train=True, seed=0)
        dali_kw = {"num_threads": args.dali_threads, "hw_decoder_load": args.hw_decoder_load}

        # ---- 1-3: loaders
        cpu_loader = ShardLoader(root, "train", num_workers=args.cpu_workers, **common)
        loader_epoch(cpu_loader, 0, device)  # warm-up: page cache, worker start-up paths
        cpu_rate, cpu_ids = loader_epoch(cpu_loader, 1, device)
        row(f"CPU loader img/s @{S} ({args.cpu_workers} workers)", f"{cpu_rate:.0f}", "ShardLoader, train mode")
        if have_dali:
            dali_dev = device if gpu else None
            dali_loader = dali.DaliLoader(root, "train", device=dali_dev, **common, **dali_kw)
            loader_epoch(dali_loader, 0, device)
            dali_rate, dali_ids = loader_epoch(dali_loader, 1, device)
            kind = "GPU, nvJPEG" if gpu else "CPU operators (no GPU)"
            row(f"DALI loader img/s @{S} ({kind})", f"{dali_rate:.0f}",
                f"x{dali_rate / cpu_rate:.2f} of CPU; same batches as CPU: {'yes' if dali_ids == cpu_ids else 'NO'}")
            row("DALI host feed per sample", f"{feed_cost_us(dali_loader):.1f} us",
                "pread JPEG + .idx member, id check")
            eval_kw = dict(batch_size=B, image_size=S, train=False, seed=0)
            if decode_scale(HEIGHT, WIDTH, S) == 1:
                expect = "expect mean <= 1 on GPU (nvJPEG's IDCT), <= 0.3 on CPU (rounding of one filter)"
            else:  # the CPU loader decodes at a reduced DCT scale, DALI filters: see shards/dali.py
                expect = f"1/{decode_scale(HEIGHT, WIDTH, S)} DCT-scale decode on the CPU side: a few levels mean"
            n_check = 2 if not args.quick else 1
            for train in (False, True):
                kw = dict(eval_kw, train=train)
                d = dali.DaliLoader(root, "train", device=dali_dev, **kw, **dali_kw)
                c = ShardLoader(root, "train", num_workers=0, **kw)
                mean, mx, same = pixel_agreement(d, c, n_check)
                row(f"DALI vs CPU pixels @{S} ({'train, flips' if train else 'eval'})", f"mean {mean:.2f} / max {mx}",
                    f"ids equal: {'yes' if same else 'NO'}; {expect}")
                d.close()
            dali_loader.close()  # its pipeline and buffers must not count in the training rows' memory
        else:
            row(f"DALI loader img/s @{S}", "skipped", "DALI cannot be imported")

        # ---- 4-6: training
        arch, size, batch, smoke = args.arch, S, B, ""
        if not gpu:
            if not args.quick:
                row(f"{args.arch} training img/s @{S}", "skipped", "no GPU (run with --quick for a CPU smoke test)")
                row("LL-Ct vs AN step time", "skipped", "no GPU")
                row("peak GPU memory", "skipped", "no GPU")
                return _finish(rows, args, device)
            arch, size, batch, smoke = "small_cnn", 64, 8, " [CPU smoke test, not a measurement]"
        trainer = Trainer(arch, args.classes, device)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        target, unknown = single_positive(batch, args.classes, device)
        an = LossConfig(method="an")
        ll_ct = LossConfig(method="ll_ct", delta_rel=0.2)

        memory_reset(device)
        timed(lambda: trainer.step(images, target, unknown, 1, an), args.warmup, device)
        synth = args.steps * batch / timed(lambda: trainer.step(images, target, unknown, 1, an), args.steps, device)
        row(f"{arch} train img/s @{size}, synthetic batch {batch}", f"{synth:.0f}",
            "bf16 autocast, channels_last" + smoke)
        if gpu:
            peak, used = memory_now(device)
            row("peak GPU memory, synthetic training", f"{peak:.2f} GiB", f"torch peak; device in use {used:.2f} GiB")

        if have_dali:
            store = LabelStore(os.path.join(root, "train", "labels.arrow"), args.classes, "single_positive")
            fed_loader = dali.DaliLoader(root, "train", device=device if gpu else None, batch_size=batch,
                                         image_size=size, train=True, seed=0, **dali_kw)
            stream = endless(fed_loader)

            def fed_step() -> None:
                imgs, ids = next(stream)
                t, u = store.targets(ids.numpy())  # as train/loop.py: labels by id on the host
                trainer.step(imgs, t.to(device, non_blocking=True), u.to(device, non_blocking=True), 1, an)

            memory_reset(device)
            timed(fed_step, args.warmup, device)
            fed = args.steps * batch / timed(fed_step, args.steps, device)
            row(f"{arch} train img/s @{size}, fed by DALI", f"{fed:.0f}",
                f"{100 * fed / synth:.1f} % of synthetic (target >= 90 %)" + smoke)
            if gpu:
                peak, used = memory_now(device)
                row("peak GPU memory, DALI-fed training", f"{peak:.2f} GiB",
                    f"torch peak; device in use {used:.2f} GiB (incl. DALI)")
            stream.close()
            fed_loader.close()

        times: dict[str, list[float]] = {"an": [], "ll_ct": []}
        for _ in range(args.rounds):
            for name, cfg, epoch in (("an", an, 10), ("ll_ct", ll_ct, 10)):
                dt = timed(lambda cfg=cfg, epoch=epoch: trainer.step(images, target, unknown, epoch, cfg),
                           args.block, device)
                times[name].append(dt / args.block)
        t_an, t_ll = statistics.median(times["an"]), statistics.median(times["ll_ct"])
        k = num_to_modify(batch * args.classes, 10, ll_ct)
        row(f"step time AN / LL-Ct (t=10, k={k} of {batch}x{args.classes})", f"{t_an * 1e3:.2f} / {t_ll * 1e3:.2f} ms",
            f"LL-Ct overhead {100 * (t_ll / t_an - 1):+.2f} % (target <= 1 %)" + smoke)
        return _finish(rows, args, device)
    finally:
        if args.keep:
            print(f"# dataset kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _dali_imports() -> bool:
    try:
        from largeloss.shards.dali import _import_dali

        _import_dali()
    except ImportError:
        return False
    return True


def _finish(rows: list[tuple[str, str, str]], args: argparse.Namespace, device: torch.device) -> int:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    try:
        import nvidia.dali as nd

        dali_version = nd.__version__
    except ImportError:
        dali_version = "not installed"
    print(f"# {name}; torch {torch.__version__}; DALI {dali_version}; {'--quick ' if args.quick else ''}"
          f"size {args.size}, batch {args.batch}, {args.images} images")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'measurement':<{w0}}  {'value':>{w1}}  note")
    print(f"{'-' * w0}  {'-' * w1}  ----")
    for what, value, note in rows:
        print(f"{what:<{w0}}  {value:>{w1}}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
