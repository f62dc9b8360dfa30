"""The recipe: ``QuantConfig`` (what to quantize and how to calibrate, validated on construction) and
``QuantState`` (the calibrate -> convert contract)."""
from .config import DEFAULT_EXCLUDE, QuantConfig, parse_bits
from .qstate import LayerQState, QuantState, WeightsFingerprint

__all__ = ["DEFAULT_EXCLUDE", "QuantConfig", "parse_bits", "LayerQState", "QuantState", "WeightsFingerprint"]
