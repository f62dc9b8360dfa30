"""tgpq: timestep-aware, gradient-aligned post-training quantization for diffusion models.

    calib = tgpq.collect_calibration(unet, scheduler, num_trajectories=..., num_steps=100, interval=5)
    qstate = tgpq.calibrate(unet, calib, tgpq.QuantConfig(weight_bits=4, act_bits=8, method="gac"))
    qunet = tgpq.convert(unet, qstate)          # drop-in: qunet(sample, timestep).sample
    tgpq.save(qunet, "unet-w4a8.safetensors"); qunet = tgpq.load("unet-w4a8.safetensors")
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .config import QuantConfig
from .convert import convert, quantized_layers, set_backend, weight_bytes
from .modules import QConv2d, QLinear, QSplitConv2d
from .qstate import LayerQState, QuantState
from .serialization import load, save


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


def collect_calibration(*args, **kwargs):
    """See ``tgpq.calibration.collect_calibration``."""
    from .calibration import collect_calibration as f

    return f(*args, **kwargs)


def calibrate(*args, **kwargs):
    """See ``tgpq.calibration.calibrate``."""
    from .calibration import calibrate as f

    return f(*args, **kwargs)


def load_reference_model(*args, **kwargs):
    """The trained CIFAR-10 UNet shipped with the package (see ``tgpq.reference_model``)."""
    from .reference_model import load_reference_model as f

    return f(*args, **kwargs)


__all__ = [
    "QuantConfig", "QuantState", "LayerQState", "QLinear", "QConv2d", "QSplitConv2d",
    "convert", "set_backend", "quantized_layers", "weight_bytes", "save", "load",
    "collect_calibration", "calibrate", "load_reference_model",
]
