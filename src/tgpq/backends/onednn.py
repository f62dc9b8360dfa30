"""oneDNN's int8 convolution / linear (``torch.ops.onednn``, shipped with torch) as a second kernel family
of the cpu backend, beside tgpq's own microkernels.

Numerics: uint8 activations with zero point 128 (the cpu backend's NHWC tensors, unchanged), int8 weights
(int4 weights are widened to int8 once), fp32 output with the same scales and bias. oneDNN's dot product is
exact where it runs ``vpdpbusd`` (AVX-512 VNNI, AMX); on AVX2 it runs ``vpmaddubsw``, which saturates a pair
of u8 x s8 products above 32767, so there it is exact only for weights in [-63, 63] and the cpu backend
never chooses it by itself (``exact_on``). A NaN activation (the u8 code 0) is not propagated by oneDNN:
inputs that hold one are computed by tgpq's microkernels instead (the backend checks).

Weights are prepacked once per layer (``prepare``) and cached on the layer, outside its state dict.
"""
from __future__ import annotations

import torch


def available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise") and \
        torch.backends.mkldnn.is_available()


def exact_on(isa: str) -> bool:
    """Whether oneDNN's int8 dot product is exact on this ISA path for any int8 weight."""
    return isa == "avx512vnni"


def _weight_int8(layer) -> torch.Tensor:
    """int8 ``[N, K]`` (K in (kh, kw, cin) order for convolutions) of the layer's canonical packed weight."""
    return layer.weight_packed.unpack().cpu()


def prepare(layer, key) -> object:
    """oneDNN's packed weight for ``layer`` (cached on the layer; rebuilt when ``key`` changes)."""
    if getattr(layer, "_onednn_key", None) == key:
        return layer._onednn_w
    w = _weight_int8(layer)
    if hasattr(layer, "kernel_size"):
        kh, kw = layer.kernel_size
        w = w.reshape(layer.out_channels, kh, kw, layer.in_channels).permute(0, 3, 1, 2).contiguous()
        packed = torch.ops.onednn.qconv_prepack(w, layer.w_scale.cpu(), 1.0, 128, list(layer.stride),
                                                list(layer.padding), list(layer.dilation), 1, None)
    else:
        packed = torch.ops.onednn.qlinear_prepack(w.contiguous(), None)
    object.__setattr__(layer, "_onednn_w", packed)
    object.__setattr__(layer, "_onednn_key", key)
    return packed


def _zero_points(layer) -> torch.Tensor:
    return torch.zeros(layer.w_scale.numel(), dtype=torch.int64)


def conv2d_u8(layer, packed, xq: torch.Tensor, a_scale: float) -> torch.Tensor:
    """uint8 NHWC ``[B, H, W, Cin]`` -> float32 channels_last ``[B, N, Ho, Wo]``."""
    return torch.ops.onednn.qconv2d_pointwise(
        xq.permute(0, 3, 1, 2), a_scale, 128, packed, layer.w_scale, _zero_points(layer), layer.bias,
        list(layer.stride), list(layer.padding), list(layer.dilation), 1, 1.0, 0, torch.float32, "none", [], "")


def linear_u8(layer, packed, xq: torch.Tensor, a_scale: float) -> torch.Tensor:
    """uint8 ``[M, K]`` -> float32 ``[M, N]``."""
    return torch.ops.onednn.qlinear_pointwise(xq, a_scale, 128, packed, layer.w_scale, _zero_points(layer),
                                              layer.bias, 1.0, 0, torch.float32, "none", [], "")
