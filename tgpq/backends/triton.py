"""Triton backend: fused W8A8 / W4A8 kernels of ``tgpq.kernels`` on CUDA.

The kernels take fp16 / bf16 activations; a float32 input is run in bf16 and the result cast back
to float32 (documented loss: bf16 rounding of the input before quantization).
"""
from __future__ import annotations

import torch


def _kernels():
    try:
        from .. import kernels
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"triton backend unavailable: {e}") from e
    return kernels


def _half(x: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:
        raise ValueError(f"triton backend needs a CUDA tensor, got one on {x.device}")
    return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    xh = _half(x)
    y = _kernels().qlinear(xh.contiguous(), layer.w_packed, layer.w_scale, layer.a_scale, layer.group_index,
                           layer.bias, bits=layer.bits, k=layer.in_features)
    return y.to(x.dtype)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    xh = _half(x).contiguous(memory_format=torch.channels_last)
    y = _kernels().qconv2d(xh, layer.w_packed, layer.w_scale, layer.a_scale, layer.group_index, layer.bias,
                           bits=layer.bits, in_channels=layer.in_channels, kernel_size=layer.kernel_size,
                           stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
    return y.to(x.dtype)
