"""The small CIFAR-10 classifier tgpq ships, used as a feature extractor for quality metrics.

Network: a small ResNet-9-style CNN (conv-BN-ReLU blocks, max-pool downsampling, one residual
block per stage), sized to train in tens of minutes on two shared CPU cores. Input: float ``[B, 3, 32, 32]`` NCHW in ``[-1, 1]`` (the diffusion sample convention).
Features: the global-average-pooled output of the last stage, ``[B, feature_dim]``
(``feature_dim = widths[-1]``), the input of the final linear layer. Weights and config live in
``tgpq/assets/cifar10_classifier.{safetensors,json}``, written by ``benchmarks/train_classifier.py``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
CLASSIFIER_WEIGHTS = ASSET_DIR / "cifar10_classifier.safetensors"
CLASSIFIER_CONFIG = ASSET_DIR / "cifar10_classifier.json"


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """``x + f(x)`` with ``f`` two conv-BN-ReLU blocks at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CifarResNet(nn.Module):
    """ResNet-9-style CIFAR classifier.

    Stem: conv-BN-ReLU with ``stem`` channels at 32x32, then 2x2 max-pool (-> 16x16). Then three
    stages of widths ``widths``: each is conv-BN-ReLU, 2x2 max-pool (16 -> 8 -> 4 -> 2), residual
    block. Global average pool of the last stage gives the ``widths[-1]``-d features.
    """

    def __init__(self, stem: int = 24, widths: tuple[int, int, int] = (40, 80, 160), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(3, stem), nn.MaxPool2d(2))
        stages, cin = [], stem
        for w in widths:
            stages.append(nn.Sequential(_conv_bn_relu(cin, w), nn.MaxPool2d(2), _Residual(w)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 32, 32]`` float in [-1, 1] -> ``[B, feature_dim]`` pooled penultimate features."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 32, 32]`` float in [-1, 1] -> ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


def build_classifier(config: dict) -> CifarResNet:
    """Construct an untrained ``CifarResNet`` from the ``architecture`` dict of the asset JSON."""
    return CifarResNet(stem=int(config["stem"]), widths=tuple(int(w) for w in config["widths"]),
                       num_classes=int(config.get("num_classes", 10)))


_CACHE: dict[tuple[str, str], CifarResNet] = {}


def load_classifier(weights: str | Path | None = None, config: str | Path | None = None,
                    device: str | torch.device = "cpu") -> CifarResNet:
    """Load the shipped classifier in eval mode (float32, on ``device``); cached per path and device.

    Raises ``FileNotFoundError`` if the weights or config file is missing and ``ValueError`` if
    the weights do not match the architecture in the config.
    """
    from safetensors.torch import load_file

    weights = Path(weights) if weights is not None else CLASSIFIER_WEIGHTS
    config = Path(config) if config is not None else CLASSIFIER_CONFIG
    key = (str(weights.resolve()), str(torch.device(device)))
    if key in _CACHE:
        return _CACHE[key]
    for p in (weights, config):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: classifier asset not found (run benchmarks/train_classifier.py)")
    meta = json.loads(config.read_text())
    model = build_classifier(meta["architecture"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: keys do not match the classifier (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _CACHE[key] = model
    return model


def to_model_input(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Normalise images to float32 ``[B, 3, 32, 32]`` in [-1, 1].

    Accepts uint8 ``[B, 32, 32, 3]`` (NHWC, 0..255, as ``tgpq.eval.load_cifar10`` returns) or a
    floating ``[B, 3, 32, 32]`` NCHW tensor/array already in [-1, 1] (values are not clamped).
    """
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be 4-D (uint8 NHWC or float NCHW), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC with 3 channels, got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    if x.shape[1] != 3:
        raise ValueError(f"float images must be NCHW with 3 channels, got shape {tuple(x.shape)}")
    return x.float()


def _cifar_input(images) -> torch.Tensor:
    x = to_model_input(images)
    if x.shape[-2:] != (32, 32):
        raise ValueError(f"the CIFAR-10 classifier needs 32x32 images, got {tuple(x.shape[-2:])}")
    return x


@torch.no_grad()
def classifier_features(images: torch.Tensor | np.ndarray, batch_size: int = 500, model: CifarResNet | None = None,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Penultimate features of the shipped classifier: ``[N, feature_dim]`` float32 on the CPU.

    ``images``: uint8 NHWC ``[N, 32, 32, 3]`` or float NCHW ``[N, 3, 32, 32]`` in [-1, 1].
    """
    model = model if model is not None else load_classifier(device=device)
    x = _cifar_input(images)
    dev = next(model.parameters()).device
    out = [model.features(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.feature_dim)


@torch.no_grad()
def classifier_logits(images: torch.Tensor | np.ndarray, batch_size: int = 500, model: CifarResNet | None = None,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Class logits ``[N, 10]`` float32 of the shipped classifier (same input contract as features)."""
    model = model if model is not None else load_classifier(device=device)
    x = _cifar_input(images)
    dev = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(dev)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.head.out_features)
