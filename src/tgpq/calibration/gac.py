"""Gradient-aligned sample weights (DESIGN.md section 1.3; the paper's Algorithm 2), with torch.func.

Notation. ``N`` training samples with per-sample block losses ``l_i(theta)`` (sum of squared errors
of the block output, BRECQ's convention), weights ``w = softmax(s / tau)`` over the whole training
set (our choice), ``theta`` the block's learnable quantization parameters, split into tensors ``p``
of two kinds: AdaRound ``alpha`` and the activation step sizes (in ``theta`` only when
``config.lookahead_lr_act > 0``). ``g(w) = sum_i w_i grad l_i(theta)``. Per timestep group ``t``
with validation samples, ``L_t(theta)`` is the group's mean validation loss.

**Look-ahead: a step the reconstruction itself takes.** The reconstruction steps ``alpha`` with Adam
(``lr_adaround``): ``theta <- theta - lr m_hat / sqrt(v_hat)``, ``m = beta1 m + (1 - beta1) g_B``.
Of that step only the new mini-batch gradient depends on the weights; the momentum does not. So

    theta*_p = theta_p - P_p * g_p(w),     P_p = lr_p (1 - beta1) / (1 - beta1^(t+1)) / sqrt(E[g_B,p^2]),

the weight-dependent part of the next Adam step with its normaliser ``v_hat`` replaced by what it
estimates, ``E[g_B^2] = g^2 + Var(g_B)`` for mini-batches of ``batch_size`` (computed exactly at
``theta`` from the per-sample gradients: less noisy than Adam's path-dependent history, which
made the weights of two seeds agree less). ``lr_p``: ``config.lookahead_lr_alpha`` (None =
``lr_adaround``) for ``alpha``, ``config.lookahead_lr_act`` (default 0: left out, since the
refreshes happen in the AdaRound phase, where reconstruction holds the step sizes fixed) for step
sizes: one step size per kind. No element moves further than ``lr_p (1 - beta1) / (1 - beta1^(t+1))``.
Our first implementation took one plain SGD step ``-1e-2 * g`` on both kinds and raised the
validation loss 100-3,600x; this one keeps ``L_t(theta*) / L_t(theta)`` within [0.9, 1.1] on the
reference model (``val_loss_ratio`` in every refresh record; tests/test_gac_reference.py asserts
<= 1.5). The rounding regulariser does not depend on ``w`` and is left out of ``g``.

**Validation-loss gradient (the paper's G_t), first order.** ``theta*`` is linear in ``w`` for a
fixed ``P``, so by the chain rule ``dL_t(theta*)/dw_i = -<P grad l_i(theta), grad L_t(theta*)>``
exactly (tests/test_gac.py checks it against autograd). We take the validation gradient at
``theta`` instead of ``theta*`` (error O(step), also tested):

    G_t[i] = -<P grad l_i(theta), grad L_t(theta)>          ("sample i's gradient aligned with group t's")

from the per-sample training gradients (``torch.func.vmap(grad)``, one pass over the training set)
and one backward per validation group: no double backward, no Hessian. ``theta*`` itself is still
evaluated, for the look-ahead check ``L_t(theta*) / L_t(theta)``.

**Outer objective**, minimised over the logits ``s`` (``sigma``: a constant, below):

    F(s) = sum_t L_t(theta*(w)) / sigma  -  lambda * GM(s),
    GM(s) = mean_{t<k} cos(Gamma_t, Gamma_k),   Gamma_t = dL_t(theta*)/ds = w * (G_t - <w, G_t>) / tau.

* The first term is the paper's ``sum_t L_t(theta*)`` divided by a positive constant, which leaves
  its minimiser alone: ``sigma`` = RMS over the samples of its centred weight gradient
  ``sum_t G_t - <w, sum_t G_t>``. So the term's ``w``-gradient has unit RMS whatever the loss scale
  and the look-ahead's size (``G`` is proportional to ``lr``), and ``lambda`` compares it with a cosine.
* The paper's matching term is ``<G_t, G_k>``, gradients with respect to ``w``. To first order
  ``G_t`` does not depend on ``w`` (only through the Hessian), so that term's gradient on ``s``
  shrinks like ``eta^2`` next to the validation term's ``eta``: 2e-8 of it in our first
  implementation, inert. We take the same matching for the variables that are learned, the logits:
  ``Gamma_t`` depends on ``w`` at O(1) through the softmax Jacobian, and the cosine makes the term
  free of the look-ahead's size and the loss scale. At uniform ``w``, ``cos(Gamma_t, Gamma_k)`` is
  the Pearson correlation of ``G_t`` and ``G_k`` over the samples; raising it moves weight to samples
  whose influences on groups ``t`` and ``k`` agree ("samples that help every group at once"), while
  the first term decides which of them help (alone, the matching term also rewards samples that
  hurt every group: tests/test_gac_recovery.py). ``G_t`` is held fixed when ``GM`` is differentiated.
  ``gm_lambda = 0`` is the ablation without matching. How this relates to Algorithm 2: same
  look-ahead-then-validate structure and the same ``G_t`` (for our look-ahead, to first order), but
  the matching is on ``ds`` gradients with a cosine, the validation term is rescaled by ``sigma``,
  and the update is the normalised mirror step below instead of a gradient step on ``s``.

**Logit update** (our choice; the paper gives no optimiser): an exponentiated-gradient (mirror
descent) step on the simplex, normalised and clipped,

    Delta = dF/dw - <w, dF/dw>,        s <- s - lr_s * clip(Delta / rms(Delta), -3, 3),

so a refresh moves the log-weights by ``lr_s`` (``config.lr_sample_logits``) in RMS whatever the
gradient's scale (Adam on gradients of ~1e-7 with eps 1e-8 took sign-noise steps before), in
``config.weight_steps`` sub-steps of ``lr_s / weight_steps`` (``G`` fixed, the ``w``-dependent
parts recomputed), and no log-weight by more than ``3 lr_s``. ``dF/ds = (w / tau) * Delta``: the
natural-gradient direction.

**Refreshes** (``SampleWeighter``, called by ``reconstruct.reconstruct_block``): every
``weight_update_every`` AdaRound iterations (default ``iters // 4``: at 25, 50 and 75 % of the
phase; none at iteration 0, where the soft weights still equal the float weights), ``G`` is
measured at the current ``theta`` on the whole training and validation sets and the logits take
one (normalised) step; the weights are held fixed in between and during the step-size phase.
Cost per refresh: per-sample gradients of the ``N`` training samples (about 1.5-2.5 reconstruction
passes over them) plus one pass over the validation set; memory ``N x (alpha count) x 4`` bytes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.utils import _pytree as pytree

ALPHA, ACT = "alpha", "act_scale"
LOGIT_CLIP = 3.0  # our choice: one logit step moves a log-weight by at most 3 lr_sample_logits


def weights_from_logits(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``softmax(logits / tau)`` over all samples: non-negative, sums to 1."""
    return torch.softmax(logits / tau, dim=0)


