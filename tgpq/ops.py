"""Entry point to the compiled ops ``torch.ops.tgpq.*`` (defined in csrc/torch/torch_ops.cpp).

Importing this module loads ``tgpq._C`` (which registers the schemas and the CPU kernels) and adds
fake (meta) kernels so that ``torch.compile`` can trace models that call the ops.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.tgpq.*)

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

    @torch.library.register_fake("tgpq::qlinear")
    def _qlinear_fake(x, w_packed, w_scale, a_scale, group_index, bias, bits, in_features):
        return x.new_empty((*x.shape[:-1], w_packed.shape[0]))

    @torch.library.register_fake("tgpq::qconv2d")
    def _qconv2d_fake(x, w_packed, w_scale, a_scale, group_index, bias, bits, in_channels,
                      kernel_size, stride, padding, dilation):
        b, _, h, w = x.shape
        ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        return x.new_empty((b, w_packed.shape[0], ho, wo)).contiguous(memory_format=torch.channels_last)
