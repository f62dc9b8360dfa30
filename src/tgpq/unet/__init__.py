"""Everything that knows the UNet: ``convert`` (float layers -> quantized ones, router installed, CPU
fusions), ``save`` / ``load``, the CPU fusions themselves, loading float UNets and the shipped
reference model, ``quantize`` (a whole pipeline in one call) and the diffusers-style folders
(``save_pretrained`` / ``from_pretrained``)."""
from .convert import convert, quantized_layers, set_backend, weight_bytes
from .loading import REFERENCE_ARCHITECTURE, build_unet, load_reference_model, load_unet
from .pipeline import quantize
from .pretrained import from_pretrained, save_pretrained
from .serialization import load, save

__all__ = ["convert", "quantized_layers", "set_backend", "weight_bytes", "REFERENCE_ARCHITECTURE", "build_unet",
           "load_reference_model", "load_unet", "load", "save", "quantize", "save_pretrained", "from_pretrained"]
