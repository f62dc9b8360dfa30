"""tgpq: timestep-aware, gradient-aligned post-training quantization for diffusion models.

    calib = tgpq.collect_calibration(unet, scheduler, num_trajectories=..., num_steps=100, interval=5)
    qstate = tgpq.calibrate(unet, calib, tgpq.QuantConfig(weight_bits=4, act_bits=8, method="gac"))
    qunet = tgpq.convert(unet, qstate)          # drop-in: qunet(sample, timestep).sample
    tgpq.save(qunet, "unet-w4a8.safetensors"); qunet = tgpq.load("unet-w4a8.safetensors")
    qpipe = tgpq.quantize(pipe, tgpq.QuantConfig(), prompts=[...], guidance_scale=7.5)  # a whole pipeline
    tgpq.save_pretrained(qpipe, "folder"); qpipe = tgpq.from_pretrained("folder")    # diffusers-style folders

The package is built in floors, each importing only the floors below it (docs/architecture.md):
``numerics`` < ``recipe``, ``layout`` < ``backends`` < ``nn`` < ``calibration`` < ``unet`` < ``eval``,
``metrics`` < ``demo``, ``cli``; ``kernels`` (Triton) knows nothing of tgpq.
"""
from __future__ import annotations

from .calibration import calibrate, collect_calibration, collect_from_pipeline
from .nn import QConv2d, QLinear, QSplitConv2d
from .recipe import LayerQState, QuantConfig, QuantState
from .unet import (convert, from_pretrained, load, load_reference_model, quantize, quantized_layers, save,
                   save_pretrained, set_backend, weight_bytes)

__all__ = [
    "QuantConfig", "QuantState", "LayerQState", "QLinear", "QConv2d", "QSplitConv2d",
    "convert", "set_backend", "quantized_layers", "weight_bytes", "save", "load",
    "collect_calibration", "calibrate", "load_reference_model",
    "quantize", "collect_from_pipeline", "save_pretrained", "from_pretrained",
]