def per_sample_sq_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BRECQ's reconstruction loss per sample: sum of squared errors over all but dim 0. ``[B]``."""
    return (out - target).pow(2).flatten(1).sum(1)


def param_kind(name: str) -> str:
    """``"alpha"`` or ``"act_scale"`` for a QuantLayer parameter name (dotted), else ValueError."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in (ALPHA, ACT):
        return leaf
    raise ValueError(f"{name!r} is not a QuantLayer alpha or act_scale")


def theta_of(block: torch.nn.Module, with_act_scale: bool) -> dict:
    """``{name: parameter}``: every ``alpha`` (and every ``act_scale`` when ``with_act_scale``)."""
    kinds = (ALPHA, ACT) if with_act_scale else (ALPHA,)
    return {n: p for n, p in block.named_parameters() if n.rsplit(".", 1)[-1] in kinds}


# -------------------------------------------------------------------------------- per-sample pieces
def per_sample_grads(block, ctx, data, idx: torch.Tensor, groups: torch.Tensor, theta: dict, main_output,
                     chunk: int = 64, device=None) -> tuple[torch.Tensor, dict]:
    """Per-sample losses ``[n]`` and gradients ``{name: [n, *shape]}`` of ``l_i`` at ``theta``.

    ``torch.func.vmap(grad_and_value)`` over the samples ``idx`` of ``data`` (a ``UnitData``), in
    chunks of ``chunk``; ``groups[idx]`` sets every sample's activation step size. Exact (the same
    first derivatives as a one-sample ``backward``): no sample interacts with another in a block.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    theta = {k: v.detach() for k, v in theta.items()}
    losses, grads = [], {k: [] for k in theta}
    for sub in idx.split(chunk):
        args, kwargs = data.inputs(sub, device=device)
        target = data.target(sub, device)
        g = groups[sub].to(target.device)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        batched = [isinstance(l, torch.Tensor) and l.dim() > 0 and l.shape[0] == sub.numel() for l in leaves]
        per = [l for l, b in zip(leaves, batched) if b]

        def loss_one(th, per_one, tgt, grp):
            it = iter(per_one)
            a, k = pytree.tree_unflatten([next(it).unsqueeze(0) if b else l for l, b in zip(leaves, batched)], spec)
            ctx.group = grp.unsqueeze(0)
            out = main_output(functional_call(block, th, a, k))
            return (out - tgt.unsqueeze(0)).pow(2).sum()

        # the math SDPA backend is composite, so vmap batches it (the fused CPU kernel has no batching rule)
        with sdpa_kernel(SDPBackend.MATH):
            gr, lv = vmap(grad_and_value(loss_one), in_dims=(None, 0, 0, 0))(theta, per, target, g)
        losses.append(lv.detach())
        for k in theta:
            grads[k].append(gr[k].detach())
    return torch.cat(losses), {k: torch.cat(v) for k, v in grads.items()}


