"""Evaluation helpers: deterministic DDIM sampling, wall time and peak memory, CIFAR-10 from local files."""
from .cifar10 import load_cifar10
from .profiling import measure
from .sampling import ddim_sample, initial_noise, save_grid, to_uint8

__all__ = ["load_cifar10", "measure", "ddim_sample", "initial_noise", "save_grid", "to_uint8"]
