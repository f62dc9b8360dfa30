"""QLinear / QConv2d: every CPU-reachable backend agrees with a float64 fake-quant oracle.

Oracle: quantize the input with the contract's float32 arithmetic (round-half-even of
x * (1/a_scale)), then compute the integer matmul / conv in float64 and apply the scales in float64.
Bound: the integer products are exact in both; what remains is float32 rounding of the
accumulation (reference backend, <= K * 2^-24 relative to sum |terms|) or of the epilogue (cpu,
a few ulps). We assert |y - oracle| <= 1e-5 * (max|oracle| + 1).
"""
import pytest
import torch
import torch.nn.functional as F

from tgpq.backends import library as ops
from tgpq.nn import QConv2d, QLinear, QSplitConv2d
from tgpq.numerics import mse_weight_scale, quantize_act, quantize_weight
from tgpq.recipe import LayerQState

BACKENDS = ["reference"] + (["cpu"] if ops.has_extension() else [])


def _lq(weight, bits, groups, gen):
    s = mse_weight_scale(weight, bits)
    a = torch.rand(groups, generator=gen) * 0.05 + 0.01
    return LayerQState(quantize_weight(weight, s, bits), s, a)


def _close(y, ref):
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-5 * (ref.abs().max().item() + 1), err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n", [(1, 7, 5), (13, 33, 17), (64, 129, 40)])
def test_qlinear_matches_oracle(backend, bits, m, k, n):
    gen = torch.Generator().manual_seed(m * 1000 + k + bits)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.2)
        lin.bias.copy_(torch.randn(n, generator=gen))
    lq = _lq(lin.weight, bits, 3, gen)
    layer = QLinear.from_float(lin, lq, bits)
    layer.backend = backend
    x = torch.randn(2, m, k, generator=gen)
    for g in range(3):
        layer.set_group(g)
        y = layer(x)
        assert y.shape == (2, m, n) and y.dtype == torch.float32
        s = lq.act_scale[g]
        xq = quantize_act(x, s).double()
        ref = (xq @ lq.weight_q.double().T) * (s.double() * lq.weight_scale.double()) + lin.bias.double()
        _close(y, ref)


CONV_CASES = [
    # cin, cout, k, stride, pad, dil, H, W
    (3, 5, 3, 1, 1, 1, 9, 7),
    (6, 10, 3, 2, 1, 1, 11, 9),
    (5, 7, 1, 1, 0, 1, 6, 5),
    (4, 6, 3, 1, 2, 2, 8, 8),
    (7, 4, 3, 2, 0, 1, 9, 9),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CONV_CASES)
def test_qconv2d_matches_oracle(backend, bits, case):
    cin, cout, ks, stride, pad, dil, h, w = case
    gen = torch.Generator().manual_seed(sum(case) + bits)
    conv = torch.nn.Conv2d(cin, cout, ks, stride=stride, padding=pad, dilation=dil)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
        conv.bias.copy_(torch.randn(cout, generator=gen))
    lq = _lq(conv.weight, bits, 2, gen)
    layer = QConv2d.from_float(conv, lq, bits)
    layer.backend = backend
    x = torch.randn(2, cin, h, w, generator=gen).contiguous(memory_format=torch.channels_last)
    layer.set_group(1)
    y = layer(x)
    s = lq.act_scale[1]
    ref = F.conv2d(quantize_act(x, s).double(), lq.weight_q.double(), None, stride, pad, dil)
    ref = ref * (s.double() * lq.weight_scale.double())[None, :, None, None] + conv.bias.double()[None, :, None, None]
    assert y.shape == ref.shape
    _close(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_conv_equals_per_branch_quantization(backend):
    gen = torch.Generator().manual_seed(5)
    conv = torch.nn.Conv2d(10, 6, 3, padding=1)
    s = mse_weight_scale(conv.weight, 8)
    wq = quantize_weight(conv.weight, s, 8)
    act = torch.tensor([[0.01, 0.05], [0.02, 0.03]])
    layer = QSplitConv2d.from_float(conv, LayerQState(wq, s, act, in_splits=(4, 6)), 8)
    for p in layer.parts:
        p.backend = backend
        p.set_group(1)
    a, b = torch.randn(2, 4, 7, 7, generator=gen), torch.randn(2, 6, 7, 7, generator=gen) * 5
    y = layer(torch.cat([a, b], 1))
    xq = torch.cat([quantize_act(a, act[1, 0]).double() * act[1, 0].double(),
                    quantize_act(b, act[1, 1]).double() * act[1, 1].double()], 1)
    ref = F.conv2d(xq, wq.double() * s.double()[:, None, None, None], conv.bias.double(), 1, 1)
    _close(y, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_rejected(backend):
    lin = torch.nn.Linear(8, 4)
    s = mse_weight_scale(lin.weight, 8)
    layer = QLinear.from_float(lin, LayerQState(quantize_weight(lin.weight, s, 8), s, torch.ones(2)), 8)
    layer.backend = backend
    with pytest.raises(ValueError, match="8 input features"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match="outside"):
        layer.set_group(2)
    conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="grouped"):
        QConv2d.check_supported(conv)
    with pytest.raises(ValueError, match="bits"):
        QLinear(8, 4, bits=3, num_groups=1)


@pytest.mark.skipif(not ops.has_extension(), reason="tgpq._C not built")
def test_cpu_backend_bf16_and_errors():
    gen = torch.Generator().manual_seed(9)
    lin = torch.nn.Linear(16, 8)
    s = mse_weight_scale(lin.weight, 8)
    layer = QLinear.from_float(lin, LayerQState(quantize_weight(lin.weight, s, 8), s, torch.tensor([0.03])), 8)
    x = torch.randn(5, 16, generator=gen)
    layer.backend = "cpu"
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    layer.backend = "reference"
    ref = layer(x.bfloat16().float())
    assert (y16.float() - ref).abs().max() <= 1e-2 * (ref.abs().max() + 1)  # bf16 output rounding
    from tgpq.backends import cpu as cb

    w_c4, wsum = cb.prepare(layer)
    with pytest.raises((TypeError, RuntimeError)):
        torch.ops.tgpq.qlinear(x.double(), w_c4, wsum, layer.w_scale, layer.a_scale,
                               torch.zeros(1, dtype=torch.int64), None, 8, 8, 16, -1)
    with pytest.raises(RuntimeError, match="outside the scale table"):
        torch.ops.tgpq.qlinear(x, w_c4, wsum, layer.w_scale, layer.a_scale,
                               torch.tensor([3]), None, 8, 8, 16, -1)
