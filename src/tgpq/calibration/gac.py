"""Gradient-aligned sample weights (DESIGN.md section 1.3; the paper's Algorithm 2), with torch.func.

Every training sample ``i`` has a logit ``s_i``; its weight is ``w = softmax(s / tau)`` over the
whole training set (our choice; not over the mini-batch), so ``sum(w) == 1`` and ``w >= 0``. A
mini-batch ``I`` of size ``B`` estimates the weighted loss as ``(N / B) * sum_{i in I} w_i l_i(theta)``,
which is ``mean_{i in I} l_i`` for uniform weights: uniform ``w`` *is* the baseline.

One logit update (``sample_logit_step``), with ``theta`` the block's learnable quantization
parameters (AdaRound ``alpha`` and, when ``learn_act_scale``, the activation step sizes):

1. look-ahead ``theta* = theta - eta * grad_theta [(N/B) sum_{i in I} w_i l_i(theta)]``
   (``torch.func.grad``; ``theta*`` is a differentiable function of ``w``);
2. per timestep group ``t`` with validation samples: ``L_t(theta*)`` (mean validation loss of the
   group) and ``G_t = dL_t(theta*)/dw_I`` = ``vjp`` of the look-ahead with cotangent
   ``grad L_t(theta*)``; by the chain rule ``G_t[i] = -eta (N/B) <grad l_i(theta), grad L_t(theta*)>``;
3. outer loss ``sum_t L_t(theta*) - lambda * mean_{t<k} <G_t, G_k>``, differentiated with respect
   to ``s`` through the softmax and the look-ahead (``torch.func.grad``; Hessian-vector products,
   no third derivatives); one Adam step on ``s``.
"""
from __future__ import annotations

import itertools

import torch
from torch.func import functional_call, grad, grad_and_value, vjp


