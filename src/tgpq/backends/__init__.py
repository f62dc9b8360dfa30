"""The one dispatch point from quantized layers to kernels.

Each backend module provides ``linear(layer, x)`` and ``conv2d(layer, x)``; all compute the same
function (``tgpq.numerics``), they differ only in speed:
  * ``reference``: pure torch, dequantize then compute in float (the oracle of the tests);
  * ``cpu``: int8 x int8 -> int32 kernels of the C++ extension (``torch.ops.tgpq.*``); it also
    provides the uint8-NHWC producer/consumer ops that ``tgpq.unet.cpu_fusion`` chains;
  * ``triton``: fused Triton kernels on CUDA (``tgpq.kernels``, reached through ``torch.ops.tgpq.*``).
``auto`` picks ``triton`` for CUDA tensors and ``cpu`` for CPU tensors (``reference`` when the
extension is missing). Kernel variants (the CPU's ISA path, the GPU GEMM variant) are chosen once
inside each backend, never per call.
"""
from __future__ import annotations

import torch

from . import cpu, reference, triton
from .library import has_extension

NAMES = ("auto", "reference", "cpu", "triton")
_MODULES = {"reference": reference, "cpu": cpu, "triton": triton}
_CPU_DEFAULT = cpu if has_extension() else reference


def resolve(name: str, x: torch.Tensor):
    """The backend module for ``name`` and input ``x`` (a plain dict lookup: torch.compile traces it)."""
    if name == "auto":
        return triton if x.is_cuda else _CPU_DEFAULT
    mod = _MODULES.get(name)
    if mod is None:
        raise ValueError(f"unknown backend {name!r}: choose one of {NAMES}")
    return mod
