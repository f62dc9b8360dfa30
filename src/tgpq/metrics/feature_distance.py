"""Feature Frechet distance (FID's formula in the shipped CIFAR-10 classifier's feature space).

Always available offline: the classifier and the CIFAR-10 train-set feature statistics ship in
``tgpq/assets``. Values are not comparable with Inception FID (different feature space, D =
``feature_dim`` of the classifier); compare models with the same number of images, since the
estimate is biased upwards for small N.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .classifier import ASSET_DIR, classifier_features
from .frechet import feature_stats, frechet_distance
from .precision_recall import precision_recall

TRAIN_FEATURE_STATS = ASSET_DIR / "cifar10_train_feature_stats.safetensors"
_STATS_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load_train_feature_stats(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])`` float64 of the classifier features of the 50000 CIFAR-10 train images."""
    from safetensors.numpy import load_file

    path = Path(path) if path is not None else TRAIN_FEATURE_STATS
    key = str(path.resolve())
    if key not in _STATS_CACHE:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: feature statistics not found (run benchmarks/train_classifier.py)")
        d = load_file(str(path))
        if set(d) != {"mu", "sigma"}:
            raise ValueError(f"{path}: expected tensors 'mu' and 'sigma', found {sorted(d)}")
        _STATS_CACHE[key] = (d["mu"].astype(np.float64), d["sigma"].astype(np.float64))
    return _STATS_CACHE[key]


def _features(x, batch_size: int) -> torch.Tensor:
    """Classifier features of an image batch; ``x`` itself when it is already ``[N, D]`` features (2-D)."""
    x_t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return x_t if x_t.ndim == 2 else classifier_features(x_t, batch_size=batch_size)


def feature_frechet_distance(images, reference_stats: tuple[np.ndarray, np.ndarray] | None = None,
                             batch_size: int = 500) -> float:
    """Frechet distance between the classifier features of ``images`` and the reference statistics.

    ``images``: uint8 NHWC ``[N, 32, 32, 3]`` or float NCHW ``[N, 3, 32, 32]`` in [-1, 1], N >= 2
    (or ``[N, D]`` features already computed with ``classifier_features``, recognised by being 2-D).
    ``reference_stats``: ``(mu, sigma)``; defaults to the shipped CIFAR-10 train statistics.
    """
    mu_ref, sigma_ref = reference_stats if reference_stats is not None else load_train_feature_stats()
    mu, sigma = feature_stats(_features(images, batch_size))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def classifier_precision_recall(images, reference_images, k: int = 3, batch_size: int = 500) -> dict[str, float]:
    """k-NN manifold precision/recall (Kynkaanniemi et al. 2019) of ``images`` vs ``reference_images``.

    Both are image batches as for ``feature_frechet_distance`` (or ``[N, D]`` feature tensors
    already computed with ``classifier_features``, recognised by being 2-D).
    """
    return precision_recall(_features(reference_images, batch_size), _features(images, batch_size), k=k)
