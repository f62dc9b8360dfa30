"""Gradient-aligned sample weights: the look-ahead identity and the torch.func outer gradient.

Everything runs in float64 on one small diffusers ResnetBlock2D whose convolutions are QuantLayers
(AdaRound soft weights, per-group LSQ activation step sizes), on fresh random inputs.
"""
import pytest
import torch

from tgpq import numerics
from tgpq.calibration.fake_quant import GroupContext, QuantLayer
from tgpq.calibration.gac import (make_block_loss, outer_objective, per_sample_sq_error, sample_logit_step,
                                  weights_from_logits)

G = 3


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quant_resnet(seed=0, act_quant=True):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(seed)
    blk = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4).eval()
    ctx = GroupContext()
    for name in ("conv1", "conv2"):
        layer = getattr(blk, name)
        w_scale = numerics.mse_weight_scale(layer.weight, 4)
        a_scale = torch.rand(G) * 0.02 + 0.02
        q = QuantLayer(layer, w_scale, a_scale, 4, ctx)
        # move alpha off its initial point so that the soft weights are not the float weights
        with torch.no_grad():
            q.alpha.add_(torch.randn_like(q.alpha) * 0.5)
        q.weight_mode = "soft"
        q.act_quant = act_quant
        setattr(blk, name, q)
    blk = blk.double()
    for p in blk.parameters():
        p.requires_grad_(False)
    names = ("alpha", "act_scale") if act_quant else ("alpha",)
    theta = {n: p.detach().clone() for n, p in blk.named_parameters() if n.endswith(names)}
    return blk, ctx, theta


def _data(b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 8, 6, 6, generator=g, dtype=torch.float64)
    temb = torch.randn(b, 16, generator=g, dtype=torch.float64)
    target = torch.randn(b, 8, 6, 6, generator=g, dtype=torch.float64) * 0.1 + x
    groups = torch.randint(0, G, (b,), generator=g)
    return ((x, temb), {}), target, groups


def _loss_fns(blk, ctx):
    tr_in, tr_tgt, tr_g = _data(6, 1)
    va_in, va_tgt, va_g = _data(5, 2)
    train_fn = make_block_loss(blk, ctx, tr_in, tr_tgt, tr_g, lambda o: o)
    val_fn = make_block_loss(blk, ctx, va_in, va_tgt, va_g, lambda o: o)
    return train_fn, val_fn


def _autograd_dLdw(train_fn, val_fn, theta, w, eta):
    """dL_V(theta')/dw by plain autograd, theta' = theta - eta * grad sum_i w_i l_i(theta)."""
    w = w.clone().requires_grad_(True)
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    inner = (w * train_fn(th)).sum()
    grads = torch.autograd.grad(inner, list(th.values()), create_graph=True)
    th_star = {k: th[k] - eta * g for k, g in zip(th, grads)}
    lv = val_fn(th_star).mean()
    return torch.autograd.grad(lv, w)[0], th_star


def _flat_grad(fn, theta):
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    out = fn(th)
    return torch.cat([g.flatten() for g in torch.autograd.grad(out, list(th.values()))])


def _per_sample_grads(train_fn, theta, n):
    return torch.stack([_flat_grad(lambda th, i=i: train_fn(th)[i], theta) for i in range(n)])


def test_lookahead_weight_gradient_identity():
    """dL_V(theta')/dw_i = -eta <grad l_i(theta), grad L_V(theta')> against autograd.

    theta' is linear in w, so the identity is the chain rule itself: exact up to float64 round-off
    (relative error ~1e-12 here; we allow 1e-8). It holds for the STE gradients too, since both
    sides use the same first derivatives of l.
    """
    blk, ctx, theta = _quant_resnet()
    train_fn, val_fn = _loss_fns(blk, ctx)
    eta = 1e-3
    w = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    dLdw, th_star = _autograd_dLdw(train_fn, val_fn, theta, w, eta)
    gl = _per_sample_grads(train_fn, theta, 6)
    gv_star = _flat_grad(lambda th: val_fn(th).mean(), {k: v.detach() for k, v in th_star.items()})
    formula = -eta * gl @ gv_star
    assert dLdw.abs().max() > 0
    torch.testing.assert_close(dLdw, formula, rtol=1e-8, atol=1e-14)


