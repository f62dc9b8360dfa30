"""int4 / int8 packing: C++ ops and the pure-torch twin agree bit for bit; exact round trips."""
import pytest
import torch

from tgpq.backends import library as ops
from tgpq.layout import int4 as packing
from tgpq.layout import PackedWeight

needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="tgpq._C not built")


@pytest.mark.parametrize("k", [1, 2, 7, 64, 131])
def test_int4_roundtrip_torch(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (9, k), generator=g, dtype=torch.int8)
    p = packing.pack_int4(q)
    assert p.shape == (9, (k + 1) // 2) and p.dtype == torch.int8
    assert torch.equal(packing.unpack_int4(p, k), q)
    # layout: even element in the low nibble, two's complement
    lo = int(p[0, 0]) & 0xF
    assert (lo - 16 if lo > 7 else lo) == int(q[0, 0])


@needs_ext
@pytest.mark.parametrize("k", [1, 7, 64, 131])
def test_int4_cpp_matches_torch_bit_for_bit(k):
    g = torch.Generator().manual_seed(100 + k)
    q = torch.randint(-8, 8, (13, k), generator=g, dtype=torch.int8)
    p_cpp = torch.ops.tgpq.pack_int4(q)
    p_py = packing.pack_int4(q)
    assert torch.equal(p_cpp, p_py)
    assert torch.equal(torch.ops.tgpq.unpack_int4(p_cpp, k), q)
    assert torch.equal(torch.ops.tgpq.unpack_int4(p_cpp, k), packing.unpack_int4(p_py, k))


def test_pack_rejects_out_of_range():
    q = torch.tensor([[3, 9]], dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        packing.pack_int4(q)
    if ops.has_extension():
        with pytest.raises(RuntimeError, match=r"\[-8, 7\]"):
            torch.ops.tgpq.pack_int4(q)
    with pytest.raises(ValueError, match="columns"):
        packing.unpack_int4(torch.zeros(2, 3, dtype=torch.int8), 9)


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_weight_conv_layout(bits):
    g = torch.Generator().manual_seed(bits)
    lim = 2 ** (bits - 1) - 1
    wq = torch.randint(-lim, lim + 1, (6, 5, 3, 3), generator=g, dtype=torch.int8)
    scale = torch.rand(6, generator=g) + 0.1
    pw = PackedWeight.from_int(wq, scale, bits)
    assert pw.k == 45 and pw.out_features == 6
    assert torch.equal(pw.unpack(), wq.permute(0, 2, 3, 1).reshape(6, 45))
    assert pw.packed.numel() == (45 if bits == 8 else 6 * 23) * (6 if bits == 8 else 1)
    with pytest.raises(ValueError, match="outside"):
        PackedWeight.from_int(torch.full((2, 3), 9, dtype=torch.int8), torch.ones(2), 4)
