"""Numerics of the Triton kernels (kernels/qgemm.py, kernels/qconv2d.py) on the CPU.

CPU tensors run the kernels' own source through Triton's interpreter (see kernels/_launch.py),
so these tests need no GPU. They are slow per element, so shapes are small and odd: M, N, K are
not multiples of the interpreter's 32x32x32 tiles, K is odd for int4, M = 1 appears.

Oracles
-------
* Exact: the int32 accumulator is exact on the device, so with ``a_scale[g] * w_scale[n] == 1``
  (powers of two), inputs on half-integer grid points (ties!) and ``|acc| <= 2048`` the fp16
  output must equal the int64 reference bit for bit. This pins the rounding (half to even), the
  int4 nibble order and sign extension, the K masking and the group lookup.
* Float: general inputs (including values that clamp at +-127). The reference is the int64
  accumulator of the quantized operands with the epilogue in float64. The kernel's epilogue is
  fp32 (a product and a sum: at most ~3 fp32 roundings, bounded by 4 * 2**-24 * (|acc*s| + |b|))
  followed by the cast to fp16/bf16: at most one unit in the last place of the output, 2**-10
  relative for fp16, 2**-7 for bf16 (the interpreter converts fp32 -> bf16 by truncation, not
  round-to-nearest as the GPU does, so a full ulp rather than half).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

from kernels import qconv2d, qlinear  # noqa: E402

ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> int8 [N, ceil(K/2)]; low nibble = even k, odd K padded with 0."""
    n, k = w.shape
    if k % 2:
        w = torch.cat([w, torch.zeros(n, 1, dtype=torch.int8)], dim=1)
    lo, hi = w[:, 0::2], w[:, 1::2]
    return ((lo & 0xF) | (hi << 4)).to(torch.int8)


