"""Benchmark: cost of the large-loss schemes against Naive AN.

Measures (median wall time and median CPU time of the process over interleaved repeats, so that drift in a
shared machine hits every method alike; on a shared CPU the CPU time is the steadier figure):

1. the loss alone (compute_loss forward + backward to the logits) at B x K = 72 x 5000 and 288 x 5000
   (OpenImages per-GPU batch sizes) for AN, LL-Ct (epoch 2 and epoch 10, i.e. k = 0.2 % and 1.8 % of B*K),
   LL-Cp and LL-R;
2. one training step (forward, loss, backward, SGD step) of torchvision's ResNet-18 with 20 outputs on
   16 x 3 x 128 x 128 random images, with AN and with LL-Ct.

The loss is called as the trainer calls it (``check=False``: no host sync; checkouts before that keyword
existed are called without it, so the same script measures them). The ratios against AN are printed last.
Targets are single-positive (one observed positive per image,
everything else unknown), the setting of the paper's artificial datasets.

    python tests/bench/loss.py                      # CPU or the first GPU if there is one
    python tests/bench/loss.py --device cpu --threads 2 --repeats 15 --step-repeats 8
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

if "largeloss" not in sys.modules:  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2])]
    sys.modules["largeloss"] = _pkg

from largeloss.train.losses import LossConfig, compute_loss  # noqa: E402

#: the trainer's call (train/loop.py train_step): no host sync in the loss
TRAINER_KWARGS = {"check": False} if "check" in inspect.signature(compute_loss).parameters else {}

#: (label, method, epoch) of the loss variants timed against AN; delta_rel = 0.2 % throughout
VARIANTS = (
    ("an", "an", 2),
    ("ll_ct t=2", "ll_ct", 2),
    ("ll_ct t=10", "ll_ct", 10),
    ("ll_cp", "ll_cp", 5),
    ("ll_r t=10", "ll_r", 10),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sizes", default="72x5000,288x5000", help="comma-separated BxK for the loss-alone timing")
    p.add_argument("--delta-rel", type=float, default=0.2, help="delta_rel in percent (default 0.2)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per loss variant")
    p.add_argument("--step-repeats", type=int, default=6, help="timed training steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed repeats before timing")
    p.add_argument("--step-batch", type=int, default=16)
    p.add_argument("--step-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--skip-step", action="store_true", help="time the loss alone only")
    args = p.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must look like 72x5000,288x5000, got {args.sizes!r}")
    if any(len(s) != 2 or min(s) < 1 for s in args.sizes):
        p.error(f"--sizes must look like 72x5000,288x5000, got {args.sizes!r}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_positive(batch: int, classes: int, device: torch.device, gen: torch.Generator):
    target = torch.zeros(batch, classes, device=device)
    pos = torch.randint(0, classes, (batch,), generator=gen).to(device)
    target[torch.arange(batch, device=device), pos] = 1.0
    return target, target == 0


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int,
                     device: torch.device) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each fn; one call of every fn per round, so drift is shared."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


def loss_fns(batch: int, classes: int, delta_rel: float, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, classes, generator=gen) * 2 - 4).to(device).requires_grad_(True)
    target, unknown = single_positive(batch, classes, device, gen)

    def make(method: str, epoch: int):
        cfg = LossConfig(method=method, delta_rel=delta_rel)

        def fn():
            logits.grad = None
            compute_loss(logits, target, unknown, epoch, cfg, **TRAINER_KWARGS).loss.backward()
        return fn

    return {label: make(method, epoch) for label, method, epoch in VARIANTS}


def step_fns(batch: int, size: int, delta_rel: float, device: torch.device):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=20).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    target, unknown = single_positive(batch, 20, device, gen)

    def make(method: str, epoch: int):
        cfg = LossConfig(method=method, delta_rel=delta_rel)

        def fn():
            opt.zero_grad(set_to_none=True)
            out = compute_loss(model(images), target, unknown, epoch, cfg, **TRAINER_KWARGS)
            out.loss.backward()
            opt.step()
        return fn

    steps = {"an": make("an", 2), "ll_ct t=2": make("ll_ct", 2), "ll_ct t=10": make("ll_ct", 10)}
    return steps, loss_fns(batch, 20, delta_rel, device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# device: {name}; torch {torch.__version__}; delta_rel {args.delta_rel} %; "
          f"load average {os.getloadavg()[0]:.2f}")

    rows: list[tuple[str, str, tuple[float, float]]] = []  # (what, variant, (wall, CPU) seconds)
    for batch, classes in args.sizes:
        med = time_interleaved(loss_fns(batch, classes, args.delta_rel, device), args.repeats, args.warmup, device)
        rows += [(f"loss {batch}x{classes}", label, sec) for label, sec in med.items()]

    step_overhead = None
    if not args.skip_step:
        steps, small_losses = step_fns(args.step_batch, args.step_size, args.delta_rel, device)
        med = time_interleaved(steps, args.step_repeats, args.warmup, device)
        what = f"step resnet18 {args.step_batch}x3x{args.step_size}^2"
        rows += [(what, label, sec) for label, sec in med.items()]
        small = time_interleaved({k: small_losses[k] for k in ("an", "ll_ct t=2", "ll_ct t=10")},
                                 args.repeats, args.warmup, device)
        rows += [(f"loss {args.step_batch}x20", label, sec) for label, sec in small.items()]
        step_overhead = {label: (small[label][0] - small["an"][0]) / med["an"][0]
                         for label in ("ll_ct t=2", "ll_ct t=10")}

    print(f"\n{'what':<28} {'variant':<12} {'median ms':>10} {'CPU ms':>10}")
    for what, label, (sec, cpu) in rows:
        print(f"{what:<28} {label:<12} {sec * 1e3:>10.3f} {cpu * 1e3:>10.3f}")
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")

    print("\nratios against AN (same measurement group), wall and CPU:")
    base = {what: times for what, label, times in rows if label == "an"}
    for what, label, (sec, cpu) in rows:
        if label != "an":
            print(f"  {what:<28} {label:<12} x{sec / base[what][0]:.3f}  x{cpu / base[what][1]:.3f}")
    if step_overhead is not None:
        for label, frac in step_overhead.items():
            print(f"  step overhead of {label} from loss-alone times (LL - AN) / step: {frac * 100:+.3f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
