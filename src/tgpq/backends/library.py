"""The op library ``torch.ops.tgpq.*``: loads the compiled extension and holds every fake kernel.

Schemas are defined once, in ``csrc/torch/library.cpp``; CPU kernels are C++ (``csrc/torch/*_ops.cpp``),
the CUDA kernels of ``qlinear`` / ``qconv2d`` are the Triton launchers registered by
``tgpq.backends.triton`` (``pack_int4``, ``unpack_int4`` and ``quantize_act`` also have CUDA C++
kernels when the extension is built with CUDA). The fake (meta) kernels below let ``torch.compile``
trace a model that calls the ops without running them.

Weights reach ``qlinear`` / ``qconv2d`` in the layout of the device's kernels (``tgpq.layout``): on the
CPU the c4 blocks plus ``w_sum`` from ``prepack_c4``, on CUDA the canonical packed weight (``w_sum``
None). ``variant`` is the kernel variant chosen once by the backend: the ISA path on the CPU
(0 scalar, 1 avx2, 2 avx512vnni), the GEMM variant on CUDA (0 tl.dot, 1 Gluon wgmma).
"""
from __future__ import annotations

import torch

from ..layout import conv_output_size, cpu_prepacked_shape

try:
    from .. import _C  # noqa: F401  (registers torch.ops.tgpq.*)

    _LOAD_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _LOAD_ERROR = e


def has_extension() -> bool:
    return _LOAD_ERROR is None


def require_extension() -> None:
    if _LOAD_ERROR is not None:
        raise RuntimeError(
            f"the tgpq C++ extension (tgpq._C) is not available ({_LOAD_ERROR}); reinstall with "
            f"`pip install .` from the repository, or use backend='reference'"
        )


if _LOAD_ERROR is None:

    @torch.library.register_fake("tgpq::pack_int4")
    def _pack_int4_fake(q):
        return q.new_empty((q.shape[0], (q.shape[1] + 1) // 2))

    @torch.library.register_fake("tgpq::unpack_int4")
    def _unpack_int4_fake(packed, k):
        return packed.new_empty((packed.shape[0], k))

    @torch.library.register_fake("tgpq::quantize_act")
    def _quantize_act_fake(x, a_scale, group_index):
        return torch.empty_like(x, dtype=torch.int8)

    @torch.library.register_fake("tgpq::prepack_c4")
    def _prepack_c4_fake(w_packed, bits, k):
        shape, wsum_len = cpu_prepacked_shape(w_packed.shape[0], k, bits)
        return w_packed.new_empty(shape), w_packed.new_empty((wsum_len,), dtype=torch.int32)

    @torch.library.register_fake("tgpq::quantize_nhwc_u8")
    def _quantize_nhwc_u8_fake(x, a_scale, group_index, isa, pad=()):
        b, c, h, w = x.shape
        left, right, top, bottom = pad if len(pad) else (0, 0, 0, 0)
        return x.new_empty((b, h + top + bottom, w + left + right, c), dtype=torch.uint8)

    @torch.library.register_fake("tgpq::groupnorm_silu_quantize")
    def _groupnorm_silu_quantize_fake(x, num_groups, weight, bias, eps, silu, a_scale, group_index, isa,
                                      row_bias=None):
        b, c, h, w = x.shape
        return x.new_empty((b, h, w, c), dtype=torch.uint8)

    @torch.library.register_fake("tgpq::groupnorm_silu_quantize_split")
    def _groupnorm_silu_quantize_split_fake(xs, num_groups, weight, bias, eps, silu, a_scales, group_indices, isa,
                                            row_bias, plain_a_scales, plain_group_indices):
        b, _, h, w = xs[0].shape

        def outputs(scales):
            if len(scales) == 1:
                return [xs[0].new_empty((b, h, w, sum(x.shape[1] for x in xs)), dtype=torch.uint8)]
            return [x.new_empty((b, h, w, x.shape[1]), dtype=torch.uint8) for x in xs]

        return outputs(a_scales) + (outputs(plain_a_scales) if plain_a_scales else [])

    @torch.library.register_fake("tgpq::qlinear")
    def _qlinear_fake(x, w, w_sum, w_scale, a_scale, group_index, bias, bits, out_features, in_features, variant):
        return x.new_empty((*x.shape[:-1], out_features))

    def _channels_last(b, n, hw, dtype, like):
        return like.new_empty((b, hw[0], hw[1], n), dtype=dtype).permute(0, 3, 1, 2)

    @torch.library.register_fake("tgpq::qconv2d")
    def _qconv2d_fake(x, w, w_sum, w_scale, a_scale, group_index, bias, bits, out_channels, in_channels,
                      kernel_size, stride, padding, dilation, variant, row_bias=None, residual=None):
        hw = conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation)
        return _channels_last(x.shape[0], out_channels, hw, x.dtype, x)

    @torch.library.register_fake("tgpq::qconv2d_u8")
    def _qconv2d_u8_fake(xq, w_c4, wsum, w_scale, a_scale, group_index, bias, bits, out_channels, in_channels,
                         kernel_size, stride, padding, dilation, isa, row_bias=None, residual=None):
        hw = conv_output_size(xq.shape[1:3], kernel_size, stride, padding, dilation)
        return _channels_last(xq.shape[0], out_channels, hw, torch.float32, xq)
