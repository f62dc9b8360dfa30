"""tgpq: timestep-aware, gradient-aligned post-training quantization for diffusion models.

    calib = tgpq.collect_calibration(unet, scheduler, num_trajectories=..., num_steps=100, interval=5)
    qstate = tgpq.calibrate(unet, calib, tgpq.QuantConfig(weight_bits=4, act_bits=8, method="gac"))
    qunet = tgpq.convert(unet, qstate)          # drop-in: qunet(sample, timestep).sample
    tgpq.save(qunet, "unet-w4a8.safetensors"); qunet = tgpq.load("unet-w4a8.safetensors")

The package is built in floors, each importing only the floors below it (docs/architecture.md):
``numerics`` < ``recipe``, ``layout`` < ``backends`` < ``nn`` < ``calibration`` < ``unet`` < ``eval``,
``metrics`` < ``demo``, ``cli``; ``kernels`` (Triton) knows nothing of tgpq.
"""
from __future__ import annotations

from .calibration import calibrate, collect_calibration
from .nn import QConv2d, QLinear, QSplitConv2d
from .recipe import LayerQState, QuantConfig, QuantState
from .unet import convert, load, load_reference_model, quantized_layers, save, set_backend, weight_bytes

__all__ = [
    "QuantConfig", "QuantState", "LayerQState", "QLinear", "QConv2d", "QSplitConv2d",
    "convert", "set_backend", "quantized_layers", "weight_bytes", "save", "load",
    "collect_calibration", "calibrate", "load_reference_model",
]
