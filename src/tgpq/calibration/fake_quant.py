"""Differentiable quantized stand-ins for ``nn.Linear`` / ``nn.Conv2d`` used during calibration.

* Weights: AdaRound (Nagel et al. 2020; BRECQ): ``w_soft = clamp(floor(w / s) + h(alpha), -q, q) * s``
  with the rectified sigmoid ``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``,
  ``zeta = 1.1``, ``gamma = -0.1``; ``alpha`` starts where ``h(alpha) = frac(w / s)`` (so the soft
  weight starts at the float weight and ``alpha >= 0`` is round-to-nearest). The rounding
  regulariser is ``sum(1 - |2 h(alpha) - 1| ** beta)``; hard rounding is ``floor(w / s) + [alpha >= 0]``.
* Activations: LSQ-style step sizes, one per timestep group (``[G]``) or, for a layer whose input
  is a channel concatenation of ``S`` branches (split quantization), one per group and branch
  (``[G, S]``). Each sample of a batch uses the step size of its own group, read from a shared
  :class:`GroupContext`. The arithmetic is the kernels' (``tgpq.numerics``): ``x * (1 / s)``
  in float32, round half to even, clamp to ``[-127, 127]``, times ``s``; the gradient passes
  the rounding straight through (to ``x`` and ``s``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import numerics

ZETA = 1.1
GAMMA = -0.1


class GroupContext:
    """The timestep-group index of every sample of the batch being computed (int64 ``[B]``).

    One instance is shared by every :class:`QuantLayer` of a model; whoever runs the forward pass
    sets ``group`` first.
    """

    def __init__(self):
        self.group: torch.Tensor | None = None


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_init_alpha(w_over_s: torch.Tensor) -> torch.Tensor:
    """``alpha`` with ``rectified_sigmoid(alpha) == frac(w_over_s)`` (up to the sigmoid's range)."""
    rest = w_over_s - torch.floor(w_over_s)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def rounding_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's ``sum(1 - |2 h(alpha) - 1| ** beta)``: zero when every ``h`` is 0 or 1."""
    h = rectified_sigmoid(alpha)
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def fake_quant_act_per_sample(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable step size broadcastable to it (``numerics.fake_quant_act``:
    kernel arithmetic, LSQ gradient), the step kept positive; returned in ``x``'s dtype."""
    return numerics.fake_quant_act(x, scale.clamp(min=1e-8)).to(x.dtype)


class QuantLayer(nn.Module):
    """A quantized ``nn.Linear`` or ``nn.Conv2d`` with learnable rounding and activation step sizes.

    Parameters (the reconstruction's ``theta``): ``alpha`` (the weight's shape; AdaRound) and
    ``act_scale`` (float ``[G]``, or ``[G, S]`` with ``in_splits``). Buffers: ``w_floor``
    (``floor(w / weight_scale)``), ``weight_scale`` ``[N]``, ``weight_q`` (int8, set by :meth:`freeze`).

    ``weight_mode``: ``"fp"`` (float weight), ``"soft"`` (AdaRound soft weight, differentiable in
    ``alpha``) or ``"hard"`` (``weight_q * weight_scale``). ``act_quant``: quantize the input or not.
    """

    def __init__(self, layer: nn.Module, weight_scale: torch.Tensor, act_scale: torch.Tensor, bits: int,
                 ctx: GroupContext, in_splits: tuple | None = None):
        super().__init__()
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"QuantLayer wraps nn.Linear or nn.Conv2d, got {type(layer).__name__}")
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.conv_kwargs = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                    groups=layer.groups)
            if layer.padding_mode != "zeros":
                raise ValueError(f"padding_mode={layer.padding_mode!r} is not supported (zeros only)")
        self.bits = bits
        self.qmax = numerics.qmax(bits)
        self.ctx = ctx
        self.in_splits = tuple(int(c) for c in in_splits) if in_splits is not None else None
        w = layer.weight.detach().to(torch.float32)
        s = weight_scale.detach().to(torch.float32)
        w_over_s = w / s.reshape(-1, *([1] * (w.dim() - 1)))
        self.register_buffer("weight_fp", w.clone())
        self.register_buffer("weight_scale", s.clone())
        self.register_buffer("w_floor", torch.floor(w_over_s))
        self.register_buffer("weight_q", numerics.quantize_weight(w, s, bits))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.alpha = nn.Parameter(adaround_init_alpha(w_over_s))
        self.act_scale = nn.Parameter(act_scale.detach().to(torch.float32).clone())
        if self.in_splits is not None:
            self.register_buffer("branch_of_channel", torch.repeat_interleave(
                torch.arange(len(self.in_splits)), torch.tensor(self.in_splits)))
        self.weight_mode = "hard"
        self.act_quant = True

    # -- weights -------------------------------------------------------------------------------
    def soft_weight(self, alpha: torch.Tensor | None = None) -> torch.Tensor:
        a = self.alpha if alpha is None else alpha
        q = torch.clamp(self.w_floor.to(a.dtype) + rectified_sigmoid(a), -self.qmax, self.qmax)
        return q * self.weight_scale.to(a.dtype).reshape(-1, *([1] * (q.dim() - 1)))

    def hard_weight_q(self) -> torch.Tensor:
        """AdaRound's hard rounding: int8, ``clamp(floor(w / s) + [alpha >= 0], -q, q)``."""
        up = (self.alpha.detach() >= 0).to(self.w_floor.dtype)
        return torch.clamp(self.w_floor + up, -self.qmax, self.qmax).to(torch.int8)

    @torch.no_grad()
    def freeze(self, rounding: str) -> None:
        """Fix ``weight_q``: ``"rtn"`` (round half to even) or ``"adaround"`` (learned); mode -> hard."""
        if rounding == "rtn":
            self.weight_q.copy_(numerics.quantize_weight(self.weight_fp, self.weight_scale, self.bits))
        elif rounding == "adaround":
            self.weight_q.copy_(self.hard_weight_q())
        else:
            raise ValueError(f"rounding={rounding!r}: use 'rtn' or 'adaround'")
        self.weight_mode = "hard"

    def current_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_mode == "fp":
            return self.weight_fp.to(dtype)
        if self.weight_mode == "soft":
            return self.soft_weight().to(dtype)
        if self.weight_mode == "hard":
            return numerics.dequantize_weight(self.weight_q, self.weight_scale).to(dtype)
        raise ValueError(f"unknown weight_mode {self.weight_mode!r}")

    # -- activations ---------------------------------------------------------------------------
    def per_sample_scale(self, x: torch.Tensor) -> torch.Tensor:
        """The step size of every sample (and branch) of ``x``, shaped to broadcast against ``x``."""
        g = self.ctx.group
        if g is None:
            raise RuntimeError("QuantLayer: the group context is not set (set ctx.group before the forward)")
        if g.shape[0] != x.shape[0]:
            raise RuntimeError(f"QuantLayer: input batch {x.shape[0]} != group index batch {g.shape[0]}")
        s = self.act_scale[g.to(self.act_scale.device)]
        if self.in_splits is None:
            return s.reshape(-1, *([1] * (x.dim() - 1)))
        s = s[:, self.branch_of_channel]  # [B, C]
        if self.is_conv:
            return s.reshape(s.shape[0], s.shape[1], *([1] * (x.dim() - 2)))
        return s.reshape(s.shape[0], *([1] * (x.dim() - 2)), s.shape[1])

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quant:
            return x
        return fake_quant_act_per_sample(x, self.per_sample_scale(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantize_input(x)
        w = self.current_weight(xq.dtype)
        b = None if self.bias is None else self.bias.to(xq.dtype)
        if self.is_conv:
            return F.conv2d(xq, w, b, **self.conv_kwargs)
        return F.linear(xq, w, b)

    def extra_repr(self) -> str:
        return (f"w{self.bits}a8, weight {tuple(self.weight_fp.shape)}, act_scale {tuple(self.act_scale.shape)}, "
                f"in_splits={self.in_splits}, weight_mode={self.weight_mode}")


def get_submodule_parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` of the submodule called ``name`` (dotted path) in ``root``."""
    parts = name.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, attr = get_submodule_parent(root, name)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
