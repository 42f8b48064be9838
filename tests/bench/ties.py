"""Benchmark: how often the k-th largest unknown loss is tied, with a bf16 backbone, before and after the
float32 head (train/model.py ``MultiLabelNet.classify``).

A tie at the k-th loss is where the two ``ll_selection`` rules differ (train/losses.py): ``official`` modifies
every tied entry and corrects for good only those strictly above, ``exact_k`` takes exactly k by index. The
official code trains in float32, where such ties are practically absent; under bf16 autocast a head that
rounds its logits to bf16 (8 significant bits) makes them common.

What runs: random feature maps stand for a bf16 backbone's output (ResNet-50 at 448 px: [B, 2048, 14, 14],
bf16), through a model's head in two ways, on the same maps:

- before: the head under bf16 autocast, as ``MultiLabelNet.forward`` did before (bf16 pool and Linear, so
  bf16 logits);
- after: ``MultiLabelNet.classify`` (float32 pool and Linear on the bf16 map, autocast off).

Assumptions (the tie rate depends on the spread of the logits): each channel of a sample's map is
ReLU(N(mu, 1)) with mu ~ N(0, 1) per sample and channel; the head's weights are scaled so the logits have
standard deviation 2 around the bias logit(epr_num_pos / K) (Cole et al.'s expected positives per image:
VOC 1.5 of 20, COCO 2.9 of 80, NUS-WIDE 1.9 of 81, CUB 31.4 of 312), a trained model's range. Labels are
single positive (one observed positive per image, the rest unknown). Per dataset, LL-R / LL-Ct / LL-Cp with
its delta_rel (configs/*.yaml) at epochs 2..10 with the official k; every batch counts once per epoch.
Printed: per (dataset, method), the share of batches whose k-th largest unknown loss equals another unknown
entry's loss, before and after.

    python tests/bench/ties.py                       # 300 batches of 16 per dataset: ~6 CPU-minutes
    python tests/bench/ties.py --batches 1000 --threads 2
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if "largeloss" not in sys.modules:  # run as a file from a checkout: its folders are the package largeloss.*
    import types

    _pkg = types.ModuleType("largeloss")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2])]
    sys.modules["largeloss"] = _pkg

from largeloss.train.losses import LossConfig, num_to_modify  # noqa: E402
from largeloss.train.model import MultiLabelNet  # noqa: E402

#: dataset -> (K, expected positives per image (Cole et al.), delta_rel of LL-R, LL-Ct, LL-Cp (configs/*.yaml))
DATASETS = {
    "VOC": (20, 1.5, (0.2, 0.2, 0.1)),
    "COCO": (80, 2.9, (0.4, 0.2, 0.2)),
    "NUS-WIDE": (81, 1.9, (0.4, 0.2, 0.2)),
    "CUB": (312, 31.4, (0.4, 0.4, 0.2)),
}
METHODS = ("ll_r", "ll_ct", "ll_cp")
FEAT_DIM, SPATIAL = 2048, 14
LOGIT_STD = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=300, help="batches per dataset (each used at epochs 2..10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def make_model(classes: int, expected_pos: float, gen: torch.Generator) -> MultiLabelNet:
    """A MultiLabelNet whose head maps the random maps to logits ~ N(logit(expected_pos / K), LOGIT_STD)."""
    model = MultiLabelNet(torch.nn.Identity(), FEAT_DIM, classes, (0.0,) * 3, (1.0,) * 3)
    # pooled features: mean over 196 positions of ReLU(N(mu, 1)), mu ~ N(0, 1): per-feature std ~0.5
    pooled = feature_maps(64, gen).float().mean(dim=(2, 3))
    spread = pooled.std(dim=0).mean().item()
    with torch.no_grad():
        model.head.weight.normal_(0.0, LOGIT_STD / (spread * math.sqrt(FEAT_DIM)), generator=gen)
        centred = model.head.weight @ pooled.mean(dim=0)
        p = expected_pos / classes
        model.head.bias.copy_(math.log(p / (1 - p)) - centred)
    return model


def feature_maps(batch: int, gen: torch.Generator) -> torch.Tensor:
    mu = torch.randn(batch, FEAT_DIM, 1, 1, generator=gen)
    return torch.relu(mu + torch.randn(batch, FEAT_DIM, SPATIAL, SPATIAL, generator=gen)).to(torch.bfloat16)


def kth_is_tied(logits: torch.Tensor, unknown: torch.Tensor, k: int) -> bool:
    """Whether the k-th largest loss among the unknown entries (BCE against 0, in float32 as compute_loss
    takes it) equals the loss of another unknown entry."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), torch.zeros_like(logits, dtype=torch.float32),
                                                reduction="none")[unknown]
    k = min(k, losses.numel())
    kth = torch.topk(losses, k).values[-1]
    return int((losses == kth).sum()) > 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    b = args.batch_size
    print(f"# torch {torch.__version__}, cpu, {torch.get_num_threads()} threads; {args.batches} batches of {b} per "
          f"dataset, epochs 2..10, ll_selection=official k")
    print(f"\n{'dataset':<9} {'method':<6} {'delta_rel':>9} {'k (t=2..10)':>16} {'tied before':>12} {'tied after':>11}")
    for name, (classes, expected_pos, deltas) in DATASETS.items():
        model = make_model(classes, expected_pos, gen)
        configs = {m: LossConfig(m, delta_rel=d) for m, d in zip(METHODS, deltas)}
        ks = {m: [num_to_modify(b * classes, t, cfg) for t in range(2, 11)] for m, cfg in configs.items()}
        tied = {m: [0, 0] for m in METHODS}
        for _ in range(args.batches):
            fmap = feature_maps(b, gen)
            with torch.no_grad():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    before = model.head(fmap.mean(dim=(2, 3)))  # the head as MultiLabelNet.forward ran it
                    after = model.classify(fmap)
            assert before.dtype == torch.bfloat16 and after.dtype == torch.float32
            unknown = torch.ones(b, classes, dtype=torch.bool)
            unknown[torch.arange(b), torch.randint(0, classes, (b,), generator=gen)] = False
            for m in METHODS:
                for k in ks[m]:
                    tied[m][0] += kth_is_tied(before, unknown, k)
                    tied[m][1] += kth_is_tied(after, unknown, k)
        n = args.batches * 9
        for m, d in zip(METHODS, deltas):
            k_range = f"{min(ks[m])}..{max(ks[m])}"
            before, after = (100 * t / n for t in tied[m])
            print(f"{name:<9} {m:<6} {d:>9} {k_range:>16} {before:>11.1f}% {after:>10.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
