"""Models of the sampling benchmark: the shipped reference UNet, the full-size DDPM CIFAR-10 and SD 1.5
UNets (random weights), tiny versions for tests, their random inputs, and a quick RTN QuantState."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...calibration.rtn import rtn_quant_state
from ...recipe import QuantConfig, QuantState
from ...unet import load_reference_model

# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

#: The DDPM CIFAR-10 UNet (google/ddpm-cifar10-32 layout), 35,746,307 parameters.
DDPM_CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
DDPM_CIFAR10_PARAMS = 35_746_307

#: The published Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json),
#: 859,520,964 parameters.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_PARAMS = 859_520_964
SD15_TEXT_SHAPE = (77, 768)

#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters)
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_PARAMS = 2_567_463_684

TINY_DDPM_CONFIG = dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 32),
    norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
)
TINY_LDM_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_LDM_TEXT_SHAPE = (7, 32)

ALL_MODELS = ("reference", "ddpm-cifar10", "sd15", "tiny-ddpm", "tiny-ldm")


@dataclass
class ModelSpec:
    """A benchmark model: ``build(device)`` returns the float32 UNet in eval mode on ``device``.

    ``sample_shape`` is ``(C, H, W)`` of one sample; ``text_shape`` is ``(L, D)`` of the
    ``encoder_hidden_states`` of a conditional UNet, or None.
    """

    name: str
    description: str
    build: Callable[[torch.device], torch.nn.Module]
    sample_shape: tuple
    text_shape: tuple | None = None
    expected_params: int | None = None


def _build_in_place(cls, config: dict, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Random-init a diffusers UNet directly on ``device`` (an 860M model inits in seconds on a GPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    return model.eval()


def _unet2d(config):
    from diffusers import UNet2DModel

    return lambda device: _build_in_place(UNet2DModel, config, device)


def _unet2d_cond(config):
    from diffusers import UNet2DConditionModel

    return lambda device: _build_in_place(UNet2DConditionModel, config, device)


def _reference(device):
    return load_reference_model(device=device)


def model_spec(name: str) -> ModelSpec:
    if name == "reference":
        return ModelSpec(name, "shipped CIFAR-10 UNet (trained)", _reference, (3, 32, 32))
    if name == "ddpm-cifar10":
        return ModelSpec(name, "DDPM CIFAR-10 UNet, random weights", _unet2d(DDPM_CIFAR10_CONFIG), (3, 32, 32),
                         expected_params=DDPM_CIFAR10_PARAMS)
    if name == "sd15":
        return ModelSpec(name, "Stable Diffusion 1.5 UNet, random weights, 64x64x4 latents, random text [77, 768]",
                         _unet2d_cond(SD15_UNET_CONFIG), (4, 64, 64), SD15_TEXT_SHAPE, SD15_PARAMS)
    if name == "tiny-ddpm":
        return ModelSpec(name, "tiny DDPM-layout UNet (tests)", _unet2d(TINY_DDPM_CONFIG), (3, 16, 16))
    if name == "tiny-ldm":
        return ModelSpec(name, "tiny conditional UNet (tests)", _unet2d_cond(TINY_LDM_CONFIG), (4, 16, 16),
                         TINY_LDM_TEXT_SHAPE)
    raise ValueError(f"unknown model {name!r}: choose from {ALL_MODELS}")


def reference_model_available() -> str | None:
    """None when the shipped model loads, else the reason it does not."""
    try:
        load_reference_model()
    except (FileNotFoundError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# A quick round-to-nearest QuantState (speed runs only)
# --------------------------------------------------------------------------------------------------

def random_inputs(spec: ModelSpec, batch: int, device, dtype, seed: int = 0):
    """Noise ``[batch, *sample_shape]`` and, for a conditional model, text embeddings ``[batch, L, D]``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *spec.sample_shape, generator=gen).to(device, dtype)
    text = None
    if spec.text_shape is not None:
        text = torch.randn(batch, *spec.text_shape, generator=gen).to(device, dtype)
    return x, text


def unet_kwargs(text) -> dict:
    return {} if text is None else {"encoder_hidden_states": text}


def quick_rtn_qstate(unet: torch.nn.Module, spec: ModelSpec, config: QuantConfig, seed: int = 0) -> QuantState:
    """Round-to-nearest ``QuantState`` for speed measurements (``tgpq.calibration.rtn``): abs-max weight
    scales, activation scales from one forward (batch 2) of random inputs at each group's middle
    timestep. Takes seconds even for SD 1.5."""
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype

    def inputs(k, t):
        x, text = random_inputs(spec, 2, device, dtype, seed + k)
        return x, unet_kwargs(text)

    return rtn_quant_state(unet, config, inputs, weight_scale="absmax")


