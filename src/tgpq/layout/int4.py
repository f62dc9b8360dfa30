"""int4 packing: pure-torch twins of the C++ ops `pack_int4` / `unpack_int4` (the reference backend uses these).

int8: ``[N, K]`` int8, row-major, as is.
int4: ``[N, ceil(K/2)]`` int8. Byte ``j`` of row ``n`` holds element ``2j`` in its low nibble and
element ``2j+1`` in its high nibble, two's-complement nibbles (-8..7); an odd ``K`` is padded with
a zero nibble. The C++ op ``torch.ops.tgpq.pack_int4`` produces the same bytes.
"""
from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` with values in [-8, 7] -> int8 ``[N, ceil(K/2)]``."""
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects an int8 [N, K] tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7] for int4 packing")
    n, k = q.shape
    if k % 2:
        q = torch.cat([q, q.new_zeros(n, 1)], dim=1)
    lo = q[:, 0::2].to(torch.int16) & 0x0F
    hi = (q[:, 1::2].to(torch.int16) & 0x0F) << 4
    return (lo | hi).to(torch.uint8).view(torch.int8).contiguous()


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int8 ``[N, ceil(K/2)]`` -> int8 ``[N, K]`` (sign-extended nibbles)."""
    if packed.dim() != 2 or packed.dtype != torch.int8:
        raise ValueError(f"unpack_int4 expects an int8 [N, ceil(K/2)] tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"unpack_int4: packed has {packed.shape[1]} columns, expected ceil({k}/2) = {(k + 1) // 2}")
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)
    hi = torch.bitwise_right_shift(packed, 4)
    out = torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)
    return out[:, :k].contiguous()


def pack_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 ``[N, K]`` -> the canonical packed form for ``bits`` (a copy for 8 bits)."""
    if bits == 8:
        return q.contiguous().clone()
    if bits == 4:
        return pack_int4(q)
    raise ValueError(f"bits={bits} is not supported: use 4 or 8")


def unpack_weight(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    if bits == 8:
        return packed
    if bits == 4:
        return unpack_int4(packed, k)
    raise ValueError(f"bits={bits} is not supported: use 4 or 8")