@torch.no_grad()
def per_sample_losses(block, ctx, data, idx: torch.Tensor, groups: torch.Tensor, theta: dict, main_output,
                      chunk: int = 64, device=None) -> torch.Tensor:
    """``l_i(theta)`` for the samples ``idx`` ``[n]`` (no gradient)."""
    out = []
    for sub in idx.split(chunk):
        args, kwargs = data.inputs(sub, device=device)
        ctx.group = groups[sub].to(device) if device is not None else groups[sub]
        o = main_output(functional_call(block, {k: v.detach() for k, v in theta.items()}, args, kwargs))
        out.append(per_sample_sq_error(o, data.target(sub, device, o.dtype)))
    return torch.cat(out)


def group_grads(block, ctx, data, groups: torch.Tensor, present: list, theta: dict, main_output,
                chunk: int = 64, device=None) -> tuple[torch.Tensor, dict]:
    """Per group ``t`` in ``present``: the mean loss ``L_t(theta)`` ``[T]`` and its gradient ``{name: [T, *shape]}``.

    Plain autograd, one backward per chunk of each group's samples (no per-sample gradients needed).
    """
    losses, grads = [], {k: [] for k in theta}
    for t in present:
        members = torch.nonzero(groups == t).flatten()
        th = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        total = 0.0
        acc = {k: torch.zeros_like(v) for k, v in th.items()}
        for sub in members.split(chunk):
            args, kwargs = data.inputs(sub, device=device)
            ctx.group = groups[sub].to(device) if device is not None else groups[sub]
            out = main_output(functional_call(block, th, args, kwargs))
            loss = per_sample_sq_error(out, data.target(sub, device, out.dtype)).sum() / members.numel()
            gr = torch.autograd.grad(loss, list(th.values()), allow_unused=True)
            for k, gk in zip(th, gr):
                if gk is not None:
                    acc[k] += gk
            total += float(loss.detach())
        losses.append(total)
        for k in theta:
            grads[k].append(acc[k])
    return torch.tensor(losses, dtype=torch.float64), {k: torch.stack(v) for k, v in grads.items()}


