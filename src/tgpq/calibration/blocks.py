"""Reconstruction units of a diffusers UNet (BRECQ / Q-Diffusion granularity).

A unit is one ``ResnetBlock2D``, one attention block (``Transformer2DModel``, or a bare
``Attention`` as in ``UNet2DModel``), one ``Downsample2D`` / ``Upsample2D``, or a single
``nn.Linear`` / ``nn.Conv2d`` that lies in none of those. Units are listed in the order the UNet's
forward pass first calls them (found with one probe forward). A layer whose qualified name starts
with an entry of ``config.exclude`` stays in floating point and is not part of any unit.

Split quantization: in up blocks each resnet sees ``cat([h, skip], dim=1)``; its ``conv1`` and
``conv_shortcut`` (the layers whose input has the concatenated channel count) get
``in_splits = (C_h, C_skip)``, found from the ``res_hidden_states_tuple`` the up block receives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import QConv2d

UNIT_CLASS_NAMES = ("ResnetBlock2D", "Transformer2DModel", "Attention", "Downsample2D", "Upsample2D")


@dataclass
class ReconUnit:
    """One reconstruction unit: ``name`` (qualified module name in the UNet), its quantizable
    layers (qualified names, in ``named_modules`` order) and the split of each split layer."""

    name: str
    layers: list = field(default_factory=list)
    in_splits: dict = field(default_factory=dict)

    def local(self, layer_name: str) -> str:
        """The layer's name relative to the unit module ('' when the unit is the layer itself)."""
        if layer_name == self.name:
            return ""
        return layer_name[len(self.name) + 1:]


def is_excluded(name: str, exclude) -> bool:
    """True when the qualified ``name`` starts with an entry of ``exclude`` (plain prefix match)."""
    return any(e and name.startswith(e) for e in exclude)


def quantizable_layers(unet: nn.Module, exclude) -> list[str]:
    """Qualified names of every ``nn.Linear`` / ``nn.Conv2d`` not excluded, in ``named_modules`` order."""
    return [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and not is_excluded(n, exclude)]


def check_convertible(unet: nn.Module, exclude) -> None:
    """Raise ``ValueError`` (naming the layer) for a quantizable layer ``convert`` could not convert:
    checked before any calibration work."""
    for name in quantizable_layers(unet, exclude):
        layer = unet.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            QConv2d.check_supported(layer, name)


def _is_unit_module(m: nn.Module) -> bool:
    return any(c.__name__ in UNIT_CLASS_NAMES for c in type(m).__mro__)


def _outer_unit_of(name: str, unit_names: set) -> str | None:
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        prefix = ".".join(parts[:k])
        if prefix in unit_names:
            return prefix
    return None


def _up_block_splits(unet: nn.Module, probe_calls) -> dict:
    """``{layer name: (C_h, C_skip)}`` for the resnet layers that consume a skip concatenation."""
    splits = {}
    up_blocks = getattr(unet, "up_blocks", None)
    if up_blocks is None:
        return splits
    name_of = {id(m): n for n, m in unet.named_modules()}
    for blk in up_blocks:
        skips = probe_calls.get(id(blk))
        resnets = getattr(blk, "resnets", None)
        if skips is None or resnets is None:
            continue
        prefix = name_of[id(blk)]
        for i, r in enumerate(resnets):
            if i >= len(skips):
                break
            c_skip = int(skips[-1 - i])
            for attr in ("conv1", "conv_shortcut"):
                layer = getattr(r, attr, None)
                if isinstance(layer, nn.Conv2d) and layer.in_channels > c_skip and layer.in_channels == r.in_channels:
                    splits[f"{prefix}.resnets.{i}.{attr}"] = (layer.in_channels - c_skip, c_skip)
    return splits


@torch.no_grad()
def find_units(unet: nn.Module, exclude, probe_inputs: tuple) -> list[ReconUnit]:
    """List the reconstruction units of ``unet`` in execution order.

    ``probe_inputs``: ``(sample, timestep, kwargs)`` for one small forward pass (1-2 samples).
    Raises ``ValueError`` when there is no quantizable layer, or when a quantizable layer is not
    executed by the forward pass (it could not be calibrated: exclude it).
    """
    layers = quantizable_layers(unet, exclude)
    if not layers:
        raise ValueError(
            f"the model has no quantizable layer: no nn.Linear / nn.Conv2d outside config.exclude={tuple(exclude)}")
    unit_names = {n for n, m in unet.named_modules() if n and _is_unit_module(m)}
    owner = {}
    for ln in layers:
        u = _outer_unit_of(ln, unit_names)
        owner[ln] = u if u is not None else ln

    order: list[str] = []
    seen = set()
    skip_channels: dict = {}
    handles = []
    modules = dict(unet.named_modules())
    for uname in sorted(set(owner.values())):
        def pre(mod, args, _n=uname):
            if _n not in seen:
                seen.add(_n)
                order.append(_n)
        handles.append(modules[uname].register_forward_pre_hook(pre))
    for blk in getattr(unet, "up_blocks", []) or []:
        def up_pre(mod, args, kwargs):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if res is not None:
                skip_channels[id(mod)] = [int(r.shape[1]) for r in res]
        handles.append(blk.register_forward_pre_hook(up_pre, with_kwargs=True))
    try:
        sample, timestep, kwargs = probe_inputs
        unet(sample, timestep, **kwargs, return_dict=False)
    finally:
        for h in handles:
            h.remove()
    missing = [ln for ln in layers if owner[ln] not in seen]
    if missing:
        raise ValueError(
            f"layers {missing[:5]} are never executed by the UNet's forward pass, so they cannot be "
            f"calibrated: add them to config.exclude")
    splits = _up_block_splits(unet, skip_channels)
    units = []
    for uname in order:
        members = [ln for ln in layers if owner[ln] == uname]
        units.append(ReconUnit(name=uname, layers=members, in_splits={ln: splits[ln] for ln in members if ln in splits}))
    return units
