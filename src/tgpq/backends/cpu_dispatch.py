"""Which ISA path and which kernel family serve each call of the cpu backend (``tgpq.backends.cpu``).

ISA paths: ``avx512vnni``, ``avx2``, ``scalar``, chosen once at first use (``TGPQ_CPU_ISA`` or the best this CPU
runs; ``set_isa`` / ``force_isa`` change it). Kernel families: tgpq's microkernels (``"ukernel"``) or oneDNN's
int8 conv / linear (``"onednn"``); ``TGPQ_CPU_KERNEL`` / ``set_kernel`` / ``force_kernel``: ``auto`` (default:
measured per layer geometry and input shape, where oneDNN is exact), or one family forced.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings

import torch

from . import library, onednn

ISA_IDS = {"scalar": 0, "avx2": 1, "avx512vnni": 2}
_ISA_NAMES = {v: k for k, v in ISA_IDS.items()}
_chosen: str | None = None  # the ISA path every op runs; set on first use
KERNELS = ("auto", "ukernel", "onednn")
_kernel_mode: str | None = None  # set on first use from TGPQ_CPU_KERNEL


def _parse_isa(name: str) -> str:
    if name not in ISA_IDS:
        raise ValueError(f"unknown cpu ISA path {name!r}: choose one of {tuple(ISA_IDS)}")
    return name


def supported_isas() -> list[str]:
    """ISA paths this CPU can run, fastest first."""
    library.require_extension()
    return [n for n in ("avx512vnni", "avx2", "scalar") if torch.ops.tgpq.cpu_isa_supported(ISA_IDS[n])]


def best_isa() -> str:
    library.require_extension()
    return _ISA_NAMES[int(torch.ops.tgpq.cpu_best_isa())]


def _check_supported(name: str) -> str:
    _parse_isa(name)
    if name not in supported_isas():
        raise ValueError(f"this CPU cannot run the {name} path (supported: {supported_isas()})")
    return name


def set_isa(name: str | None) -> None:
    """Force an ISA path for every cpu-backend op (``None``: back to automatic selection)."""
    global _chosen
    _chosen = _check_supported(name) if name is not None else None


@contextlib.contextmanager
def force_isa(name: str):
    """``with force_isa("avx2"): ...`` runs the block on one ISA path."""
    global _chosen
    prev = _chosen
    set_isa(name)
    try:
        yield
    finally:
        _chosen = prev


def current_isa() -> str:
    """The path the ops run: forced (``set_isa``), else chosen once from ``TGPQ_CPU_ISA`` or the CPU."""
    global _chosen
    if _chosen is None:
        env = os.environ.get("TGPQ_CPU_ISA")
        _chosen = _check_supported(env) if env else best_isa()
        if _chosen == "scalar":
            warnings.warn("tgpq cpu backend: the scalar int8 path runs (no AVX2, or forced); it is correct but slow",
                          RuntimeWarning, stacklevel=3)
    return _chosen


def set_kernel(mode: str | None) -> None:
    """Choose the kernel family for every later call: ``auto``, ``ukernel`` or ``onednn`` (None: the default)."""
    global _kernel_mode
    if mode is not None and mode not in KERNELS:
        raise ValueError(f"unknown cpu kernel family {mode!r}: choose one of {KERNELS}")
    if mode == "onednn" and not onednn.available():
        raise ValueError("oneDNN's int8 ops are not available in this torch build")
    _kernel_mode = mode


@contextlib.contextmanager
def force_kernel(mode: str):
    """``with force_kernel("onednn"): ...`` runs the block on one kernel family."""
    global _kernel_mode
    prev = _kernel_mode
    set_kernel(mode)
    try:
        yield
    finally:
        _kernel_mode = prev


def kernel_mode() -> str:
    global _kernel_mode
    if _kernel_mode is None:
        env = os.environ.get("TGPQ_CPU_KERNEL", "auto")
        set_kernel(env)
    return _kernel_mode


def _timed(fn) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


_PLANS: dict[tuple, str] = {}  # (layer geometry, input shape, isa) -> kernel family, decided once per process


def _geometry(layer) -> tuple:
    """What the kernels' speed depends on besides the input shape: the layer's kind, sizes and bits."""
    if hasattr(layer, "kernel_size"):
        return ("conv", layer.in_channels, layer.out_channels, tuple(layer.kernel_size), tuple(layer.stride),
                tuple(layer.padding), tuple(layer.dilation), layer.bits)
    return ("linear", layer.in_features, layer.out_features_, layer.bits)


def kernel_for(layer, shape: tuple, run_ukernel, run_onednn, on_onednn_only=None) -> str:
    """The kernel family for ``layer`` on inputs of ``shape``: forced, or (``auto``, where oneDNN is exact)
    measured on the first input of this layer geometry and shape in the process, both ways, and kept for
    every layer of that geometry (so that two copies of one model, e.g. before and after save/load,
    compute the same bits); ``served_by`` tells what served ``layer``. ``on_onednn_only(layer)`` is called
    when a new shape leaves every shape ``layer`` has seen on oneDNN (auto mode)."""
    mode = kernel_mode()
    if mode != "auto":
        return mode
    if torch.compiler.is_compiling():
        return "ukernel"
    isa = current_isa()
    key = (_geometry(layer), shape, isa)
    if key not in _PLANS:
        if onednn.available() and onednn.exact_on(isa):
            _PLANS[key] = "onednn" if _timed(run_onednn) < _timed(run_ukernel) else "ukernel"
        else:
            _PLANS[key] = "ukernel"
    plans = layer.__dict__.setdefault("_cpu_plans", {})
    new = (shape, isa) not in plans
    plans[(shape, isa)] = _PLANS[key]
    if new and on_onednn_only is not None and set(plans.values()) == {"onednn"}:
        on_onednn_only(layer)
    return _PLANS[key]


def served_by(layer) -> dict:
    """``{(input shape, isa): "ukernel" | "onednn"}`` decided so far for ``layer`` (auto mode)."""
    return dict(layer.__dict__.get("_cpu_plans", {}))
