"""Simulated (fake-quant) inference of a ``QuantState``: the quantized function, computed in float.

``fake_quant_model(unet, qstate)`` returns a copy of ``unet`` whose quantized layers are
``QuantLayer``s in hard mode: weights ``weight_q * weight_scale``, inputs fake-quantized with the
step size of the group of the timestep passed to the UNet (``tgpq.nn.routing.group_of``). It
computes what the int8 kernels compute, up to float summation order, and is what calibration
measures; ``tgpq.convert(..., backend="reference")`` is the deployment path.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..nn.routing import group_of
from .fake_quant import GroupContext, QuantLayer, replace_submodule


def install_fake_quant(model: nn.Module, layers: dict, bits: int, ctx: GroupContext) -> None:
    """Replace, in place, each layer ``name -> LayerQState`` of ``model`` by a hard-mode ``QuantLayer``."""
    modules = dict(model.named_modules())
    for name, lq in layers.items():
        if name not in modules:
            raise ValueError(f"QuantState layer {name!r} is not a module of this UNet")
        q = QuantLayer(modules[name], lq.weight_scale, lq.act_scale, bits, ctx, lq.in_splits)
        with torch.no_grad():
            q.weight_q.copy_(lq.weight_q)
        q.weight_mode = "hard"
        q.alpha.requires_grad_(False)
        q.act_scale.requires_grad_(False)
        replace_submodule(model, name, q)


def attach_group_router(model: nn.Module, timestep_to_group: torch.Tensor, ctx: GroupContext):
    """Forward pre-hook on ``model`` setting ``ctx.group`` from the timestep argument; returns its handle."""
    table = timestep_to_group.clone()

    def route(mod, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t)
        g = group_of(t.to(table.device), table)
        if g.dim() == 0:
            g = g.expand(sample.shape[0])
        ctx.group = g.to(sample.device)

    return model.register_forward_pre_hook(route, with_kwargs=True)


def fake_quant_model(unet: nn.Module, qstate) -> nn.Module:
    """A copy of ``unet`` computing the quantized model of ``qstate`` (same call signature)."""
    qstate.validate()
    model = copy.deepcopy(unet).float().eval()
    ctx = GroupContext()
    install_fake_quant(model, qstate.layers, qstate.config.weight_bits, ctx)
    attach_group_router(model, qstate.timestep_to_group, ctx)
    model.tgpq_group_context = ctx
    return model
