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
    """A round-to-nearest QuantState (``tgpq.calibration.rtn``) on seeded random inputs, one forward per timestep.

    ``make_inputs(generator, batch) -> (sample, extra_kwargs)`` builds each call (default: an RGB sample of
    ``sample_size``); ``weight_scale`` is ``"mse"`` (clipping search) or ``"absmax"`` (quicker).
    """
    from tgpq.calibration.rtn import rtn_quant_state

    gen = torch.Generator().manual_seed(seed)

    def inputs(k, t):
        if make_inputs is None:
            return torch.randn(batch, 3, sample_size, sample_size, generator=gen), {}
        return make_inputs(gen, batch)

    return rtn_quant_state(unet, config, inputs, timesteps, weight_scale)