def weights_from_logits(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(logits / tau)`` over all samples: non-negative, sums to 1."""
    return torch.softmax(logits / tau, dim=0)


def lookahead(loss_fn, theta: dict, w_batch: torch.Tensor, scale: float, eta: float) -> dict:
    """``theta - eta * grad_theta [scale * sum_i w_batch[i] * loss_fn(theta)[i]]`` (differentiable in ``w_batch``).

    ``loss_fn(theta) -> [B]`` per-sample losses of the training mini-batch.
    """
    def inner(th, wb):
        return scale * (wb * loss_fn(th)).sum()
    g = grad(inner)(theta, w_batch)
    return {k: theta[k] - eta * g[k] for k in theta}


def outer_objective(train_loss_fn, val_loss_fns: list, theta: dict, w_batch: torch.Tensor, scale: float,
                    eta: float, gm_lambda: float):
    """``(outer loss, aux)`` of one look-ahead step (see the module docstring).

    * ``train_loss_fn(theta) -> [B]`` per-sample training losses; ``val_loss_fns``: one
      ``fn(theta) -> scalar`` (mean validation loss) per group with validation samples.
    * aux: ``{"val_losses": [T] tensor, "G": [T, B] tensor, "gm": scalar}`` (detached).
    """
    theta_star, vjp_fn = vjp(lambda wb: lookahead(train_loss_fn, theta, wb, scale, eta), w_batch)
    losses, grads_w = [], []
    for fn in val_loss_fns:
        g_theta, L_t = grad_and_value(fn)(theta_star)
        losses.append(L_t)
        grads_w.append(vjp_fn(g_theta)[0])
    total = torch.stack(losses).sum()
    pairs = list(itertools.combinations(range(len(grads_w)), 2))
    if pairs and gm_lambda != 0:
        gm = torch.stack([(grads_w[a] * grads_w[b]).sum() for a, b in pairs]).mean()
    else:
        gm = total.new_zeros(())
    out = total - gm_lambda * gm
    aux = {"val_losses": torch.stack(losses).detach(), "G": torch.stack(grads_w).detach(), "gm": gm.detach()}
    return out, aux


def sample_logit_step(logits: torch.Tensor, batch_idx: torch.Tensor, train_loss_fn, val_loss_fns: list,
                      theta: dict, tau: float, eta: float, gm_lambda: float) -> tuple[torch.Tensor, dict]:
    """Gradient of the outer loss with respect to all ``logits`` ``[N]`` (and the aux record).

    ``batch_idx`` int64 ``[B]``: the training mini-batch, in the order ``train_loss_fn`` returns it.
    """
    n, b = logits.shape[0], batch_idx.shape[0]
    theta = {k: v.detach() for k, v in theta.items()}

    def objective(s):
        w = weights_from_logits(s, tau)
        return outer_objective(train_loss_fn, val_loss_fns, theta, w[batch_idx], n / b, eta, gm_lambda)

    g, aux = grad(objective, has_aux=True)(logits.detach())
    return g, aux


def per_sample_sq_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss per sample: sum of squared errors over all but dim 0. ``[B]``."""
    return (out - target).pow(2).flatten(1).sum(1)


def make_block_loss(block, ctx, inputs_fn, target, group, main_output):
    """``theta -> [B]`` per-sample losses of ``block`` on fixed inputs (via ``functional_call``)."""
    args, kwargs = inputs_fn

    def fn(theta):
        ctx.group = group
        out = main_output(functional_call(block, theta, args, kwargs))
        return per_sample_sq_error(out, target)
    return fn


def learn_sample_logits(block, ctx, train_data, groups: torch.Tensor, val_data, val_groups: torch.Tensor,
                        logits: torch.Tensor, config, generator: torch.Generator, main_output,
                        device=None) -> tuple[torch.Tensor, list]:
    """``config.weight_steps`` Adam steps (lr ``config.lr_sample_logits``) on the logits ``[N]``.

    ``block`` holds QuantLayers in soft mode; its ``alpha`` (and ``act_scale`` when
    ``config.learn_act_scale``) form ``theta``. Each step draws a training mini-batch of
    ``config.batch_size`` and, per group with validation samples, up to ``config.batch_size`` of
    them. Returns the new logits and a per-step record (outer loss terms).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    theta = {n: p for n, p in block.named_parameters() if n.endswith(".alpha") or n == "alpha"}
    if config.learn_act_scale:
        theta.update({n: p for n, p in block.named_parameters() if n.endswith("act_scale")})
    s = logits.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([s], lr=config.lr_sample_logits)
    n = len(train_data)
    b = min(config.batch_size, n)
    present = [int(g) for g in torch.unique(val_groups).tolist()]
    history = []
    for _ in range(config.weight_steps):
        idx = torch.randperm(n, generator=generator)[:b]
        args, kwargs = train_data.inputs(idx, device=device)
        train_fn = make_block_loss(block, ctx, (args, kwargs), train_data.target(idx, device),
                                   groups[idx].to(device) if device is not None else groups[idx], main_output)
        val_fns = []
        for g in present:
            members = torch.nonzero(val_groups == g).flatten()
            members = members[torch.randperm(members.numel(), generator=generator)[:b]]
            vargs, vkwargs = val_data.inputs(members, device=device)
            fn = make_block_loss(block, ctx, (vargs, vkwargs), val_data.target(members, device),
                                 val_groups[members].to(device) if device is not None else val_groups[members],
                                 main_output)
            val_fns.append(lambda th, _f=fn: _f(th).mean())
        # The math SDPA backend is composite, so it has the double backward the look-ahead needs.
        with sdpa_kernel(SDPBackend.MATH):
            g_s, aux = sample_logit_step(s, idx, train_fn, val_fns, theta, config.tau,
                                         config.lookahead_eta, config.gm_lambda)
        if not bool(torch.isfinite(g_s).all()):
            raise FloatingPointError("non-finite gradient for the sample logits: lower lookahead_eta")
        opt.zero_grad(set_to_none=True)
        s.grad = g_s
        opt.step()
        history.append({"val_loss": float(aux["val_losses"].sum()), "gm": float(aux["gm"])})
    return s.detach(), history
