"""Quantized layers (``QLinear``, ``QConv2d``, ``QSplitConv2d``) and the timestep-group router."""
from .layers import BACKENDS, QConv2d, QLinear, QSplitConv2d
from .routing import (TimestepRouter, group_of, route_pre_hook, timestep_groups_from_calibration,
                      uniform_timestep_groups)

__all__ = ["BACKENDS", "QConv2d", "QLinear", "QSplitConv2d", "TimestepRouter", "group_of", "route_pre_hook",
           "timestep_groups_from_calibration", "uniform_timestep_groups"]
