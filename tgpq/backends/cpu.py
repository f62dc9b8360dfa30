"""CPU backend: int8 kernels of the C++ extension (``torch.ops.tgpq.qlinear`` / ``qconv2d``)."""
from __future__ import annotations

import torch

from .. import ops


def _check_input(x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise ValueError(f"cpu backend got a tensor on {x.device}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"cpu backend: input must be float32 or bfloat16, got {x.dtype}")


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    ops.require_extension()
    _check_input(x)
    return torch.ops.tgpq.qlinear(x, layer.w_packed, layer.w_scale, layer.a_scale, layer.group_index,
                                  layer.bias, layer.bits, layer.in_features)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    ops.require_extension()
    _check_input(x)
    return torch.ops.tgpq.qconv2d(x, layer.w_packed, layer.w_scale, layer.a_scale, layer.group_index,
                                  layer.bias, layer.bits, layer.in_channels, list(layer.kernel_size),
                                  list(layer.stride), list(layer.padding), list(layer.dilation))
