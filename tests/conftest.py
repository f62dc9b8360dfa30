"""Shared fixtures: small diffusers UNets built from configs and a quick min/max QuantState."""
from __future__ import annotations

import pytest
import torch


def small_unet_config(**over) -> dict:
    """The DDPM CIFAR-10 layout (Down, AttnDown, Down / Up, AttnUp, Up) scaled far down."""
    cfg = dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    )
    cfg.update(over)
    return cfg


def make_small_unet(seed: int = 0, **over):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**small_unet_config(**over)).eval()


@pytest.fixture
def small_unet():
    return make_small_unet()


def minmax_qstate(unet, config, timesteps=(999, 700, 400, 100, 10), batch=4, seed=0, sample_size=16,
                  make_inputs=None, weight_scale="mse"):
    """A round-to-nearest QuantState: MSE weight scales, act scales from per-group abs-max of inputs.

    Test scaffolding for the foundation (calibration provides the real one).
    ``make_inputs(generator, batch) -> (sample, extra_kwargs)`` builds each calibration call (default:
    an RGB sample of ``sample_size``); ``weight_scale`` is ``"mse"`` (clipping search) or ``"absmax"``
    (quicker).
    """
    from tgpq.convert import quantized_layers  # noqa: F401
    from tgpq.numerics import absmax_weight_scale, act_scale_from_range, mse_weight_scale, quantize_weight
    from tgpq.qstate import LayerQState, QuantState
    from tgpq.routing import group_of, uniform_timestep_groups

    table = uniform_timestep_groups(config.num_groups, config.num_train_timesteps)
    names = [n for n, m in unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not any(n.startswith(e) for e in config.exclude)]
    amax = {n: torch.zeros(config.num_groups) for n in names}
    current = {"g": 0}
    hooks = []
    for n in names:
        def hook(mod, inp, out, n=n):
            amax[n][current["g"]] = max(float(amax[n][current["g"]]), float(inp[0].abs().max()))
        hooks.append(unet.get_submodule(n).register_forward_hook(hook))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in timesteps:
            current["g"] = int(group_of(torch.tensor(t), table))
            if make_inputs is None:
                unet(torch.randn(batch, 3, sample_size, sample_size, generator=gen), t)
            else:
                sample, extra = make_inputs(gen, batch)
                unet(sample, t, **extra)
    for h in hooks:
        h.remove()
    layers = {}
    for n in names:
        m = unet.get_submodule(n)
        a = amax[n].clone()
        a[a == 0] = a.max() if a.max() > 0 else 1.0
        if weight_scale == "mse":
            s = mse_weight_scale(m.weight, config.weight_bits)
        else:
            s = absmax_weight_scale(m.weight, config.weight_bits)
        layers[n] = LayerQState(quantize_weight(m.weight, s, config.weight_bits), s,
                                act_scale_from_range(-a, a))
    return QuantState(config=config, timestep_to_group=table, layers=layers)
