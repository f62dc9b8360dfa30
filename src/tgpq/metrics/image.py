"""Full-reference image metrics for pairs of images in [-1, 1]: PSNR and SSIM.

Both take two float tensors (or arrays) of the same shape ``[B, C, H, W]`` (NCHW; a single
``[C, H, W]`` image is treated as a batch of one), compute in float64, and return the mean over
the batch as a Python float, or the per-image values ``[B]`` (float64 tensor) when
``per_image=True``. ``data_range`` is the span of valid values: 2.0 for [-1, 1] images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _as_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a), \
        torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b)
    if ta.shape != tb.shape:
        raise ValueError(f"image shapes differ: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    if ta.ndim == 3:
        ta, tb = ta[None], tb[None]
    if ta.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W] or [C, H, W], got shape {tuple(ta.shape)}")
    if not (ta.is_floating_point() and tb.is_floating_point()):
        raise TypeError(f"images must be floating point, got {ta.dtype} and {tb.dtype}")
    return ta.detach().to("cpu", torch.float64), tb.detach().to("cpu", torch.float64)


def _reduce(values: torch.Tensor, per_image: bool):
    return values if per_image else float(values.mean())


def psnr(a, b, data_range: float = 2.0, per_image: bool = False):
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``, MSE per image over C, H, W.

    Identical images give ``inf``. The batch value is the mean of the per-image PSNRs (``inf`` if
    any pair is identical).
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    ta, tb = _as_pair(a, b)
    mse = (ta - tb).pow(2).flatten(1).mean(1)
    values = 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> +inf
    return _reduce(values, per_image)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, data_range: float = 2.0, per_image: bool = False, window_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03):
    """Structural similarity (Wang et al. 2004) with a Gaussian window (11 taps, sigma 1.5).

    Local means, variances and covariance are Gaussian-weighted over each channel separately
    ("valid" positions only, no padding; population, not sample, statistics);
    ``C1 = (k1 * data_range)^2``, ``C2 = (k2 * data_range)^2``. The SSIM map is averaged over
    channels and positions per image. Requires ``H, W >= window_size``.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    ta, tb = _as_pair(a, b)
    bsz, c, h, w = ta.shape
    if h < window_size or w < window_size:
        raise ValueError(f"images of {h}x{w} are smaller than the {window_size}x{window_size} SSIM window")
    g = _gaussian_window(window_size, sigma)
    win_h = g.view(1, 1, window_size, 1).repeat(c, 1, 1, 1)
    win_w = g.view(1, 1, 1, window_size).repeat(c, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable depthwise Gaussian, valid positions
        return F.conv2d(F.conv2d(x, win_h, groups=c), win_w, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = blur(ta), blur(tb)
    var_a = blur(ta * ta) - mu_a ** 2
    var_b = blur(tb * tb) - mu_b ** 2
    cov = blur(ta * tb) - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return _reduce(smap.flatten(1).mean(1), per_image)


def psnr_from_noise_sigma(sigma: float, data_range: float = 2.0) -> float:
    """Expected PSNR (dB) of an image against itself plus i.i.d. Gaussian noise of std ``sigma``."""
    return 10.0 * math.log10(data_range ** 2 / sigma ** 2)
