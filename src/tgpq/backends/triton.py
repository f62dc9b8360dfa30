"""Triton backend: fused W8A8 / W4A8 kernels of ``tgpq.kernels`` on CUDA, behind ``torch.ops.tgpq``.

This module registers the CUDA kernels of ``tgpq::qlinear`` and ``tgpq::qconv2d`` (schemas in
``csrc/torch/library.cpp``, fake kernels in ``tgpq.backends.library``), so eager mode and
``torch.compile`` reach the Triton launchers through one op each. On CUDA the ops take the canonical
packed weight (``w_sum`` is None) and ``variant`` selects the GEMM kernel: 0 = autotuned ``tl.dot``,
1 = the Gluon kernel that keeps one int8 wgmma in flight (W8A8, sm_90, ``k % 64 == 0``).

The variant is chosen once per device (``gemm_variant``): Gluon on sm_90 unless ``TGPQ_WGMMA_ASYNC=0``,
after one check against the ``tl.dot`` kernel on a probe problem; a compile failure or a mismatch
prints one warning and keeps ``tl.dot`` for that device.

The kernels take fp16 / bf16 activations; a float32 input is run in bf16 and the result cast back to
float32 (documented loss: bf16 rounding of the input before quantization).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import library

VARIANTS = ("tl_dot", "gluon")
_variant_of_device: dict = {}  # torch.device -> index into VARIANTS, decided on first use


def kernels():
    """``tgpq.kernels`` (needs the ``triton`` extra); one clear error when it is missing."""
    try:
        from .. import kernels as k
    except ImportError as e:
        raise RuntimeError(f"the triton backend needs Triton (pip install 'tgpq[triton]'): {e}") from None
    return k


def _check_gluon(device: torch.device) -> bool:
    """Run the Gluon W8A8 kernel once on a probe problem and compare it with the tl.dot kernel."""
    k = kernels()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(192, 256, generator=gen).to(device, torch.float16)
    w = torch.randint(-127, 128, (160, 256), generator=gen, dtype=torch.int8).to(device)
    w_scale = (torch.rand(160, generator=gen) * 0.01 + 1e-3).to(device)
    a_scale = torch.tensor([0.02, 0.03], device=device)
    g = torch.tensor([1], device=device)
    bias = torch.randn(160, generator=gen).to(device)
    y = k.qlinear(x, w, w_scale, a_scale, g, bias, bits=8, k=256, path="gluon").float()
    ref = k.qlinear(x, w, w_scale, a_scale, g, bias, bits=8, k=256, path="tl_dot").float()
    # same int32 sums and epilogue; only fp32 operation order and the output rounding differ
    return bool(((y - ref).abs() <= 2.0 ** -9 * float(ref.abs().max()) + 1e-6).all())


def gemm_variant(device: torch.device) -> int:
    """The W8A8 GEMM variant for ``device`` (index into ``VARIANTS``), chosen on first use."""
    device = torch.device(device)
    if torch.compiler.is_compiling():  # decided before tracing (convert does it), or tl.dot
        return _variant_of_device.get(device, 0)
    if device not in _variant_of_device:
        choice = 0
        if torch.cuda.get_device_capability(device)[0] == 9 and os.environ.get("TGPQ_WGMMA_ASYNC", "1") != "0":
            try:
                if _check_gluon(device):
                    choice = 1
                else:
                    warnings.warn("tgpq: the Gluon wgmma kernel disagrees with the tl.dot kernel; using tl.dot")
            except Exception as e:  # noqa: BLE001 - e.g. a triton whose Gluon API differs: fall back, say why
                warnings.warn(f"tgpq: the Gluon wgmma kernel is unavailable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); using tl.dot")
        _variant_of_device[device] = choice
    return _variant_of_device[device]


def _half(x: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda:
        raise ValueError(f"triton backend needs a CUDA tensor, got one on {x.device}")
    return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    xh = _half(x).contiguous()
    variant = gemm_variant(x.device) if layer.bits == 8 and layer.in_features % 64 == 0 else 0
    y = torch.ops.tgpq.qlinear(xh, layer.w_packed, None, layer.w_scale, layer.a_scale, layer.group_index,
                               layer.bias, layer.bits, layer.out_features_, layer.in_features, variant)
    return y.to(x.dtype)


def conv2d(layer, x: torch.Tensor) -> torch.Tensor:
    xh = _half(x).contiguous(memory_format=torch.channels_last)
    y = torch.ops.tgpq.qconv2d(xh, layer.w_packed, None, layer.w_scale, layer.a_scale, layer.group_index,
                               layer.bias, layer.bits, layer.out_channels, layer.in_channels,
                               list(layer.kernel_size), list(layer.stride), list(layer.padding),
                               list(layer.dilation), 0)
    return y.to(x.dtype)


def qlinear_cuda(x, w, w_sum, w_scale, a_scale, group_index, bias, bits, out_features, in_features, variant):
    """CUDA kernel of ``tgpq::qlinear``: the Triton launcher (``w`` canonical packed, ``w_sum`` unused).
    Also callable with CPU tensors, which run the same kernel in Triton's interpreter (tests)."""
    return kernels().qlinear(x, w, w_scale, a_scale, group_index, bias, bits=bits, k=in_features,
                             path=VARIANTS[variant])


def qconv2d_cuda(x, w, w_sum, w_scale, a_scale, group_index, bias, bits, out_channels, in_channels, kernel_size,
                 stride, padding, dilation, variant, row_bias=None, residual=None):
    """CUDA kernel of ``tgpq::qconv2d`` (``variant`` unused: one conv kernel); the optional
    ``row_bias`` / ``residual`` adds of the op's contract are separate adds here."""
    y = kernels().qconv2d(x, w, w_scale, a_scale, group_index, bias, bits=bits, in_channels=in_channels,
                          kernel_size=tuple(kernel_size), stride=tuple(stride), padding=tuple(padding),
                          dilation=tuple(dilation))
    if row_bias is not None:
        y = y + row_bias[:, :, None, None].to(y.dtype)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return y


if library.has_extension():
    torch.library.register_kernel("tgpq::qlinear", "cuda", qlinear_cuda)
    torch.library.register_kernel("tgpq::qconv2d", "cuda", qconv2d_cuda)
