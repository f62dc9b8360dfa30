"""A round-to-nearest ``QuantState`` without a calibration set: the one RTN builder for tests,
benchmarks and quick speed measurements (``calibrate(method="rtn")`` is the real, data-driven one).

Weights: per-output-channel scales (MSE clipping search or plain abs-max), round to nearest.
Activations: for every timestep group, the abs-max of each quantized layer's input over the forward
passes run at that group's timesteps; a group that saw no input (or only zeros) takes the layer's
largest abs-max (1.0 when there is none).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..nn.routing import group_of, uniform_timestep_groups
from ..numerics import absmax_weight_scale, act_scale_from_range, mse_weight_scale, quantize_weight
from ..recipe import LayerQState, QuantConfig, QuantState, WeightsFingerprint
from .blocks import check_convertible, quantizable_layers


def group_midpoints(config: QuantConfig) -> list[int]:
    """One timestep in the middle of each uniform timestep group."""
    return [int((g + 0.5) * config.num_train_timesteps / config.num_groups) for g in range(config.num_groups)]


@torch.no_grad()
def rtn_quant_state(unet: nn.Module, config: QuantConfig, inputs: Callable[[int, int], tuple],
                    timesteps: Iterable[int] | None = None, weight_scale: str = "mse") -> QuantState:
    """Quantize every ``Linear`` / ``Conv2d`` of ``unet`` outside ``config.exclude`` by round to nearest.

    * ``inputs(k, t) -> (sample, kwargs)``: the UNet inputs of the ``k``-th forward pass, run at timestep
      ``t`` (on the model's device and dtype);
    * ``timesteps``: one forward pass per entry (default: ``group_midpoints(config)``), each feeding the
      activation range of its group in the uniform timestep table;
    * ``weight_scale``: ``"mse"`` (clipping search) or ``"absmax"`` (quicker, for large models).
    Returns a CPU ``QuantState`` with ``uniform_timestep_groups``.
    """
    if weight_scale not in ("mse", "absmax"):
        raise ValueError(f"weight_scale={weight_scale!r}: use 'mse' or 'absmax'")
    check_convertible(unet, config.exclude)
    table = uniform_timestep_groups(config.num_groups, config.num_train_timesteps)
    names = quantizable_layers(unet, config.exclude)
    amax = {n: torch.zeros(config.num_groups) for n in names}
    current = {"g": 0}

    def record(name):
        def hook(mod, inp, out):
            g = current["g"]
            amax[name][g] = torch.maximum(amax[name][g], inp[0].detach().abs().amax().float().cpu())
        return hook

    hooks = [unet.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        for k, t in enumerate(group_midpoints(config) if timesteps is None else timesteps):
            current["g"] = int(group_of(torch.tensor(t), table))
            sample, kwargs = inputs(k, t)
            unet(sample, t, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    layers = {}
    for n in names:
        w = unet.get_submodule(n).weight.detach().float().cpu()
        a = amax[n]
        a = torch.where(a > 0, a, a.max() if a.max() > 0 else torch.tensor(1.0))
        bits = config.weight_bits
        s = mse_weight_scale(w, bits) if weight_scale == "mse" else absmax_weight_scale(w, bits)
        layers[n] = LayerQState(quantize_weight(w, s, bits), s, act_scale_from_range(-a, a))
    return QuantState(config=config, timestep_to_group=table, layers=layers,
                      float_fingerprint=WeightsFingerprint.of(unet))
