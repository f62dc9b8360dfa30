"""Weight quantization: symmetric, per output channel (pure functions).

``qmax(bits) = 2**(bits-1) - 1`` (7 for int4, 127 for int8); ``w_q = clamp(round_half_even(w /
w_scale[n]), -qmax, qmax)`` stored as int8.
"""
from __future__ import annotations

import torch


def qmax(bits: int) -> int:
    """The largest weight integer for ``bits`` (7 for int4, 127 for int8); other widths raise."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported: use 4 or 8")
    return 2 ** (bits - 1) - 1


def _per_channel_absmax(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest-even per-channel quantization. ``w`` [N, ...], ``scale`` [N] -> int8 like ``w``."""
    q = qmax(bits)
    s = scale.reshape(-1, *([1] * (w.dim() - 1))).to(torch.float32)
    return torch.clamp(torch.round(w.to(torch.float32) / s), -q, q).to(torch.int8)


def dequantize_weight(w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, ...] and scale [N] -> float32 [N, ...]."""
    return w_q.to(torch.float32) * scale.reshape(-1, *([1] * (w_q.dim() - 1))).to(torch.float32)


def mse_weight_scale(w: torch.Tensor, bits: int, grid: int = 40, min_ratio: float = 0.5) -> torch.Tensor:
    """Per-output-channel scale minimising the weight MSE over clipping ratios.

    Tries ``alpha`` in ``linspace(min_ratio, 1, grid)`` of each channel's abs-max and keeps, per
    channel, the one with the lowest squared error of the quantize-dequantize round trip.
    Returns float32 [N], strictly positive (all-zero channels get scale 1).
    """
    if grid < 1:
        raise ValueError("grid must be >= 1")
    q = qmax(bits)
    w2 = w.detach().reshape(w.shape[0], -1).to(torch.float32)
    amax = w2.abs().amax(dim=1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / q
    for alpha in torch.linspace(min_ratio, 1.0, grid).tolist():
        s = amax * alpha / q
        wq = torch.clamp(torch.round(w2 / s[:, None]), -q, q) * s[:, None]
        err = (wq - w2).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return best_scale


def absmax_weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    amax = _per_channel_absmax(w).to(torch.float32)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return amax / qmax(bits)
