"""tgpq: timestep-aware, gradient-aligned post-training quantization for diffusion models."""
from .config import QuantConfig

__all__ = ["QuantConfig"]
