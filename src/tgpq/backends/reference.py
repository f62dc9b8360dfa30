"""Reference backend: quantize the activation exactly as the kernels do, dequantize, compute in float.

Results are float32 internally and returned in the input's dtype. This is the oracle the other
backends are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..numerics import fake_quant_act


def _fake_quant_input(layer, x: torch.Tensor) -> torch.Tensor:
    s = layer.a_scale.index_select(0, layer.group_index.to(layer.a_scale.device))  # [1], no host sync
    return fake_quant_act(x.to(torch.float32), s)  # the kernels' float32 arithmetic for every input dtype


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight_packed.dequantize()
    y = F.linear(_fake_quant_input(layer, x), w, layer.bias)
    return y.to(x.dtype)


def conv_weight(layer) -> torch.Tensor:
    """Dequantized float32 weight ``[N, Cin, kh, kw]`` from the (kh, kw, cin)-ordered packed form."""
    kh, kw = layer.kernel_size
    w = layer.weight_packed.dequantize().reshape(layer.out_channels, kh, kw, layer.in_channels)
    return w.permute(0, 3, 1, 2)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    y = F.conv2d(_fake_quant_input(layer, x), conv_weight(layer), layer.bias, layer.stride, layer.padding,
                 layer.dilation)
    return y.to(x.dtype)