def lookahead(theta: dict, J: dict, w: torch.Tensor, lr: dict, batch_size: int,
              adam_steps: dict | None = None) -> tuple[dict, dict]:
    """``(theta*, P)``: the look-ahead step of the module docstring and its preconditioner.

    * ``J``: per-sample gradients ``{name: [n, *shape]}`` at ``theta``; ``w``: their weights ``[n]``;
      ``g_p = sum_i w_i J_ip``; ``E[gB_p^2] = g_p^2 + Var(gB_p)``: the expected square of the
      reconstruction's mini-batch gradient (``batch_size`` of the ``n`` samples, drawn without
      replacement), i.e. what Adam's second moment estimates, computed exactly at ``theta``.
    * ``adam_steps``: ``{name: (t, beta1)}``, the reconstruction optimiser's step count and momentum
      for the tensors it steps (others: ``t = 0``); ``lr``: ``{name: lr_p}``, 0 leaves a tensor out.

    Adam's next step is ``lr m_hat / sqrt(v_hat)`` with ``m = beta1 m + (1 - beta1) g``; only the new
    gradient depends on ``w``, the momentum does not. The look-ahead is that part of the step, with
    ``v_hat`` replaced by the exact ``E[gB^2]``:

        theta*_p = theta_p - P_p * g_p,        P_p = lr_p (1 - beta1) / (1 - beta1^(t + 1)) / sqrt(E[gB_p^2]),

    at most ``lr_p (1 - beta1) / (1 - beta1^(t+1))`` per element (``lr_p`` for a first step).
    ``P`` (normaliser held fixed) is ``-d theta* / d g``.
    """
    n = w.shape[0]
    b = min(batch_size, n)
    fpc = (n - b) / (n - 1) if n > 1 else 0.0  # finite-population correction
    theta_star, P = {}, {}
    for k, Jk in J.items():
        th = theta[k].detach()
        step = float(lr[k])
        if step == 0:
            theta_star[k], P[k] = th, torch.zeros_like(th)
            continue
        wk = w.to(Jk.dtype)
        g = torch.tensordot(wk, Jk, dims=1)
        second = n * torch.tensordot(wk * wk, Jk * Jk, dims=1)  # N sum_i (w_i J_i)^2
        root = (g * g + (second - g * g).clamp_min(0) * (fpc / b)).sqrt()
        t, beta1 = (adam_steps or {}).get(k, (0, 0.9))
        size = step * (1 - beta1) / (1 - beta1 ** (int(t) + 1))
        P[k] = torch.where(root > 0, size / root.clamp_min(1e-300), torch.zeros_like(root))
        theta_star[k] = th - P[k] * g
    return theta_star, P


def influence(J: dict, V: dict, P: dict) -> torch.Tensor:
    """``G [T, n]`` with ``G[t, i] = dL_t(theta*)/dw_i = -<P J_i, V_t>`` (module docstring).

    * ``J``: per-sample training gradients ``{name: [n, *shape]}`` at ``theta``;
    * ``V``: validation-group gradients at ``theta*`` ``{name: [T, *shape]}``;
    * ``P``: the look-ahead's preconditioner ``{name: shape}`` (held fixed).
    """
    G = None
    for k, Jk in J.items():
        n, T = Jk.shape[0], V[k].shape[0]
        pv = P[k].reshape(1, -1).to(Jk.dtype) * V[k].reshape(T, -1).to(Jk.dtype)  # [T, D]
        part = (pv @ Jk.reshape(n, -1).T).double()                                   # [T, n]
        G = -part if G is None else G - part
    return G


# ----------------------------------------------------------------------------------- outer objective
def logit_space_grads(G: torch.Tensor, w: torch.Tensor, tau: float) -> torch.Tensor:
    """``Gamma [T, n]``: ``dL_t(theta*)/ds = w * (G_t - <w, G_t>) / tau`` (softmax Jacobian)."""
    return w * (G - (G * w).sum(1, keepdim=True)) / tau


