"""Quantized layers (``QLinear``, ``QConv2d``, ``QSplitConv2d``) and the timestep-group router."""
from .layers import BACKENDS, QConv2d, QLinear, QSplitConv2d
from .routing import (TimestepRouter, check_timesteps, group_of, routed_forward, timestep_groups_from_calibration,
                      timestep_index, uniform_timestep_groups)

__all__ = ["BACKENDS", "QConv2d", "QLinear", "QSplitConv2d", "TimestepRouter", "check_timesteps", "group_of",
           "routed_forward", "timestep_groups_from_calibration", "timestep_index", "uniform_timestep_groups"]
