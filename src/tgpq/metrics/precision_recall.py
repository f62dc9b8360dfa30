"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) on feature vectors.

Each set's manifold is the union of balls around its samples, each ball's radius being the
distance to that sample's k-th nearest neighbour within the same set (k = 3, self excluded).
Precision: the fraction of generated samples inside the real manifold (fidelity).
Recall: the fraction of real samples inside the generated manifold (diversity/coverage).
"""
from __future__ import annotations

import numpy as np
import torch


def _as_features(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D] features, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def _pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[len(a), len(b)]`` (float64, clamped at 0 before the square root)."""
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2.0 * a @ b.T
    return d2.clamp_min_(0.0).sqrt_()


def knn_radii(features, k: int = 3, block: int = 2048) -> torch.Tensor:
    """Distance of each row of ``features`` ``[N, D]`` to its k-th nearest other row: ``[N]`` float64."""
    f = _as_features(features, "features")
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k={k} needs 1 <= k < N (N={f.shape[0]})")
    out = torch.empty(f.shape[0], dtype=torch.float64)
    for i in range(0, f.shape[0], block):
        d = _pairwise_distances(f[i:i + block], f)
        # the k+1 smallest include the point itself at distance ~0
        out[i:i + block] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def manifold_coverage(reference, radii: torch.Tensor, queries, block: int = 2048) -> float:
    """Fraction of ``queries`` ``[M, D]`` within ``radii[j]`` of at least one ``reference[j]``."""
    ref, q = _as_features(reference, "reference"), _as_features(queries, "queries")
    if ref.shape[1] != q.shape[1]:
        raise ValueError(f"feature dims differ: {ref.shape[1]} vs {q.shape[1]}")
    inside = 0
    for i in range(0, q.shape[0], block):
        d = _pairwise_distances(q[i:i + block], ref)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / q.shape[0]


def precision_recall(real_features, fake_features, k: int = 3) -> dict[str, float]:
    """``{"precision", "recall"}`` of ``fake_features`` ``[M, D]`` against ``real_features`` ``[N, D]``."""
    real, fake = _as_features(real_features, "real_features"), _as_features(fake_features, "fake_features")
    precision = manifold_coverage(real, knn_radii(real, k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, k), real)
    return {"precision": precision, "recall": recall}
