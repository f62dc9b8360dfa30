"""The one dispatch point from quantized layers to kernels.

Each backend module provides ``linear(layer, x)`` and ``conv2d(layer, x)``; all compute the same
function (``tgpq.numerics``), they differ only in speed:
  * ``reference``: pure torch, dequantize then compute in float (the oracle of the tests);
  * ``cpu``: int8 x int8 -> int32 kernels of the C++ extension (``torch.ops.tgpq.*``);
  * ``triton``: fused Triton kernels on CUDA (``tgpq.kernels``).
``auto`` picks ``triton`` for CUDA tensors and ``cpu`` for CPU tensors (``reference`` when the
extension is missing).
"""
from __future__ import annotations

import importlib

import torch

NAMES = ("auto", "reference", "cpu", "triton")


def resolve(name: str, x: torch.Tensor):
    if name == "auto":
        if x.is_cuda:
            name = "triton"
        else:
            from ..ops import has_extension

            name = "cpu" if has_extension() else "reference"
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: choose one of {NAMES}")
    return importlib.import_module(f"{__name__}.{name}")
