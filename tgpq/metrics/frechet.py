"""Frechet distance between Gaussians fitted to feature sets (the FID formula, any feature space).

``d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``. The matrix square root follows
pytorch-fid's numerically careful recipe: ``scipy.linalg.sqrtm``; if the product is singular
(non-finite result) retry with ``eps * I`` added to both covariances; drop a negligible
imaginary part and raise if it is not negligible.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features`` ``[N, D]``, N >= 2."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    f = f.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64 math).

    ``mu*``: ``[D]``; ``sigma*``: ``[D, D]`` symmetric positive semi-definite. ``eps`` is added to
    the diagonals only when ``sigma1 @ sigma2`` has no finite square root.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {s1.shape} and {s2.shape}")
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
