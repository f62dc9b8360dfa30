"""Block reconstruction (BRECQ / Q-Diffusion): AdaRound rounding + LSQ step sizes per timestep group.

Objective per iteration on a random mini-batch ``I`` (``B`` of the ``N`` training samples):
``(N / B) * sum_{i in I} w_i * l_i + reg_weight * sum_layers rounding_regularizer(alpha, beta)``,
``l_i`` the sum of squared errors of sample ``i``'s block output against the FP output (BRECQ's
loss convention, so BRECQ's regulariser weight keeps its meaning) and ``w`` the sample weights
(uniform ``1/N`` for ``uniform``, learned for ``gac``). The regulariser is off for the first
``adaround_warmup`` fraction of iterations, then ``beta`` decays linearly from
``adaround_beta[0]`` to ``adaround_beta[1]`` (BRECQ's schedule). Rounding (``alpha``, Adam,
``lr_adaround``) is learned first, then the step sizes (Adam, ``lr_act_scale``, when
``learn_act_scale``) with the hard-rounded weights, as Q-Diffusion does (two passes; learning both
jointly in short runs let the step sizes chase weights that were not yet rounded).
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .capture import UnitData, main_output
from .fake_quant import GroupContext, QuantLayer, rounding_regularizer
from .gac import per_sample_sq_error


def beta_at(it: int, iters: int, warmup: float, beta: tuple) -> float | None:
    """AdaRound's annealed beta at iteration ``it`` (None during warm-up: no regulariser)."""
    start_it = int(warmup * iters)
    if it < start_it:
        return None
    rel = (it - start_it) / max(1, iters - start_it)
    return beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - rel)


def qlayers_of(block: torch.nn.Module) -> dict:
    return {n: m for n, m in block.named_modules() if isinstance(m, QuantLayer)}


def set_weight_mode(block: torch.nn.Module, mode: str) -> None:
    for m in qlayers_of(block).values():
        m.weight_mode = mode


def block_forward(block, ctx: GroupContext, data: UnitData, idx: torch.Tensor, groups: torch.Tensor,
                  device=None, dtype=None) -> torch.Tensor:
    """Run ``block`` on the recorded inputs of samples ``idx``; returns the output tensor."""
    ctx.group = groups[idx].to(device) if device is not None else groups[idx]
    args, kwargs = data.inputs(idx, device=device, dtype=dtype)
    return main_output(block(*args, **kwargs))


@torch.no_grad()
def block_output_mse(block, ctx: GroupContext, data: UnitData, groups: torch.Tensor, batch_size: int,
                     device=None) -> float:
    """Mean squared error of the block's output against the recorded FP output, over all samples."""
    total, count = 0.0, 0
    n = len(data)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        out = block_forward(block, ctx, data, idx, groups, device)
        err = per_sample_sq_error(out.float(), data.target(idx, device, torch.float32))
        total += float(err.sum())
        count += out[0].numel() * idx.numel()
    return total / count


def _weighted_loss(block, ctx, data, groups, weights, idx, device):
    out = block_forward(block, ctx, data, idx, groups, device)
    err = per_sample_sq_error(out, data.target(idx, device, out.dtype))
    return (len(data) / idx.numel()) * (weights[idx].to(err.device) * err).sum()


def adam_steps(opt: torch.optim.Adam, block: torch.nn.Module) -> dict:
    """``{parameter name in block: (steps taken, beta1)}`` for the parameters ``opt`` has stepped."""
    out = {}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        for name, p in block.named_parameters():
            st = opt.state.get(p)
            if id(p) in ids and st and "step" in st:
                out[name] = (int(st["step"]), float(group["betas"][0]))
    return out


