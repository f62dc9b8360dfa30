"""``PackedWeight``: the one type that owns a quantized layer's weight bytes.

Tensors (all on the layer's device):
  * ``packed``: int8. bits=8: ``[N, K]`` row-major. bits=4: ``[N, ceil(K/2)]``, two values per byte
    along K, even element in the low nibble (see ``tgpq.packing``).
  * ``scale``: float32 ``[N]`` per-output-channel step size.
For convolutions ``K = kh * kw * Cin`` ordered ``(kh, kw, cin)``: the weight ``[N, Cin, kh, kw]`` is
permuted to ``[N, kh, kw, Cin]`` before flattening, which is the implicit-GEMM order over NHWC
input. All layout work happens here, once, at convert/load time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import packing


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
        lim = 2 ** (bits - 1) - 1
        if q.numel() and int(q.abs().max()) > lim:
            raise ValueError(f"weight_q has values outside [-{lim}, {lim}] for {bits}-bit weights")
        if scale.shape != (q.shape[0],):
            raise ValueError(f"scale must be [{q.shape[0]}], got {tuple(scale.shape)}")
        return cls(packing.pack_weight(q, bits), scale.to(torch.float32).contiguous(), bits, q.shape[0], q.shape[1])

    def unpack(self) -> torch.Tensor:
        """int8 ``[N, K]`` (K in (kh, kw, cin) order for convolutions)."""
        return packing.unpack_weight(self.packed, self.bits, self.k)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``."""
        return self.unpack().to(torch.float32) * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale.numel() * 4
