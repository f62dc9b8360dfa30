"""Quantized layers: ``QLinear``, ``QConv2d`` and ``QSplitConv2d``.

A layer holds its packed weight (int8 ``[N, K]`` or int4 ``[N, ceil(K/2)]``, see ``tgpq.layout``),
per-output-channel weight scales, the float32 bias and the activation scale table
``a_scale[num_groups]``. It reads the current scale group from the shared ``group_index`` tensor of
its router (``tgpq.nn.routing.TimestepRouter``) and computes through one of the backends:
``reference`` (dequantize, compute in float), ``cpu`` (int8 kernels of the C++ extension) or
``triton`` (fused GPU kernels); ``auto`` picks triton on CUDA and cpu on the CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..layout import PackedWeight
from ..recipe import LayerQState

BACKENDS = backends.NAMES


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _QuantLayer(nn.Module):
    """Shared state and plumbing of QLinear / QConv2d."""

    def _init_buffers(self, n: int, k: int, bits: int, num_groups: int, has_bias: bool):
        if bits not in (4, 8):
            raise ValueError(f"bits={bits} is not supported: weights can be 4 or 8 bits")
        self.bits, self.k, self.out_features_ = bits, k, n
        kp = k if bits == 8 else (k + 1) // 2
        self.register_buffer("w_packed", torch.zeros(n, kp, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(n, dtype=torch.float32))
        self.register_buffer("a_scale", torch.ones(num_groups, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(n, dtype=torch.float32) if has_bias else None)
        self.backend = "auto"
        self._router = None
        # A private group index for layers used on their own (tests, benchmarks).
        self.register_buffer("_own_group_index", torch.zeros(1, dtype=torch.int64), persistent=False)

    def attach_router(self, router) -> None:
        """Read the group index from ``router`` (not registered as a submodule: it is shared)."""
        object.__setattr__(self, "_router", router)

    @property
    def group_index(self) -> torch.Tensor:
        return self._router.group_index if self._router is not None else self._own_group_index

    def set_group(self, g: int) -> None:
        """For a standalone layer: select the activation scale group."""
        if not 0 <= g < self.a_scale.numel():
            raise ValueError(f"group {g} is outside [0, {self.a_scale.numel()})")
        self._own_group_index.fill_(g)

    @property
    def weight_packed(self) -> PackedWeight:
        return PackedWeight(self.w_packed, self.w_scale, self.bits, self.out_features_, self.k)

    def _load(self, lq: LayerQState, flat_q: torch.Tensor, bias: torch.Tensor | None):
        pw = PackedWeight.from_int(flat_q, lq.weight_scale, self.bits)
        self.w_packed.copy_(pw.packed)
        self.w_scale.copy_(pw.scale)
        self.a_scale.copy_(lq.act_scale.to(torch.float32).reshape(-1))
        if bias is not None:
            self.bias.copy_(bias.detach().to(torch.float32))

    def _backend(self, x: torch.Tensor):
        return backends.resolve(self.backend, x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.a_scale.numel()}, backend={self.backend}"


class QLinear(_QuantLayer):
    """Quantized ``nn.Linear``: input ``[..., in_features]`` -> ``[..., out_features]``."""

    def __init__(self, in_features: int, out_features: int, bits: int, num_groups: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, in_features, bits, num_groups, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, lq: LayerQState, bits: int) -> "QLinear":
        if lq.weight_q.shape != linear.weight.shape:
            raise ValueError(f"quantized weight {tuple(lq.weight_q.shape)} does not match the layer's {tuple(linear.weight.shape)}")
        m = cls(linear.in_features, linear.out_features, bits, lq.act_scale.shape[0], linear.bias is not None)
        m._load(lq, lq.weight_q, linear.bias)
        return m.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        return self._backend(x).linear(self, x)


class QConv2d(_QuantLayer):
    """Quantized ``nn.Conv2d`` (groups=1, zero padding): input ``[B, Cin, H, W]`` -> ``[B, N, Ho, Wo]``.

    The packed weight's K is ordered ``(kh, kw, cin)`` for an implicit GEMM over NHWC input.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bits: int = 8, num_groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        k = self.kernel_size[0] * self.kernel_size[1] * in_channels
        self._init_buffers(out_channels, k, bits, num_groups, bias)

    @staticmethod
    def check_supported(conv: nn.Conv2d, name: str = "conv") -> None:
        """Raise ``ValueError`` naming the layer when tgpq cannot quantize this conv."""
        hint = "exclude it (QuantConfig.exclude) to keep it in float"
        if conv.groups != 1:
            raise ValueError(f"{name}: grouped convolution (groups={conv.groups}) is not supported by tgpq; {hint}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros'); {hint}")
        if isinstance(conv.padding, str):
            raise ValueError(f"{name}: string padding {conv.padding!r} is not supported (use explicit padding); {hint}")

    @classmethod
    def from_float(cls, conv: nn.Conv2d, lq: LayerQState, bits: int, act_scale: torch.Tensor | None = None,
                   weight_q: torch.Tensor | None = None, with_bias: bool = True) -> "QConv2d":
        cls.check_supported(conv)
        wq = lq.weight_q if weight_q is None else weight_q
        a = lq.act_scale if act_scale is None else act_scale
        if wq.shape[0] != conv.out_channels or wq.shape[2:] != conv.weight.shape[2:]:
            raise ValueError(f"quantized weight {tuple(wq.shape)} does not match the layer's {tuple(conv.weight.shape)}")
        has_bias = with_bias and conv.bias is not None
        m = cls(wq.shape[1], conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                bits, a.shape[0], has_bias)
        m._load(LayerQState(wq, lq.weight_scale, a), wq, conv.bias if has_bias else None)
        return m.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QConv2d expects input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        return self._backend(x).conv2d(self, x)


class QSplitConv2d(nn.Module):
    """A conv whose input is a channel concatenation quantized per branch (split quantization).

    ``conv(cat(a, b), W) == conv(a, W[:, :Ca]) + conv(b, W[:, Ca:])``: one ``QConv2d`` per branch,
    each with its own activation scale table; the bias is added once (by the first part).
    """

    def __init__(self, parts: list[QConv2d]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_splits = tuple(p.in_channels for p in parts)
        self.in_channels = sum(self.in_splits)
        self.out_channels = parts[0].out_channels

    @classmethod
    def from_float(cls, conv: nn.Conv2d, lq: LayerQState, bits: int) -> "QSplitConv2d":
        if lq.in_splits is None:
            raise ValueError("QSplitConv2d needs a LayerQState with in_splits")
        parts, start = [], 0
        for i, c in enumerate(lq.in_splits):
            wq = lq.weight_q[:, start:start + c]
            parts.append(QConv2d.from_float(conv, lq, bits, act_scale=lq.act_scale[:, i].contiguous(),
                                            weight_q=wq, with_bias=(i == 0)))
            start += c
        return cls(parts)

    def attach_router(self, router) -> None:
        for p in self.parts:
            p.attach_router(router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QSplitConv2d expects input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        chunks = torch.split(x, list(self.in_splits), dim=1)
        out = self.parts[0](chunks[0])
        for p, c in zip(self.parts[1:], chunks[1:]):
            out = out + p(c)
        return out