def act_scale_iters(config) -> int:
    """Iterations of the step-size phase: ``config.extra["act_scale_iters"]``, default ``iters // 2``."""
    return int(config.extra.get("act_scale_iters", config.iters // 2))


def reconstruct_block(block, ctx: GroupContext, data: UnitData, groups: torch.Tensor, weights: torch.Tensor,
                      config, generator: torch.Generator, device=None, progress: bool = True,
                      desc: str = "reconstruct", refresh: Callable[[int, dict], torch.Tensor] | None = None,
                      refresh_every: int = 1) -> dict:
    """Learn AdaRound rounding, then step sizes, of ``block``'s QuantLayers (Q-Diffusion's order).

    1. ``config.iters`` Adam steps (``lr_adaround``) on every ``alpha``: weighted loss + annealed
       rounding regulariser, inputs fake-quantized with the initial step sizes; then hard rounding.
       With ``refresh`` (gac): before iterations ``refresh_every, 2 * refresh_every, ...`` the
       weights become ``refresh(it, steps)`` (float ``[N]``, summing to 1), computed with the
       block in soft mode at its current ``alpha`` (``steps``: the optimiser's step counts by parameter
       name, ``adam_steps``); they are held fixed in between. ``refresh`` draws nothing from
       ``generator``, so gac and uniform see the same mini-batches.
    2. When ``config.learn_act_scale``: ``act_scale_iters(config)`` Adam steps (``lr_act_scale``) on
       the step sizes with the hard weights, LSQ gradient. The learned step sizes are kept only if
       they lower the weighted loss over the whole training set (our choice: a short, noisy LSQ
       run must not undo the initialisation).

    ``weights``: float ``[N]`` sample weights summing to 1 (the starting weights with ``refresh``).
    Returns ``{"loss_first", "loss_last", "act_loss_before", "act_loss_after", "act_kept"}``; the
    step-size phase uses the last weights.
    """
    layers = qlayers_of(block)
    n = len(data)
    b = min(config.batch_size, n)
    alphas = [m.alpha for m in layers.values()]
    scales = [m.act_scale for m in layers.values()]
    for s in scales:
        s.requires_grad_(False)
    for a in alphas:
        a.requires_grad_(True)
    set_weight_mode(block, "soft")
    opt = torch.optim.Adam(alphas, lr=config.lr_adaround)
    rec = {}
    for it in tqdm(range(config.iters), desc=desc, leave=False, disable=not progress):
        if refresh is not None and it > 0 and it % refresh_every == 0:
            weights = refresh(it, adam_steps(opt, block))
        idx = torch.randperm(n, generator=generator)[:b]
        loss = _weighted_loss(block, ctx, data, groups, weights, idx, device)
        beta = beta_at(it, config.iters, config.adaround_warmup, config.adaround_beta)
        total = loss
        if beta is not None:
            total = loss + config.adaround_reg_weight * sum(rounding_regularizer(a, beta) for a in alphas)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if it == 0:
            rec["loss_first"] = float(loss.detach())
        rec["loss_last"] = float(loss.detach())
    for m in layers.values():
        m.freeze("adaround")
        m.alpha.requires_grad_(False)
    steps = act_scale_iters(config) if config.learn_act_scale else 0
    if steps > 0:
        before = weighted_block_loss(block, ctx, data, groups, weights, 4 * b, device)
        saved = [s.detach().clone() for s in scales]
        for s in scales:
            s.requires_grad_(True)
        opt = torch.optim.Adam(scales, lr=config.lr_act_scale)
        for _ in range(steps):
            idx = torch.randperm(n, generator=generator)[:b]
            loss = _weighted_loss(block, ctx, data, groups, weights, idx, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for s in scales:
                    s.clamp_(min=1e-8)
        for s in scales:
            s.requires_grad_(False)
        after = weighted_block_loss(block, ctx, data, groups, weights, 4 * b, device)
        kept = after < before
        if not kept:
            with torch.no_grad():
                for s, v in zip(scales, saved):
                    s.copy_(v)
        rec.update(act_loss_before=before, act_loss_after=after, act_kept=bool(kept))
    return rec


@torch.no_grad()
def weighted_block_loss(block, ctx, data: UnitData, groups, weights, batch_size: int, device=None) -> float:
    """``sum_i w_i l_i`` over the whole training set (``l_i``: per-sample sum of squared errors)."""
    total = 0.0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(len(data), start + batch_size))
        out = block_forward(block, ctx, data, idx, groups, device)
        err = per_sample_sq_error(out.float(), data.target(idx, device, torch.float32))
        total += float((weights[idx].to(err.device).double() * err.double()).sum())
    return total