def gradient_matching(G: torch.Tensor, w: torch.Tensor, tau: float) -> torch.Tensor:
    """``GM = mean_{t<k} cos(Gamma_t, Gamma_k)`` (0 with fewer than two groups); differentiable in ``w``."""
    T = G.shape[0]
    if T < 2:
        return w.new_zeros(())
    gam = logit_space_grads(G, w, tau)
    unit = gam / gam.norm(dim=1, keepdim=True).clamp_min(1e-300)
    pairs = list(itertools.combinations(range(T), 2))
    return torch.stack([(unit[a] * unit[b]).sum() for a, b in pairs]).mean()


@dataclass
class OuterTerms:
    """The pieces of one logit step (float64 tensors over the ``n`` training samples)."""

    delta_val: torch.Tensor   # centred dF_val/dw ``[n]`` (unit RMS, or 0)
    delta_gm: torch.Tensor    # centred d(-lambda GM)/dw ``[n]``
    gm: float                 # GM at the current weights
    sigma: float              # the validation term's scale (RMS of the centred sum_t G_t)


def outer_terms(G: torch.Tensor, w: torch.Tensor, tau: float, gm_lambda: float) -> OuterTerms:
    """The centred ``w``-gradients of both terms of ``F`` (module docstring) for fixed ``G``."""
    w = w.detach().double()
    G = G.double()
    centre = lambda d: d - (w * d).sum()  # noqa: E731
    d_val = centre(G.sum(0))
    sigma = float(d_val.pow(2).mean().sqrt())
    d_val = d_val / sigma if sigma > 0 else torch.zeros_like(d_val)
    wl = w.clone().requires_grad_(True)
    gm = gradient_matching(G, wl, tau)
    if gm_lambda != 0 and gm.requires_grad:
        d_gm = centre(-gm_lambda * torch.autograd.grad(gm, wl)[0])
    else:
        d_gm = torch.zeros_like(w)
    return OuterTerms(d_val, d_gm, float(gm.detach()), sigma)


def logit_gradient_norms(terms: OuterTerms, w: torch.Tensor, tau: float) -> tuple[float, float]:
    """``(||dF_val/ds||, ||d(-lambda GM)/ds||)``: the two terms' logit-gradient norms (``dF/ds = w * Delta / tau``)."""
    w = w.double()
    return float((w * terms.delta_val / tau).norm()), float((w * terms.delta_gm / tau).norm())


def mirror_step(logits: torch.Tensor, delta: torch.Tensor, lr: float, clip: float) -> torch.Tensor:
    """``s - lr * clamp(delta / rms(delta), -clip, clip)``, re-centred to mean 0 (unchanged when ``delta`` is 0)."""
    rms = delta.pow(2).mean().sqrt()
    if float(rms) == 0 or lr == 0:
        return logits
    s = logits.double() - lr * (delta / rms).clamp(-clip, clip)
    return (s - s.mean()).to(logits.dtype)


# ------------------------------------------------------------------------------------------ refresh
def lookahead_steps(theta: dict, config) -> dict:
    """``{name: lr_p}``: ``config.lookahead_lr_alpha`` / ``config.lookahead_lr_act`` by parameter kind."""
    return {k: (alpha_lookahead_step(config) if param_kind(k) == ALPHA else act_lookahead_step(config))
            for k in theta}


