"""Activation quantization: symmetric int8 with one step size per timestep group (pure functions).

Contract shared by every backend and kernel: ``x_q = clamp(round_half_even(float32(x) * inv), -127,
127)`` with ``inv = float32(1) / float32(a_scale[g])`` (multiply by the reciprocal, as the kernels
do); the dequantized activation is ``x_q * a_scale[g]``.
"""
from __future__ import annotations

import torch

ACT_QMAX = 127


def quantize_act(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric int8 activation quantization with the kernels' exact arithmetic.

    ``scale`` is a positive float32 scalar (tensor or float). Returns int8 shaped like ``x``.
    """
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    inv = torch.reciprocal(s)
    return torch.clamp(torch.round(x.to(torch.float32) * inv), -ACT_QMAX, ACT_QMAX).to(torch.int8)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through gradient; the forward value is exactly ``round(x)``."""
    return (torch.round(x) - x).detach() + x


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize then dequantize ``x`` with a positive step size broadcastable to it.

    The one fake-quant of the project (reference backend, calibration, simulation): computed and
    returned in float32 (float64 for float64 input, as tests use), forward value exactly
    ``quantize_act(x, scale) * scale``; the gradient passes the rounding straight through to ``x``
    and ``scale`` (LSQ). NaN stays NaN; +-inf give +-``ACT_QMAX`` steps.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = torch.as_tensor(scale, device=x.device).to(dt)
    # the inner clamp (at twice the range) only keeps +-inf finite for the straight-through rounding, which would
    # make them NaN: values and gradients of finite inputs are those of the outer clamp alone
    v = torch.clamp(x.to(dt) * torch.reciprocal(s), -2 * ACT_QMAX, 2 * ACT_QMAX)
    q = torch.clamp(round_ste(v), -ACT_QMAX, ACT_QMAX)
    return q * s


def act_scale_from_range(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 step size covering ``[lo, hi]`` (both float tensors, any shape)."""
    amax = torch.maximum(lo.abs(), hi.abs()).to(torch.float32)
    return torch.clamp(amax / ACT_QMAX, min=1e-8)
