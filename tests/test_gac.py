"""Gradient-aligned sample weights: the math of gac.py against plain autograd, and its behaviour.

The math tests run in float64 on one small diffusers ResnetBlock2D whose convolutions are
QuantLayers (AdaRound soft weights, per-group LSQ activation step sizes), on fresh random inputs.
"""
import itertools

import pytest
import torch

from tgpq import QuantConfig, numerics
from tgpq.calibration.capture import UnitData
from tgpq.calibration.fake_quant import GroupContext, QuantLayer
from tgpq.calibration.gac import (gradient_matching, group_grads, influence, logit_space_grads, lookahead,
                                  mirror_step, outer_terms, per_sample_grads, per_sample_losses, per_sample_sq_error,
                                  theta_of, weights_from_logits)

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
    return blk, ctx


def _unit_data(b, seed):
    """A ``UnitData`` of ``b`` random (x, temb) inputs with targets near x, and a group per sample."""
    from torch.utils import _pytree as pytree

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 8, 6, 6, generator=g, dtype=torch.float64)
    temb = torch.randn(b, 16, generator=g, dtype=torch.float64)
    target = torch.randn(b, 8, 6, 6, generator=g, dtype=torch.float64) * 0.1 + x
    groups = torch.arange(b) % G
    leaves, treedef = pytree.tree_flatten(((x, temb), {}))
    return UnitData(treedef, leaves, [True, True], target), groups


def _loss_fn(blk, ctx, data, groups):
    """``theta -> [n]`` per-sample losses by plain autograd (the oracle)."""
    from torch.func import functional_call

    idx = torch.arange(len(data))
    args, kwargs = data.inputs(idx)

    def fn(theta):
        ctx.group = groups
        return per_sample_sq_error(functional_call(blk, theta, args, kwargs), data.target(idx))
    return fn


def _flat_grad(fn, theta):
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    return torch.autograd.grad(fn(th), list(th.values()))