def test_lookahead_identity_first_order_in_eta():
    """With grad L_V taken at theta instead of theta', the error is O(eta^2) in absolute terms:
    shrinking eta by 10 shrinks the relative error by ~10 (we require > 5). Activation rounding is
    off here: its straight-through gradient jumps when a step size change flips a rounding, which
    would hide the smooth O(eta) behaviour (the exact identity above holds with it on)."""
    blk, ctx, theta = _quant_resnet(seed=3, act_quant=False)
    train_fn, val_fn = _loss_fns(blk, ctx)
    w = torch.full((6,), 1 / 6, dtype=torch.float64)
    gl = _per_sample_grads(train_fn, theta, 6)
    gv0 = _flat_grad(lambda th: val_fn(th).mean(), theta)
    rel = []
    for eta in (1e-4, 1e-5):
        dLdw, _ = _autograd_dLdw(train_fn, val_fn, theta, w, eta)
        approx = -eta * gl @ gv0
        rel.append(float((dLdw - approx).norm() / dLdw.norm()))
    assert rel[0] < 1e-1
    assert rel[1] < rel[0] / 5


def test_torch_func_G_matches_chain_rule():
    """outer_objective's G_t (torch.func vjp) equals -eta * scale * <grad l_i(theta), grad L_t(theta*)>."""
    blk, ctx, theta = _quant_resnet(seed=5)
    train_fn, val_fn = _loss_fns(blk, ctx)
    eta, scale = 1e-3, 2.0
    w = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    val_fns = [lambda th: val_fn(th)[:3].mean(), lambda th: val_fn(th)[3:].mean()]
    _, aux = outer_objective(train_fn, val_fns, theta, w, scale, eta, gm_lambda=1.0)
    for t, fn in enumerate(val_fns):
        dLdw, _ = _autograd_dLdw(lambda th: scale * train_fn(th), fn, theta, w, eta)
        torch.testing.assert_close(aux["G"][t], dLdw, rtol=1e-8, atol=1e-14)


def test_outer_gradient_matches_autograd():
    """The torch.func gradient of the outer loss w.r.t. the logits equals a plain-autograd
    double-backward computation of the same objective (float64; rtol 1e-6 allows for the
    different summation order of the two Hessian-vector paths)."""
    blk, ctx, theta = _quant_resnet(seed=7)
    train_fn, val_fn = _loss_fns(blk, ctx)
    n_all, idx = 10, torch.tensor([1, 3, 4, 6, 8, 9])
    eta, lam, tau = 1e-2, 1.0, 1.0
    s = torch.randn(n_all, dtype=torch.float64) * 0.3
    val_fns = [lambda th: val_fn(th)[:2].mean(), lambda th: val_fn(th)[2:4].mean(), lambda th: val_fn(th)[4:].mean()]
    g_func, _ = sample_logit_step(s, idx, train_fn, val_fns, theta, tau, eta, lam)

    s_leaf = s.clone().requires_grad_(True)
    w = torch.softmax(s_leaf / tau, 0)[idx]
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    inner = (n_all / len(idx)) * (w * train_fn(th)).sum()
    grads = torch.autograd.grad(inner, list(th.values()), create_graph=True)
    th_star = {k: th[k] - eta * g for k, g in zip(th, grads)}
    losses, Gs = [], []
    for fn in val_fns:
        L = fn(th_star)
        gth = torch.autograd.grad(L, list(th_star.values()), create_graph=True)
        Gs.append(torch.autograd.grad(list(th_star.values()), w, grad_outputs=list(gth), create_graph=True)[0])
        losses.append(L)
    gm = torch.stack([(Gs[a] * Gs[b]).sum() for a, b in [(0, 1), (0, 2), (1, 2)]]).mean()
    outer = torch.stack(losses).sum() - lam * gm
    g_ref = torch.autograd.grad(outer, s_leaf)[0]
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(g_func, g_ref, rtol=1e-6, atol=1e-12)


def test_weights_from_logits_normalised():
    s = torch.randn(50) * 3
    for tau in (0.2, 1.0):
        w = weights_from_logits(s, tau)
        assert bool((w >= 0).all())
        assert abs(float(w.sum()) - 1) < 1e-6
    assert torch.allclose(weights_from_logits(torch.zeros(7), 1.0), torch.full((7,), 1 / 7))


def test_per_sample_sq_error():
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(per_sample_sq_error(a, b), ((a - b) ** 2).sum(dim=(1, 2, 3)))
