"""Calibration: collect trajectories, reconstruct block by block, learn gradient-aligned sample weights.

Public entry points: :func:`collect_calibration`, :func:`collect_from_pipeline` (through a pipeline's own
sampling runs), :class:`CalibrationSet`, :func:`calibrate`,
:func:`plot_sample_weights`, :func:`fake_quant_model` (simulate a ``QuantState`` in float).
"""
from .calibrate import calibrate
from .collect import CalibrationSet, collect_calibration
from .pipeline_collect import UNetSampler, collect_from_pipeline
from .plot import plot_sample_weights
from .simulate import fake_quant_model

__all__ = ["calibrate", "collect_calibration", "collect_from_pipeline", "UNetSampler", "CalibrationSet", "plot_sample_weights", "fake_quant_model"]