def quantize_x_float(x: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """The kernels' activation quantization, in torch, as float32 integers (NaN stays NaN, inf clamps)."""
    inv = torch.reciprocal(a_s.to(torch.float32))
    return torch.clamp(torch.round(x.to(torch.float32) * inv), -127, 127)


def quantize_x(x: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """The kernels' activation quantization, in torch: int64, same shape (finite x only)."""
    return quantize_x_float(x, a_s).to(torch.int64)


def make_weights(n, k, bits, gen, q=None):
    q = q if q is not None else (7 if bits == 4 else 127)
    w = torch.randint(-q, q + 1, (n, k), dtype=torch.int8, generator=gen)
    return w, (pack_int4(w) if bits == 4 else w.contiguous())


def check_close(y, acc, scale, bias, dtype):
    """y (kernel, dtype) vs float64 epilogue of the exact int64 accumulator acc [.., N]."""
    s = scale.to(torch.float64)
    ref = acc.to(torch.float64) * s
    mag = ref.abs()
    if bias is not None:
        ref = ref + bias.to(torch.float64)
        mag = mag + bias.to(torch.float64).abs()
    tol = ULP[dtype] * ref.abs() + 4 * 2.0**-24 * mag + 2.0**-24
    err = (y.to(torch.float64) - ref).abs()
    assert torch.isfinite(y).all()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} elements off; worst err {float(err.max()):.3g}, tol there {float(tol.flatten()[err.argmax()]):.3g}"


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,with_bias", [(37, 45, 71, True), (1, 33, 40, False)])
def test_qlinear_matches_int_reference(bits, dtype, m, n, k, with_bias):
    gen = torch.Generator().manual_seed(1000 * bits + m + n + k)
    w, wp = make_weights(n, k, bits, gen)
    w_scale = torch.rand(n, generator=gen) * 0.02 + 0.001
    a_scale = torch.rand(5, generator=gen) * 0.05 + 0.01
    g = 3
    group_index = torch.tensor([g], dtype=torch.int64)
    x = torch.randn(m, k, generator=gen) * 40
    x[:, ::7] *= 8  # some |x/s| > 127: exercises the clamp
    x = (x * a_scale[g]).to(dtype)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = qlinear(x, wp, w_scale, a_scale, group_index, bias, bits=bits, k=k)
    assert y.shape == (m, n) and y.dtype == dtype
    xq = quantize_x(x, a_scale[g])
    assert (xq.abs() == 127).any() and (xq.abs() < 127).any()
    acc = xq @ w.to(torch.int64).T
    check_close(y, acc, a_scale[g] * w_scale, bias, dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_qlinear_exact_ties_and_group_lookup(bits):
    """Half-integer x/s (ties), power-of-two scales with a_s * w_s == 1: y == acc exactly."""
    gen = torch.Generator().manual_seed(7 + bits)
    m, n, k = 19, 35, 33
    w, wp = make_weights(n, k, bits, gen, q=7)
    a_scale = torch.tensor([0.5, 0.125, 0.25], dtype=torch.float32)  # g = 2 -> inv = 4
    group_index = torch.tensor([2], dtype=torch.int32)
    t = torch.randint(-16, 17, (m, k), generator=gen)
    x = (t.to(torch.float32) / 8).to(torch.float16)  # x * inv = t / 2: ties at every odd t
    w_scale = torch.full((n,), 4.0)
    y = qlinear(x, wp, w_scale, a_scale, group_index, None, bits=bits, k=k)
    xq = torch.round(t.to(torch.float64) / 2).to(torch.int64)  # torch.round is half-to-even
    assert ((t % 2) != 0).any()
    acc = xq @ w.to(torch.int64).T
    assert acc.abs().max() <= 2048
    assert torch.equal(y.to(torch.int64), acc), "int32 accumulation or rounding is not exact"


def test_qlinear_leading_dims_and_group_clamp():
    gen = torch.Generator().manual_seed(3)
    w, wp = make_weights(17, 24, 8, gen)
    w_scale = torch.rand(17, generator=gen) * 0.01 + 0.001
    a_scale = torch.tensor([0.03, 0.07])
    x = torch.randn(2, 3, 24, generator=gen).to(torch.float16)
    y_hi = qlinear(x, wp, w_scale, a_scale, torch.tensor([9]), None, bits=8, k=24)  # clamped to 1
    y_1 = qlinear(x, wp, w_scale, a_scale, torch.tensor([1]), None, bits=8, k=24)
    y_0 = qlinear(x, wp, w_scale, a_scale, torch.tensor([0]), None, bits=8, k=24)
    assert y_hi.shape == (2, 3, 17)
    assert torch.equal(y_hi, y_1)
    assert not torch.equal(y_0, y_1)
    acc = quantize_x(x.reshape(6, 24), a_scale[0]) @ w.to(torch.int64).T
    check_close(y_0.reshape(6, 17), acc, a_scale[0] * w_scale, None, torch.float16)


def test_qlinear_rejects_bad_input():
    gen = torch.Generator().manual_seed(4)
    w, wp = make_weights(8, 16, 8, gen)
    ws, a_s, gi = torch.rand(8) + 0.1, torch.tensor([0.1]), torch.tensor([0])
    x = torch.randn(4, 16).to(torch.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        qlinear(x.float(), wp, ws, a_s, gi, bits=8, k=16)
    with pytest.raises(ValueError, match="columns"):
        qlinear(x, wp, ws, a_s, gi, bits=4, k=16)
    with pytest.raises(ValueError, match="last dim"):
        qlinear(x[:, :15].contiguous(), wp, ws, a_s, gi, bits=8, k=16)
    with pytest.raises(ValueError, match="contiguous"):
        qlinear(torch.randn(16, 4).to(torch.float16).T, wp, ws, a_s, gi, bits=8, k=16)
    with pytest.raises(ValueError, match="a_scale"):
        qlinear(x, wp, ws, torch.tensor([]), gi, bits=8, k=16)
    with pytest.raises(ValueError, match="group_index"):
        qlinear(x, wp, ws, a_s, torch.tensor([0.0]), bits=8, k=16)
    with pytest.raises(ValueError, match="w_scale"):
        qlinear(x, wp, ws.double(), a_s, gi, bits=8, k=16)
    with pytest.raises(ValueError, match="bits"):
        qlinear(x, wp, ws, a_s, gi, bits=3, k=16)


def check_conv_close(y, xq, a_s, w, w_scale, bias, stride, padding, dilation, dtype):
    """y vs F.conv2d in float64 on the dequantized operands (integers times scales: exact)."""
    xd = xq.to(torch.float64) * float(a_s)
    wd = w.to(torch.float64) * w_scale.to(torch.float64)[:, None, None, None]
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    ref = F.conv2d(xd, wd, None if bias is None else bias.to(torch.float64), **kw)
    mag = F.conv2d(xd.abs(), wd.abs(), None, **kw)
    if bias is not None:
        mag = mag + bias.to(torch.float64).abs()[None, :, None, None]
    tol = ULP[dtype] * ref.abs() + 4 * 2.0**-24 * mag + 2.0**-24
    err = (y.to(torch.float64) - ref).abs()
    assert torch.isfinite(y).all()
    bad = err > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} off; worst err {float(err.max()):.3g}"


CONV_CASES = [
    # (B, Cin, H, W, Cout, kernel, stride, padding, dilation)
    (2, 5, 7, 6, 11, 3, 1, 1, 1),     # 3x3 pad 1, odd channels, general K path
    (1, 7, 9, 8, 13, 3, 2, 1, 1),     # 3x3 stride 2 (downsample), odd sizes
    (2, 32, 5, 5, 9, 1, 1, 0, 1),     # 1x1, Cin multiple of the K tile: aligned path
    (1, 32, 6, 7, 10, 3, 2, 1, 1),    # aligned path with stride 2 and padding
    (1, 3, 8, 8, 7, 3, 1, 2, 2),      # dilation 2 (RGB-like stem)
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "b{}c{}h{}w{}o{}k{}s{}p{}d{}".format(*c))
@pytest.mark.parametrize("bits,dtype", [(8, torch.float16), (4, torch.bfloat16)])
def test_qconv2d_matches_float64_conv(case, bits, dtype):
    b, cin, h, w_, cout, ks, st, pad, dil = case
    gen = torch.Generator().manual_seed(hash(case) % 10000 + bits)
    q = 7 if bits == 4 else 127
    w = torch.randint(-q, q + 1, (cout, cin, ks, ks), dtype=torch.int8, generator=gen)
    w_gemm = w.permute(0, 2, 3, 1).reshape(cout, ks * ks * cin).contiguous()
    wp = pack_int4(w_gemm) if bits == 4 else w_gemm
    w_scale = torch.rand(cout, generator=gen) * 0.02 + 0.001
    a_scale = torch.rand(4, generator=gen) * 0.05 + 0.01
    g = 1
    x = torch.randn(b, cin, h, w_, generator=gen) * 40
    x[:, ::3] *= 8  # some channels clamp
    x = (x * a_scale[g]).to(dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, generator=gen)
    y = qconv2d(x, wp, w_scale, a_scale, torch.tensor([g]), bias, bits=bits, in_channels=cin,
                kernel_size=ks, stride=st, padding=pad, dilation=dil)
    ref_shape = F.conv2d(torch.zeros(1, cin, h, w_), torch.zeros(cout, cin, ks, ks), stride=st, padding=pad,
                         dilation=dil).shape[2:]
    assert y.shape == (b, cout, *ref_shape) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    xq = quantize_x(x, a_scale[g])
    check_conv_close(y, xq, a_scale[g], w, w_scale, bias, st, pad, dil, dtype)


def test_qconv2d_rejects_bad_input():
    w = torch.randint(-7, 8, (4, 3 * 3 * 3), dtype=torch.int8)
    ws, a_s, gi = torch.rand(4) + 0.1, torch.tensor([0.1]), torch.tensor([0])
    x = torch.randn(1, 3, 5, 5).to(torch.float16)
    geo = dict(bits=8, in_channels=3, kernel_size=3, stride=1, padding=1)
    with pytest.raises(ValueError, match="channels_last"):
        qconv2d(x.contiguous(), w, ws, a_s, gi, **geo)  # NCHW-contiguous
    xl = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="in_channels"):
        qconv2d(torch.randn(1, 4, 5, 5).to(torch.float16).contiguous(memory_format=torch.channels_last),
                w, ws, a_s, gi, **geo)
    with pytest.raises(ValueError, match="columns"):
        qconv2d(xl, w, ws, a_s, gi, **{**geo, "bits": 4})
    with pytest.raises(TypeError, match="int8"):
        qconv2d(xl, w.to(torch.int16), ws, a_s, gi, **geo)
    with pytest.raises(ValueError, match="too small"):
        qconv2d(xl, w, ws, a_s, gi, **{**geo, "padding": 0, "dilation": 3})


# --------------------------------------------------------------------------------------------
# Non-finite activations (issue 14): a NaN makes exactly the outputs NaN that read it, as the reference
# backend (fake-quantize, then compute in float) does; +-inf clamps to +-127 like any large value.
# The interpreter casts the NaN row's quantized values to int8 with numpy, which warns; those values
# never reach the output (the row is NaN).
NAN_CAST_WARNING = "ignore:invalid value encountered in cast:RuntimeWarning"
# bit patterns at the edges of the kernels' NaN test: the smallest-payload NaN, a NaN with the sign bit set,
# and +-inf, which must not flag the row (fp16: exponent 5 bits, bf16: 8 bits)
EDGE_BITS = {torch.float16: dict(nan_min=0x7C01, nan_neg=-0x0200, inf=0x7C00, ninf=-0x0400),
             torch.bfloat16: dict(nan_min=0x7F81, nan_neg=-0x0040, inf=0x7F80, ninf=-0x0080)}
BIG = {torch.float16: 60000.0, torch.bfloat16: 1e30}  # finite, far beyond 127 steps: clamps as +-inf must


def poke(x, idx, bits):
    """x[idx] = the fp16/bf16 value with these int16 bits (negative: the sign bit set)."""
    x.view(torch.int16)[idx] = bits


def bits_equal(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def check_nan_like_reference(y, xd, wd, bias, op, dtype, **kw):
    """y vs ``op`` (F.linear / F.conv2d) in float64 on the dequantized operands ``xd`` (NaN kept) and ``wd``:
    the same NaN pattern, and every other output within the kernels' tolerance (see check_close)."""
    ref = op(xd, wd, bias, **kw)
    mag = op(xd.nan_to_num().abs(), wd.abs(), None if bias is None else bias.abs(), **kw)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), "the NaN pattern differs from the reference"
    ok = ~torch.isnan(ref)
    err = (y[ok].to(torch.float64) - ref[ok]).abs()
    tol = ULP[dtype] * ref[ok].abs() + 4 * 2.0**-24 * mag[ok] + 2.0**-24
    assert torch.isfinite(y[ok]).all() and (err <= tol).all(), float(err.max())
    return ref


@pytest.mark.filterwarnings(NAN_CAST_WARNING)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qlinear_nan_rows_like_the_reference(bits, dtype):
    """NaNs in the first, a middle and the masked last K tile of three rows (one a smallest-payload NaN, one
    with the sign bit set); +-inf in two others. NaN rows are NaN in every column; every other row has the
    bits it has when the NaNs are zeros and the infinities large finite values (which clamp the same)."""
    gen = torch.Generator().manual_seed(11 + bits)
    m, n, k = 29, 37, 71  # K: tiles of 32, 32 and a masked 7
    w, wp = make_weights(n, k, bits, gen)
    w_scale = torch.rand(n, generator=gen) * 0.02 + 0.001
    a_scale = torch.tensor([0.04, 0.02])
    e = EDGE_BITS[dtype]
    clean = (torch.randn(m, k, generator=gen) * 0.5).to(dtype)
    clean[3, 5], clean[4, 66] = BIG[dtype], -BIG[dtype]
    x = clean.clone()
    x[0, 0] = float("nan")
    poke(x, (7, 40), e["nan_min"])
    poke(x, (28, 70), e["nan_neg"])
    poke(x, (3, 5), e["inf"])
    poke(x, (4, 66), e["ninf"])
    assert torch.isnan(x).sum() == 3 and torch.isinf(x).sum() == 2
    clean[0, 0] = clean[7, 40] = clean[28, 70] = 0.0
    bias = torch.randn(n, generator=gen)
    args = (wp, w_scale, a_scale, torch.tensor([1]), bias)
    y = qlinear(x, *args, bits=bits, k=k)
    y_clean = qlinear(clean, *args, bits=bits, k=k)
    nan_rows = [0, 7, 28]
    assert torch.isnan(y).any(1).nonzero().flatten().tolist() == nan_rows and torch.isnan(y[nan_rows]).all()
    keep = [r for r in range(m) if r not in nan_rows]
    assert bits_equal(y[keep], y_clean[keep])
    check_close(y_clean, quantize_x(clean, a_scale[1]) @ w.to(torch.int64).T, a_scale[1] * w_scale, bias, dtype)
    xd = quantize_x_float(x, a_scale[1]).to(torch.float64) * float(a_scale[1])
    check_nan_like_reference(y, xd, w.to(torch.float64) * w_scale.to(torch.float64)[:, None],
                             bias.to(torch.float64), F.linear, dtype)


@pytest.mark.filterwarnings(NAN_CAST_WARNING)
@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[3], CONV_CASES[4]],
                         ids=["general_k", "aligned_s2", "dilated_stem"])
