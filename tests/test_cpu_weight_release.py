"""The cpu backend holds one copy of a layer's weight per kernel family that serves it: a layer oneDNN serves for
every shape it has seen drops the microkernels' c4 copy (auto mode), rebuilt when needed (a NaN input, a shape the
microkernels win, a torch.compile graph). The kernel choice is made deterministic here (oneDNN "measured" faster)
so that the release happens whatever the machine's load; it needs a CPU where auto mode may choose oneDNN."""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_small_unet, minmax_qstate

import tgpq
from tgpq.backends import library as ops
from tgpq.nn import QConv2d, QLinear
from tgpq.numerics import mse_weight_scale, quantize_weight
from tgpq.recipe import LayerQState

if ops.has_extension():
    from tgpq.backends import cpu as cb
    from tgpq.backends import cpu_dispatch, onednn

    AUTO_ONEDNN = onednn.available() and onednn.exact_on(cb.current_isa())
else:  # pragma: no cover
    AUTO_ONEDNN = False

pytestmark = pytest.mark.skipif(not AUTO_ONEDNN, reason="auto mode chooses oneDNN only where it is exact (VNNI)")


@pytest.fixture
def onednn_wins(monkeypatch):
    """Fresh plans, and every auto measurement finds oneDNN faster (``_timed`` is asked oneDNN first)."""
    monkeypatch.setattr(cpu_dispatch, "_PLANS", {})
    times = itertools.cycle([0.0, 1.0])
    monkeypatch.setattr(cpu_dispatch, "_timed", lambda fn: (fn(), next(times))[1])
    with cb.force_kernel("auto"):
        yield


def _layers(gen):
    conv = torch.nn.Conv2d(24, 40, 3, padding=1)
    lin = torch.nn.Linear(48, 56)
    out = []
    for m, cls in ((conv, QConv2d), (lin, QLinear)):
        s = mse_weight_scale(m.weight, 8)
        lq = LayerQState(quantize_weight(m.weight, s, 8), s, torch.rand(1, generator=gen) * 0.05 + 0.01)
        out.append(cls.from_float(m, lq, 8))
    return out


def test_a_layer_served_by_onednn_drops_the_microkernel_copy_and_still_computes_the_same(onednn_wins):
    gen = torch.Generator().manual_seed(3)
    conv, lin = _layers(gen)
    x, xl = torch.randn(2, 24, 9, 9, generator=gen), torch.randn(7, 48, generator=gen)
    with torch.no_grad():
        cb.prepare(conv), cb.prepare(lin)  # as convert does
        y, yl = conv(x), lin(xl)
        assert conv._cpu_w_c4 is None and lin._cpu_w_c4 is None, "oneDNN serves both: the c4 copies must go"
        assert set(cb.served_by(conv).values()) == {"onednn"}
        with cb.force_kernel("onednn"):
            assert torch.equal(y, conv(x)) and torch.equal(yl, lin(xl))
        assert torch.equal(conv(x), y) and torch.equal(lin(xl), yl)  # the next calls: the same bits
        # a NaN input goes to the microkernels (oneDNN cannot carry it): their copy is rebuilt on the spot
        xn = x.clone()
        xn[1, 5, 2, 3] = float("nan")
        yn = conv(xn)
        assert conv._cpu_w_c4 is not None
        assert torch.isnan(yn[1]).any() and not torch.isnan(yn[0]).any()
        with cb.force_kernel("ukernel"):
            torch.testing.assert_close(yn, conv(xn), rtol=0, atol=0, equal_nan=True)


def test_a_layer_the_microkernels_serve_for_some_shape_keeps_its_copy(onednn_wins, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    conv, _ = _layers(gen)
    with torch.no_grad():
        conv(torch.randn(2, 24, 9, 9, generator=gen))  # oneDNN
        assert conv._cpu_w_c4 is None
        monkeypatch.setattr(cpu_dispatch, "_timed", lambda fn: (fn(), 0.0)[1])  # a tie: the microkernels
        conv(torch.randn(1, 24, 5, 7, generator=gen))
    assert conv._cpu_w_c4 is not None and sorted(cb.served_by(conv).values()) == ["onednn", "ukernel"]


def test_a_converted_unet_holds_one_weight_copy_and_compiles_after_the_release(onednn_wins):
    unet = make_small_unet(seed=2)
    q = tgpq.convert(unet, minmax_qstate(unet, tgpq.QuantConfig(weight_bits=8, method="rtn")), backend="cpu")
    qlayers = [m for m in q.modules() if isinstance(m, (QConv2d, QLinear))]
    merged = {id(getattr(a, n)) for a in q.modules() if hasattr(a, "to_q") for n in ("to_q", "to_k", "to_v")}
    # convert prepared every layer the fused model runs (q/k/v run as their attention's merged layer)
    assert all((getattr(m, "_cpu_w_c4", None) is None) == (id(m) in merged) for m in qlayers)
    qlayers = [m for m in qlayers if id(m) not in merged]
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor(500)
    with torch.no_grad():
        y = q(x, t).sample
        held = [m for m in qlayers if m._cpu_w_c4 is not None]
        assert all("ukernel" in cb.served_by(m).values() for m in held), "a layer only oneDNN serves kept its c4 copy"
        assert len(held) < len(qlayers)
        assert torch.equal(q(x, t).sample, y)
        # compiled after the release: the graph runs the microkernels, repacking the released weights itself
        yc = torch.compile(q, fullgraph=True, backend="aot_eager")(x, t).sample
        assert all(getattr(m, "_cpu_keep_c4", False) for m in held)
        with cb.force_kernel("ukernel"):  # eager microkernels rebuild what they need
            yu = q(x, t).sample
        assert torch.equal(yc, yu)
        yf = unet(x, t).sample
    # oneDNN and the microkernels differ in the last bit of a few outputs, which can move a later activation by
    # one quantization step, and in this small random UNet such steps compound (the scalar path differs from the
    # SIMD ones by as much): the two kernel families are no further apart than either is from float
    assert torch.isfinite(y).all() and (y - yu).norm() <= (yu - yf).norm()
