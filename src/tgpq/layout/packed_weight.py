"""``PackedWeight``: the one type that owns a quantized layer's weight bytes, and the layouts derived
from it once at convert/load time.

Canonical form (saved in files; the reference and triton backends read it):
  * ``packed``: int8. bits=8: ``[N, K]`` row-major. bits=4: ``[N, ceil(K/2)]``, two values per byte
    along K, even element in the low nibble (see ``tgpq.layout.int4``).
  * ``scale``: float32 ``[N]`` per-output-channel step size.
For convolutions ``K = kh * kw * Cin`` ordered ``(kh, kw, cin)``: the weight ``[N, Cin, kh, kw]`` is
permuted to ``[N, kh, kw, Cin]`` before flattening, which is the implicit-GEMM order over NHWC input.

CPU microkernel form ("c4 blocks", built by ``torch.ops.tgpq.prepack_c4``; ``csrc/cpu/ukernel.h``):
``nb = ceil(N / 16)`` blocks of 16 output channels; ``kg = ceil(K / 4)`` groups of 4 (an even count for
int4). int8: block b, group g -> 64 bytes, byte ``c*4 + j`` = ``W[16b + c, 4g + j]``. int4: block b,
group pair p -> 64 bytes, byte ``c*4 + j`` holds ``W[16b + c, 8p + j]`` (low nibble) and
``W[16b + c, 8p + 4 + j]`` (high nibble). Padding holds 0. Beside it ``wsum`` int32 ``[16 * nb]`` =
``128 * sum_k W[n, k]`` (the uint8 activations' zero-point compensation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics import qmax
from . import int4


def conv_output_size(size: tuple[int, int], kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """``(Ho, Wo)`` of a zero-padded convolution of an ``(H, W)`` input (PyTorch's formula)."""
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def cpu_prepacked_shape(n: int, k: int, bits: int) -> tuple[tuple[int, int], int]:
    """``([nb, block_bytes], wsum_len)``: shapes of the c4 weight and of ``wsum`` for an ``[N, K]`` weight."""
    kg = (k + 3) // 4
    if bits == 4:
        kg += kg & 1
    nb = (n + 15) // 16
    return (nb, kg * (32 if bits == 4 else 64)), nb * 16


@dataclass
class PackedWeight:
    packed: torch.Tensor
    scale: torch.Tensor
    bits: int
    out_features: int
    k: int

    @classmethod
    def from_int(cls, weight_q: torch.Tensor, scale: torch.Tensor, bits: int) -> "PackedWeight":
        """``weight_q`` int8 ``[N, K]`` or ``[N, Cin, kh, kw]`` (values in range for ``bits``)."""
        if weight_q.dtype != torch.int8:
            raise ValueError(f"weight_q must be int8, got {weight_q.dtype}")
        q = weight_q.permute(0, 2, 3, 1) if weight_q.dim() == 4 else weight_q
        q = q.reshape(q.shape[0], -1).contiguous()
        lim = qmax(bits)
        if q.numel() and int(q.abs().max()) > lim:
            raise ValueError(f"weight_q has values outside [-{lim}, {lim}] for {bits}-bit weights")
        if scale.shape != (q.shape[0],):
            raise ValueError(f"scale must be [{q.shape[0]}], got {tuple(scale.shape)}")
        return cls(int4.pack_weight(q, bits), scale.to(torch.float32).contiguous(), bits, q.shape[0], q.shape[1])

    def unpack(self) -> torch.Tensor:
        """int8 ``[N, K]`` (K in (kh, kw, cin) order for convolutions)."""
        return int4.unpack_weight(self.packed, self.bits, self.k)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``."""
        return self.unpack().to(torch.float32) * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale.numel() * 4