def test_per_sample_grads_match_autograd():
    """vmap(grad) per-sample gradients (alpha and step sizes) equal one backward per sample."""
    blk, ctx = _quant_resnet()
    data, groups = _unit_data(6, 1)
    theta = {k: v.detach() for k, v in theta_of(blk, True).items()}
    losses, J = per_sample_grads(blk, ctx, data, torch.arange(6), groups, theta, lambda o: o, chunk=4)
    fn = _loss_fn(blk, ctx, data, groups)
    torch.testing.assert_close(losses, fn(theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_sample_losses(blk, ctx, data, torch.arange(6), groups, theta, lambda o: o), losses)
    for i in range(6):
        ref = _flat_grad(lambda th, i=i: fn(th)[i], theta)
        for k, r in zip(theta, ref):
            torch.testing.assert_close(J[k][i], r, rtol=1e-10, atol=1e-12)
    assert any(float(J[k].abs().max()) > 0 for k in J if k.endswith("act_scale"))


def test_group_grads_match_autograd():
    blk, ctx = _quant_resnet(seed=2)
    data, groups = _unit_data(7, 3)
    theta = {k: v.detach() for k, v in theta_of(blk, True).items()}
    L, V = group_grads(blk, ctx, data, groups, [0, 2], theta, lambda o: o, chunk=2)
    fn = _loss_fn(blk, ctx, data, groups)
    for j, t in enumerate((0, 2)):
        m = groups == t
        torch.testing.assert_close(L[j], fn(theta)[m].mean(), rtol=1e-12, atol=0)
        ref = _flat_grad(lambda th: fn(th)[m].mean(), theta)
        for k, r in zip(theta, ref):
            torch.testing.assert_close(V[k][j], r, rtol=1e-10, atol=1e-12)


def test_lookahead_is_the_gradient_part_of_adams_next_step():
    """theta* - theta is the w-dependent part of torch.optim.Adam's next step, with Adam's second moment
    replaced by E[gB^2] (here batch_size >= n, so E[gB^2] = g^2, and v set to g^2 to compare), and
    theta - theta* = P * g; no element moves further than lr (1 - beta1) / (1 - beta1^(t+1))."""
    torch.manual_seed(0)
    n, theta = 5, {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(6, dtype=torch.float64)}
    J = {"a": torch.randn(n, 3, 4, dtype=torch.float64), "b": torch.randn(n, 6, dtype=torch.float64)}
    w = torch.softmax(torch.randn(n, dtype=torch.float64), 0)
    g = {k: torch.tensordot(w, J[k], dims=1) for k in J}
    p = torch.nn.Parameter(theta["a"].clone())
    opt = torch.optim.Adam([p], lr=0.03, eps=0.0)
    for _ in range(4):  # some history
        p.grad = torch.randn_like(p)
        opt.step()
    st = opt.state[p]
    t = int(st["step"])
    # Adam's next step with gradient g, split into its momentum part and its gradient part
    st["exp_avg_sq"].copy_(g["a"] ** 2 * (1 - 0.999 ** (t + 1)) / 1.0)  # so that v_hat after the step = g^2 ...
    st["exp_avg_sq"].sub_(g["a"] ** 2 * (1 - 0.999)).div_(0.999)          # ... exactly
    before = p.detach().clone()
    m_part = 0.03 * (0.9 * st["exp_avg"] / (1 - 0.9 ** (t + 1))) / g["a"].abs()
    p.grad = g["a"].clone()
    opt.step()
    star, P = lookahead(theta | {"a": before}, J, w, {"a": 0.03, "b": 1e-3}, batch_size=n,
                        adam_steps={"a": (t, 0.9)})
    torch.testing.assert_close(before - star["a"], (before - p.detach()) - m_part, rtol=1e-9, atol=1e-12)
    bound = 0.03 * 0.1 / (1 - 0.9 ** (t + 1))
    assert float((before - star["a"]).abs().max()) <= bound + 1e-12
    assert float((theta["b"] - star["b"]).abs().max()) <= 1e-3 + 1e-12  # no history: a first step
    for k in theta:
        torch.testing.assert_close((before if k == "a" else theta[k]) - star[k], P[k] * g[k])
    # with a mini-batch of 2 of 5 the normaliser is larger where the samples disagree: smaller steps
    star2, _ = lookahead(theta, J, w, {"a": 0.03, "b": 1e-3}, batch_size=2)
    assert bool(((theta["b"] - star2["b"]).abs() <= (theta["b"] - star["b"]).abs() + 1e-15).all())
    assert torch.equal(lookahead(theta, J, w, {"a": 0.0, "b": 0.0}, 2)[0]["a"], theta["a"])


def test_influence_is_the_weight_gradient_of_the_lookahead():
    """G[t, i] = -<P J_i, V_t> is exactly dL_t(theta - P g(w))/dw_i when V_t is taken at theta*
    (chain rule through a look-ahead linear in w; float64, step sizes included)."""
    blk, ctx = _quant_resnet(seed=5)
    data, groups = _unit_data(6, 1)
    vdata, vgroups = _unit_data(6, 2)
    theta = {k: v.detach() for k, v in theta_of(blk, True).items()}
    w = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    _, J = per_sample_grads(blk, ctx, data, torch.arange(6), groups, theta, lambda o: o)
    lr = {k: (0.03 if k.endswith("alpha") else 1e-4) for k in theta}
    star, P = lookahead(theta, J, w, lr, batch_size=2)
    _, Vstar = group_grads(blk, ctx, vdata, vgroups, [0, 1, 2], star, lambda o: o)
    Gx = influence(J, Vstar, P)
    fn_t, fn_v = _loss_fn(blk, ctx, data, groups), _loss_fn(blk, ctx, vdata, vgroups)
    for t in range(G):
        wl = w.clone().requires_grad_(True)
        th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        grads = torch.autograd.grad((wl * fn_t(th)).sum(), list(th.values()), create_graph=True)
        th_star = {k: theta[k] - P[k] * g for k, g in zip(th, grads)}
        ref = torch.autograd.grad(fn_v(th_star)[vgroups == t].mean(), wl)[0]
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(Gx[t], ref, rtol=1e-8, atol=1e-14)


def test_first_order_influence_error_shrinks_with_the_step():
    """gac uses V_t at theta (first order): the error against the exact weight gradient is O(step):
    10x smaller look-ahead, >5x smaller relative error. Activation rounding is off here: its
    straight-through gradient jumps when a step flips a rounding, which would hide the smooth O(step)
    behaviour (the exact identity above holds with it on)."""
    blk, ctx = _quant_resnet(seed=3, act_quant=False)
    data, groups = _unit_data(6, 1)
    vdata, vgroups = _unit_data(6, 2)
    theta = {k: v.detach() for k, v in theta_of(blk, False).items()}
    w = torch.full((6,), 1 / 6, dtype=torch.float64)
    _, J = per_sample_grads(blk, ctx, data, torch.arange(6), groups, theta, lambda o: o)
    _, V0 = group_grads(blk, ctx, vdata, vgroups, [0, 1, 2], theta, lambda o: o)
    rel = []
    for lr in (1e-2, 1e-3):
        star, P = lookahead(theta, J, w, {k: lr for k in theta}, batch_size=6)
        _, Vs = group_grads(blk, ctx, vdata, vgroups, [0, 1, 2], star, lambda o: o)
        exact, approx = influence(J, Vs, P), influence(J, V0, P)
        rel.append(float((exact - approx).norm() / exact.norm()))
    assert rel[0] < 0.3
    assert rel[1] < rel[0] / 5


def test_matching_term_is_scale_free_and_does_not_vanish():
    """Both terms of the logit update are unchanged when G is scaled (a smaller look-ahead scales G):
    the matching term's share does not vanish with the step, unlike <G_t, G_k> on w (eta^2)."""
    torch.manual_seed(1)
    Gm = torch.randn(4, 30, dtype=torch.float64) + torch.randn(1, 30, dtype=torch.float64)
    w = torch.softmax(torch.randn(30, dtype=torch.float64) * 0.3, 0)
    a = outer_terms(Gm, w, tau=1.0, gm_lambda=1.0)
    b = outer_terms(Gm * 1e-6, w, tau=1.0, gm_lambda=1.0)
    torch.testing.assert_close(a.delta_val, b.delta_val)
    torch.testing.assert_close(a.delta_gm, b.delta_gm)
    assert float(a.delta_gm.norm()) > 0.05 * float(a.delta_val.norm())
    assert float(outer_terms(Gm, w, 1.0, gm_lambda=0.0).delta_gm.abs().max()) == 0  # the ablation switch


def test_gradient_matching_definition():
    """GM = mean pairwise cosine of the logit-space gradients w * (G_t - <w, G_t>) / tau; at uniform
    weights that is the mean Pearson correlation of the rows of G; its w-gradient is autograd's."""
    torch.manual_seed(2)
    Gm = torch.randn(3, 20, dtype=torch.float64)
    u = torch.full((20,), 1 / 20, dtype=torch.float64)
    corr = torch.corrcoef(Gm)
    expect = torch.stack([corr[a, b] for a, b in itertools.combinations(range(3), 2)]).mean()
    torch.testing.assert_close(gradient_matching(Gm, u, 1.0), expect)
    w = torch.softmax(torch.randn(20, dtype=torch.float64), 0)
    gam = logit_space_grads(Gm, w, 0.5)
    s = torch.log(w).requires_grad_(True)
    for t in range(3):  # Gamma_t is d(<softmax(s / tau), G_t>)/ds at s = tau * log w
        ref = torch.autograd.grad((torch.softmax(s, 0) * Gm[t]).sum(), s)[0] / 0.5
        torch.testing.assert_close(gam[t], ref)
    terms = outer_terms(Gm, w, tau=0.5, gm_lambda=2.0)
    wl = w.clone().requires_grad_(True)
    d = -2.0 * torch.autograd.grad(gradient_matching(Gm, wl, 0.5), wl)[0]
    torch.testing.assert_close(terms.delta_gm, d - (w * d).sum())


def test_logit_update_direction():
    """Samples whose influence lowers every group's validation loss gain weight, others lose it."""
    n = 12
    helps = torch.arange(n) < 4
    Gm = torch.where(helps, -1.0, 0.5).double().expand(3, n).clone() + 0.01 * torch.randn(3, n, dtype=torch.float64)
    w = torch.full((n,), 1 / n, dtype=torch.float64)
    terms = outer_terms(Gm, w, tau=1.0, gm_lambda=0.0)
    s = mirror_step(torch.zeros(n), terms.delta_val, 0.5, clip=3.0)
    assert bool((s[helps] > 0).all()) and bool((s[~helps] < 0).all())
    assert abs(float(s.mean())) < 1e-6
    assert abs(float(s.pow(2).mean().sqrt()) - 0.5) < 1e-6  # one step of RMS lr


def test_mirror_step_clips_outliers():
    d = torch.zeros(100, dtype=torch.float64)
    d[0] = 1.0  # one outlier: delta / rms = 10
    s = mirror_step(torch.zeros(100), d, 0.5, clip=3.0)
    assert abs(float(s[0] - s[1]) + 1.5) < 1e-6
    assert torch.equal(mirror_step(torch.ones(4), torch.zeros(4, dtype=torch.float64), 0.5, 3.0), torch.ones(4))


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


@pytest.mark.parametrize("field,value,match", [
    ("lookahead_lr_alpha", 0.0, "lookahead_lr_alpha"), ("lookahead_lr_act", -1e-5, "lookahead_lr_act"),
    ("lr_sample_logits", -0.1, "lr_sample_logits"), ("weight_steps", 0, "weight_steps"),
    ("weight_update_every", 0, "weight_update_every"), ("gm_lambda", -1.0, "gm_lambda"),
    ("val_fraction", 1.0, "val_fraction"), ("tau", 0.0, "tau")])
def test_config_rejects_bad_gac_fields(field, value, match):
    with pytest.raises(ValueError, match=match) as e:
        QuantConfig(**{field: value})
    assert "\n" not in str(e.value)
