"""Frechet distance between Gaussians fitted to feature sets (the FID formula, any feature space).

``d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``. Two ways to get ``Tr (S1 S2)^{1/2}``:

- ``method="sqrtm"`` (default, pytorch-fid's numerically careful recipe): ``scipy.linalg.sqrtm``
  of ``S1 S2``; if that is not finite (singular product) retry with ``eps * I`` added to both
  covariances; drop a negligible imaginary part and raise if it is not negligible. Slow for
  D = 2048 on a small CPU (a Schur decomposition of a non-symmetric matrix: tens of seconds).
- ``method="eigh"``: the same trace from symmetric eigendecompositions only. ``S1 S2`` is similar
  to ``M = S1^{1/2} S2 S1^{1/2}`` (symmetric PSD), so ``Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(M))``;
  tiny negative eigenvalues from round-off are clipped to 0, so singular covariances need no eps.
  Several times faster; agrees with ``sqrtm`` to round-off (tested).
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


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr (s1 s2)^{1/2}`` for symmetric PSD ``s1``, ``s2`` via two ``eigh`` calls."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64 math).

    ``mu*``: ``[D]``; ``sigma*``: ``[D, D]`` symmetric positive semi-definite. ``eps`` is added to
    the diagonals only when ``sigma1 @ sigma2`` has no finite square root (``method="sqrtm"``).
    ``method``: ``"sqrtm"`` (pytorch-fid's recipe) or ``"eigh"`` (faster; see the module docstring).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {s1.shape} and {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product_eigh(s1, s2))
    if method != "sqrtm":
        raise ValueError(f"method={method!r}: use 'sqrtm' or 'eigh'")
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