@pytest.mark.parametrize("bits,dtype", [(8, torch.float16), (4, torch.bfloat16), (8, torch.bfloat16)])
def test_qconv2d_nan_receptive_fields_like_the_reference(case, bits, dtype):
    """NaN pixels (one on the border, one a sign-bit NaN in the last channel) poison exactly the output
    pixels whose receptive field holds them, in every output channel; zero padding stays zero; +inf
    clamps; every other output has the bits it has without the NaNs."""
    b, cin, h, w_, cout, ks, st, pad, dil = case
    gen = torch.Generator().manual_seed(cin + h + bits)
    q = 7 if bits == 4 else 127
    w = torch.randint(-q, q + 1, (cout, cin, ks, ks), dtype=torch.int8, generator=gen)
    wg = w.permute(0, 2, 3, 1).reshape(cout, ks * ks * cin).contiguous()
    wp = pack_int4(wg) if bits == 4 else wg
    w_scale = torch.rand(cout, generator=gen) * 0.02 + 0.001
    a_scale = torch.tensor([0.03])
    clean = (torch.randn(b, cin, h, w_, generator=gen) * 0.5).to(dtype)
    clean[0, cin // 2, h - 1, 1] = BIG[dtype]
    x = clean.clone()
    x[0, 0, 0, w_ - 1] = float("nan")
    poke(x, (-1, cin - 1, h // 2, w_ // 2), EDGE_BITS[dtype]["nan_neg"])
    poke(x, (0, cin // 2, h - 1, 1), EDGE_BITS[dtype]["inf"])
    clean[0, 0, 0, w_ - 1] = clean[-1, cin - 1, h // 2, w_ // 2] = 0.0
    x, clean = (t.contiguous(memory_format=torch.channels_last) for t in (x, clean))
    bias = torch.randn(cout, generator=gen)
    geo = dict(bits=bits, in_channels=cin, kernel_size=ks, stride=st, padding=pad, dilation=dil)
    y = qconv2d(x, wp, w_scale, a_scale, torch.tensor([0]), bias, **geo)
    y_clean = qconv2d(clean, wp, w_scale, a_scale, torch.tensor([0]), bias, **geo)
    xd = quantize_x_float(x, a_scale[0]).to(torch.float64) * float(a_scale[0])
    ref = check_nan_like_reference(y, xd, w.to(torch.float64) * w_scale.to(torch.float64)[:, None, None, None],
                                   bias.to(torch.float64), F.conv2d, dtype, stride=st, padding=pad, dilation=dil)
    pix_nan = torch.isnan(ref).any(1, keepdim=True)
    assert torch.equal(torch.isnan(ref), pix_nan.expand_as(ref))  # every channel of a poisoned pixel
    ok = ~torch.isnan(y)
    assert torch.equal(y[ok].view(torch.int16), y_clean[ok].view(torch.int16))


@pytest.mark.filterwarnings(NAN_CAST_WARNING)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_ops_match_the_reference_backend_on_nan(dtype):
    """The triton backend's ops (tgpq.backends.triton, the kernels through the interpreter) against the
    reference backend's own forward on the same QLinear / QConv2d: NaN in the same outputs, the rest close.
    No infinities here: the reference backend's fake-quantization rounds with a straight-through estimator,
    ``(round(v) - v).detach() + v``, which is NaN for v = +-inf (main, tgpq/numerics/activations.py), where
    the kernels, the cpu backend and ``quantize_act`` clamp (the tests above pin the kernels' clamp)."""
    from tgpq.backends import triton as tb
    from tgpq.nn import QConv2d, QLinear
    from tgpq.numerics import mse_weight_scale, quantize_weight
    from tgpq.recipe import LayerQState

    gen = torch.Generator().manual_seed(17)
    torch.manual_seed(17)
    conv, lin = torch.nn.Conv2d(9, 12, 3, padding=1), torch.nn.Linear(40, 11)
    xc = torch.randn(2, 9, 7, 6, generator=gen).to(dtype)
    xc[1, 4, 3, 0] = float("nan")
    xl = torch.randn(5, 40, generator=gen).to(dtype)
    xl[2, 39] = float("nan")
    with torch.no_grad():
        for fl, x in ((conv, xc), (lin, xl)):
            s = mse_weight_scale(fl.weight, 8)
            cls = QConv2d if isinstance(fl, torch.nn.Conv2d) else QLinear
            layer = cls.from_float(fl, LayerQState(quantize_weight(fl.weight, s, 8), s, torch.tensor([0.05])), 8)
            layer.backend = "reference"
            ref = layer(x.float())
            if cls is QLinear:
                got = tb.qlinear_cuda(x, layer.w_packed, None, layer.w_scale, layer.a_scale, layer.group_index,
                                      layer.bias, 8, layer.out_features_, layer.in_features, 0)
            else:
                got = tb.qconv2d_cuda(x.contiguous(memory_format=torch.channels_last), layer.w_packed, None,
                                      layer.w_scale, layer.a_scale, layer.group_index, layer.bias, 8,
                                      layer.out_channels, layer.in_channels, layer.kernel_size, layer.stride,
                                      layer.padding, layer.dilation, 0)
            assert torch.isnan(ref).any() and not torch.isnan(ref).all()
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            ok = ~torch.isnan(ref)
            assert torch.allclose(got[ok].float(), ref[ok], rtol=ULP[dtype], atol=1e-3)


# --------------------------------------------------------------------------------------------
# On a CUDA device: the autotuned kernels at full size (skipped on CPU machines). The shapes are also in
# benchmarks/bench_kernels.py (TEST_GEMMS / TEST_CONVS), whose --precompile compiles them ahead in the GPU
# suite; tests/test_gpu_suite.py keeps the two lists equal.
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_GEMM_SHAPES = [(1, 1024, 1024), (333, 770, 1000), (4096, 4096, 4096)]  # (M, N, K)
GPU_CONV_CASES = [(8, 128, 32, 32, 128, 3, 1, 1, 1), (8, 256, 16, 16, 256, 3, 2, 1, 1),
                  (8, 384, 16, 16, 256, 1, 1, 0, 1), (4, 3, 32, 32, 128, 3, 1, 1, 1)]  # (B, Cin, H, W, Cout, k, s, p, d)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", GPU_GEMM_SHAPES)
def test_qlinear_gpu_full_size(bits, dtype, m, n, k):
    gen = torch.Generator().manual_seed(m + n + k + bits)
    w, wp = make_weights(n, k, bits, gen)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    a_scale = torch.rand(5, generator=gen) * 0.05 + 0.01
    x = (torch.randn(m, k, generator=gen) * 40 * a_scale[2]).to(dtype)
    bias = torch.randn(n, generator=gen)
    dev = "cuda"
    acc = quantize_x(x, a_scale[2]) @ w.to(torch.int64).T
    ulp = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # the GPU rounds to nearest: half an ulp
    ref = acc.to(torch.float64) * (a_scale[2] * w_scale).to(torch.float64) + bias.to(torch.float64)
    mag = (acc.to(torch.float64) * (a_scale[2] * w_scale).to(torch.float64)).abs() + bias.abs().to(torch.float64)
    gluon_ok = bits == 8 and torch.cuda.get_device_capability()[0] == 9 and k % 64 == 0
    for path in (("gluon", "tl_dot") if gluon_ok else ("tl_dot", )):
        y = qlinear(x.to(dev), wp.to(dev), w_scale.to(dev), a_scale.to(dev), torch.tensor([2], device=dev),
                    bias.to(dev), bits=bits, k=k, path=path).cpu()
        err = (y.to(torch.float64) - ref).abs()
        assert (err <= ulp[dtype] * ref.abs() + 4 * 2.0**-24 * mag + 2.0**-24).all(), (path, float(err.max()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GPU_CONV_CASES)
@pytest.mark.parametrize("bits", [8, 4])
def test_qconv2d_gpu_unet_shapes(case, bits):
    b, cin, h, w_, cout, ks, st, pad, dil = case
    gen = torch.Generator().manual_seed(cin + cout + bits)
    q = 7 if bits == 4 else 127
    w = torch.randint(-q, q + 1, (cout, cin, ks, ks), dtype=torch.int8, generator=gen)
    w_gemm = w.permute(0, 2, 3, 1).reshape(cout, -1).contiguous()
    wp = pack_int4(w_gemm) if bits == 4 else w_gemm
    w_scale = torch.rand(cout, generator=gen) * 0.01 + 0.001
    a_scale = torch.rand(3, generator=gen) * 0.05 + 0.01
    x = (torch.randn(b, cin, h, w_, generator=gen) * 40 * a_scale[0]).half().contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, generator=gen)
    dev = "cuda"
    # int64 group index, as converted layers pass it (the interpreter tests cover int32)
    y = qconv2d(x.to(dev), wp.to(dev), w_scale.to(dev), a_scale.to(dev), torch.tensor([0], device=dev),
                bias.to(dev), bits=bits, in_channels=cin, kernel_size=ks, stride=st, padding=pad).cpu()
    check_conv_close(y, quantize_x(x, a_scale[0]), a_scale[0], w, w_scale, bias, st, pad, dil, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (333, 770, 1024), (4096, 4096, 4096)])
def test_gluon_wgmma_async_gemm_gpu(m, n, k):
    from kernels.qgemm_gluon import qlinear_w8a8_gluon
    gen = torch.Generator().manual_seed(m + n + k)
    w, wp = make_weights(n, k, 8, gen)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    a_scale = torch.rand(5, generator=gen) * 0.05 + 0.01
    x = (torch.randn(m, k, generator=gen) * 40 * a_scale[4]).half()
    bias = torch.randn(n, generator=gen)
    dev = "cuda"
    y = qlinear_w8a8_gluon(x.to(dev), wp.to(dev), w_scale.to(dev), a_scale.to(dev), torch.tensor([4], device=dev),
                           bias.to(dev), k=k).cpu()
    acc = quantize_x(x, a_scale[4]) @ w.to(torch.int64).T
    check_close(y, acc, a_scale[4] * w_scale, bias, torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper (sm_90) GPU")
@pytest.mark.skipif(os.environ.get("TGPQ_WGMMA_ASYNC", "1") == "0", reason="TGPQ_WGMMA_ASYNC=0 turns the Gluon path off")
def test_gluon_is_the_w8a8_default_on_sm90():
    """The triton backend must really choose the Gluon kernel for W8A8 on Hopper: its fallback to tl.dot
    only warns, so the numerical tests above would pass either way. Fails when the installed triton
    (3.6.0 on the GPU machine) cannot compile it or it disagrees with the tl.dot kernel."""
    import warnings

    from tgpq.backends import triton as triton_backend
    gen = torch.Generator().manual_seed(7)
    m, n, k = 200, 384, 512
    w, wp = make_weights(n, k, 8, gen)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    a_scale = torch.rand(3, generator=gen) * 0.05 + 0.01
    x = (torch.randn(m, k, generator=gen) * 40 * a_scale[1]).half()
    dev = "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variant = triton_backend.VARIANTS[triton_backend.gemm_variant(torch.device(dev))]
    assert variant == "gluon", [str(c.message) for c in caught]
    y = qlinear(x.to(dev), wp.to(dev), w_scale.to(dev), a_scale.to(dev), torch.tensor([1], device=dev),
                None, bits=8, k=k, path=variant).cpu()
    acc = quantize_x(x, a_scale[1]) @ w.to(torch.int64).T
    check_close(y, acc, a_scale[1] * w_scale, None, torch.float16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_nan_rows_and_receptive_fields_on_the_device(bits):
    """The compiled kernels (every W8A8 GEMM path, conv) at GPU sizes: NaN exactly where the reference has it."""
    gen = torch.Generator().manual_seed(21 + bits)
    dev = "cuda"
    m, n, k = 300, 512, 1024
    w, wp = make_weights(n, k, bits, gen)
    w_scale = torch.rand(n, generator=gen) * 0.01 + 0.001
    a_scale = torch.tensor([0.05, 0.03])
    x = (torch.randn(m, k, generator=gen) * 2).half()
    for r, c in ((0, 0), (m // 2, 517 % k), (m - 1, k - 1)):
        x[r, c] = float("nan")
    x[7, 3], x[8, 900] = float("inf"), float("-inf")
    bias = torch.randn(n, generator=gen)
    xd = quantize_x_float(x, a_scale[1]).to(torch.float64) * float(a_scale[1])
    wd = w.to(torch.float64) * w_scale.to(torch.float64)[:, None]
    paths = ("gluon", "tl_dot") if bits == 8 and torch.cuda.get_device_capability()[0] == 9 else ("tl_dot", )
    for path in paths:
        y = qlinear(x.to(dev), wp.to(dev), w_scale.to(dev), a_scale.to(dev), torch.tensor([1], device=dev),
                    bias.to(dev), bits=bits, k=k, path=path).cpu()
        check_nan_like_reference(y, xd, wd, bias.to(torch.float64), F.linear, torch.float16)
    b, cin, h, w_, cout = 4, 128, 16, 16, 128
    wc = torch.randint(-7 if bits == 4 else -127, 8 if bits == 4 else 128, (cout, cin, 3, 3), dtype=torch.int8,
                       generator=gen)
    wg = wc.permute(0, 2, 3, 1).reshape(cout, -1).contiguous()
    xc = (torch.randn(b, cin, h, w_, generator=gen) * 2).half()
    xc[0, 5, 0, 0], xc[3, 127, 8, 9] = float("nan"), float("nan")
    xc = xc.contiguous(memory_format=torch.channels_last)
    y = qconv2d(xc.to(dev), (pack_int4(wg) if bits == 4 else wg).to(dev), w_scale[:cout].to(dev), a_scale.to(dev),
                torch.tensor([0], device=dev), None, bits=bits, in_channels=cin, kernel_size=3, stride=1,
                padding=1).cpu()
    xcd = quantize_x_float(xc, a_scale[0]).to(torch.float64) * float(a_scale[0])
    check_nan_like_reference(y, xcd, wc.to(torch.float64) * w_scale[:cout].to(torch.float64)[:, None, None, None],
                             None, F.conv2d, torch.float16, padding=1)
