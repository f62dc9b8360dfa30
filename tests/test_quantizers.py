import pytest
import torch

from tgpq import QuantConfig
from tgpq.recipe import parse_bits
from tgpq.numerics import (absmax_weight_scale, dequantize_weight, fake_quant_act, mse_weight_scale, qmax,
                           quantize_act, quantize_weight)
from tgpq.nn.routing import group_of, timestep_groups_from_calibration, uniform_timestep_groups


@pytest.mark.parametrize("kw", [dict(weight_bits=3), dict(weight_bits=16), dict(act_bits=4), dict(act_bits=16)])
def test_bad_bits_raise_with_supported_values(kw):
    with pytest.raises(ValueError, match="supported"):
        QuantConfig(**kw)


def test_bad_method_and_bitspec():
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig(method="brecq")
    assert parse_bits("w4a8") == (4, 8)
    with pytest.raises(ValueError, match="W<bits>A<bits>"):
        parse_bits("int8")
    with pytest.raises(ValueError, match="supported"):
        parse_bits("W2A8")


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_quant_range_and_mse_search_beats_absmax(bits):
    torch.manual_seed(0)
    # heavy-tailed weights: clipping pays off
    w = torch.distributions.StudentT(3.0).sample((64, 96))
    s_mse = mse_weight_scale(w, bits)
    s_abs = absmax_weight_scale(w, bits)
    q = quantize_weight(w, s_mse, bits)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax(bits)
    err_mse = (dequantize_weight(q, s_mse) - w).pow(2).sum(1)
    err_abs = (dequantize_weight(quantize_weight(w, s_abs, bits), s_abs) - w).pow(2).sum(1)
    assert bool((err_mse <= err_abs + 1e-6).all())
    if bits == 4:  # at 4 bits clipping the tails must pay off clearly
        assert float(err_mse.sum()) < 0.9 * float(err_abs.sum())


def test_act_quant_rounds_half_to_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 500.0, -500.0, 0.49])
    assert quantize_act(x, 1.0).tolist() == [0, 2, 2, 0, -2, 127, -127, 0]
    torch.manual_seed(1)
    x = torch.randn(1000)
    s = 0.02
    err = (fake_quant_act(x, s) - x).abs()
    inside = x.abs() <= 127 * s
    assert float(err[inside].max()) <= s / 2 + 1e-7


def test_timestep_groups():
    t = uniform_timestep_groups(5, 1000)
    assert t.shape == (1000,) and t.bincount().tolist() == [200] * 5
    kept = torch.arange(9, 1000, 50)  # 20 kept timesteps
    g = timestep_groups_from_calibration(kept, 5)
    assert g.min() == 0 and g.max() == 4
    assert bool((g[1:] >= g[:-1]).all())  # contiguous, monotone
    # every chunk of 4 kept timesteps lands in one group
    assert [len(set(g[kept[i:i + 4]].tolist())) for i in range(0, 20, 4)] == [1] * 5
    assert group_of(torch.tensor([999.4]), g).tolist() == [4]
    with pytest.raises(ValueError, match="groups"):
        timestep_groups_from_calibration([1, 2], 5)


def test_cpp_quantize_act_matches_numerics_bit_for_bit():
    from tgpq.backends import library as ops

    if not ops.has_extension():
        pytest.skip("tgpq._C not built")
    torch.manual_seed(3)
    x = torch.randn(4097) * 3
    x[:8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1e4, -1e4, 0.0]) * 0.04  # ties at scale 0.04
    table = torch.tensor([0.01, 0.04, 0.3])
    for g in range(3):
        got = torch.ops.tgpq.quantize_act(x, table, torch.tensor([g]))
        assert torch.equal(got, quantize_act(x, table[g]))
    with pytest.raises(RuntimeError, match="outside the scale table"):
        torch.ops.tgpq.quantize_act(x, table, torch.tensor([3]))


def test_fake_quant_clamps_infinities_and_keeps_nan_like_the_kernels():
    """+-inf become +-127 steps (as quantize_act, the cpu backend and the Triton kernels); NaN stays NaN;
    finite values are those of quantize_act * scale, with the straight-through gradient inside the range."""
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 3.7, -1000.0, 0.25], requires_grad=True)
    y = fake_quant_act(x, 0.5)
    assert y[:2].tolist() == [63.5, -63.5] and torch.isnan(y[2])
    assert torch.equal(y[3:].detach(), quantize_act(x[3:].detach(), 0.5).float() * 0.5)
    y[3:].sum().backward()
    assert x.grad[3:].tolist() == [1.0, 0.0, 1.0]