def refresh_sample_logits(block, ctx, train, groups: torch.Tensor, val, val_groups: torch.Tensor,
                          logits: torch.Tensor, config, main_output, device=None,
                          adam_steps: dict | None = None) -> tuple[torch.Tensor, dict]:
    """One refresh: measure ``G`` at the block's current ``theta``, then ``config.weight_steps`` logit sub-steps.

    ``block``'s QuantLayers must be in soft mode. Uses every training and validation sample.
    Returns the new logits ``[N]`` and a record: per group ``val_loss`` (at ``theta``),
    ``val_loss_star`` (at ``theta*``), ``val_loss_ratio`` (their ratio), the two terms'
    logit-gradient norms ``grad_norm_val`` / ``grad_norm_gm`` and ``gm`` before the steps.
    """
    theta = theta_of(block, act_lookahead_step(config) > 0)
    lr = lookahead_steps(theta, config)
    n = len(train)
    idx = torch.arange(n)
    w = weights_from_logits(logits.double(), config.tau)
    _, J = per_sample_grads(block, ctx, train, idx, groups, theta, main_output, config.batch_size * 2, device)
    wd = w.to(next(iter(J.values())).device)
    theta_star, P = lookahead(theta, J, wd, lr, config.batch_size, adam_steps)
    present = sorted(int(x) for x in torch.unique(val_groups).tolist())
    L, V = group_grads(block, ctx, val, val_groups, present, theta, main_output, config.batch_size * 2, device)
    v_loss_star = per_sample_losses(block, ctx, val, torch.arange(len(val)), val_groups, theta_star, main_output,
                                    config.batch_size * 2, device).cpu().double()
    L_star = torch.stack([v_loss_star[val_groups == t].mean() for t in present])
    G = influence(J, V, P).cpu()
    del J
    s = logits.detach().clone()
    rec = None
    for _ in range(config.weight_steps):
        w = weights_from_logits(s.double(), config.tau)
        terms = outer_terms(G, w, config.tau, config.gm_lambda)
        if rec is None:
            nv, ng = logit_gradient_norms(terms, w, config.tau)
            rec = {"groups": present, "val_loss": L.tolist(), "val_loss_star": L_star.tolist(),
                   "val_loss_ratio": (L_star / L.clamp_min(1e-30)).tolist(),
                   "grad_norm_val": nv, "grad_norm_gm": ng, "gm": terms.gm, "sigma": terms.sigma}
        s = mirror_step(s, terms.delta_val + terms.delta_gm, config.lr_sample_logits / config.weight_steps,
                        LOGIT_CLIP)
    if not bool(torch.isfinite(s).all()):
        raise FloatingPointError("non-finite sample logits after a gac refresh")
    if rec is None:
        rec = {"groups": present, "val_loss": L.tolist(), "val_loss_star": L_star.tolist(),
               "val_loss_ratio": (L_star / L.clamp_min(1e-30)).tolist()}
    return s, rec


def alpha_lookahead_step(config) -> float:
    """The look-ahead's RMS step on AdaRound ``alpha``: ``lookahead_lr_alpha``, default ``lr_adaround``."""
    return config.lr_adaround if config.lookahead_lr_alpha is None else config.lookahead_lr_alpha


def act_lookahead_step(config) -> float:
    """The look-ahead's step on activation step sizes: ``lookahead_lr_act`` (0 = left out; always 0 without LSQ)."""
    return config.lookahead_lr_act if config.learn_act_scale else 0.0


def update_every(config) -> int:
    """AdaRound iterations between two refreshes: ``weight_update_every``, default ``max(1, iters // 4)``."""
    return max(1, config.iters // 4) if config.weight_update_every is None else config.weight_update_every


class SampleWeighter:
    """The sample logits of one block and their refreshes: the ``refresh`` callback of ``reconstruct_block``.

    ``weighter(it, adam_steps)`` runs ``refresh_sample_logits`` on the block's current ``alpha``,
    appends its record (with ``"iteration": it``) to ``records`` and returns the new weights
    ``softmax(logits / tau)`` (float32 ``[N]``). ``every``: the refresh interval (``update_every``).
    """

    def __init__(self, block, ctx, train, groups, val, val_groups, logits: torch.Tensor, config, main_output,
                 device=None):
        self.block, self.ctx, self.train, self.groups = block, ctx, train, groups
        self.val, self.val_groups, self.config = val, val_groups, config
        self.main_output, self.device = main_output, device
        self.logits = logits.detach().clone().float()
        self.records: list = []
        self.every = update_every(config)

    @property
    def weights(self) -> torch.Tensor:
        return weights_from_logits(self.logits, self.config.tau)

    def __call__(self, it: int, adam_steps: dict | None = None) -> torch.Tensor:
        self.logits, rec = refresh_sample_logits(self.block, self.ctx, self.train, self.groups, self.val,
                                                 self.val_groups, self.logits, self.config, self.main_output,
                                                 self.device, adam_steps)
        self.records.append({"iteration": int(it), **rec})
        return self.weights
