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

import importlib.util
import sys
from pathlib import Path


def _alias_source_kernels() -> None:
    """In a source checkout ``kernels/`` sits beside ``tgpq/``; installed, it is ``tgpq/kernels``."""
    if importlib.util.find_spec(f"{__name__}.kernels") is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(f"{__name__}.kernels", init,
                                                      submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)


_alias_source_kernels()

from .calibration import calibrate, collect_calibration  # noqa: E402
from .nn import QConv2d, QLinear, QSplitConv2d  # noqa: E402
from .recipe import LayerQState, QuantConfig, QuantState  # noqa: E402
from .unet import convert, load, load_reference_model, quantized_layers, save, set_backend, weight_bytes  # noqa: E402

__all__ = [
    "QuantConfig", "QuantState", "LayerQState", "QLinear", "QConv2d", "QSplitConv2d",
    "convert", "set_backend", "quantized_layers", "weight_bytes", "save", "load",
    "collect_calibration", "calibrate", "load_reference_model",
]
