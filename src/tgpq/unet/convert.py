"""``convert``: swap the float layers of a diffusers UNet for quantized ones, per a ``QuantState``.

It finds layers by qualified name, replaces ``nn.Linear`` -> ``QLinear`` and ``nn.Conv2d`` ->
``QConv2d`` (``QSplitConv2d`` for split layers), installs one ``TimestepRouter`` as
``unet.tgpq_router`` and, as the instance's forward, ``tgpq.nn.routing.routed_forward``, which routes
the call's timestep wherever the forward runs. The result is the same diffusers class with the same
call signature and output.
"""
from __future__ import annotations

import copy
import types

import torch
from torch import nn

from ..backends import triton as triton_backend
from ..backends.library import has_extension
from ..nn import BACKENDS, QConv2d, QLinear, QSplitConv2d, TimestepRouter, routed_forward
from ..recipe import LayerQState, QuantState, WeightsFingerprint
from .cpu_fusion import fuse_for_cpu

QUANT_LAYER_TYPES = (QLinear, QConv2d, QSplitConv2d)


def _parent_and_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
        getattr(parent, attr)
    except AttributeError:
        raise ValueError(f"the model has no layer named {name!r}") from None
    return parent, attr


def quantized_layer(layer: nn.Module, lq: LayerQState, bits: int, name: str = "") -> nn.Module:
    """The quantized replacement of one float layer."""
    if isinstance(layer, nn.Linear):
        if lq.in_splits is not None:
            raise ValueError(f"{name}: split quantization is only supported for Conv2d layers")
        return QLinear.from_float(layer, lq, bits)
    if isinstance(layer, nn.Conv2d):
        QConv2d.check_supported(layer, name)
        if lq.in_splits is not None:
            return QSplitConv2d.from_float(layer, lq, bits)
        return QConv2d.from_float(layer, lq, bits)
    raise ValueError(f"{name}: layers of type {type(layer).__name__} cannot be quantized (only Linear and Conv2d)")


def install_router(model: nn.Module, router: TimestepRouter) -> None:
    model.add_module("tgpq_router", router)
    for m in model.modules():
        if isinstance(m, (QLinear, QConv2d)):
            m.attach_router(router)
    model.forward = types.MethodType(routed_forward, model)  # routes wherever the forward runs


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Choose the backend of every quantized layer: ``auto``, ``reference``, ``cpu`` or ``triton``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
    for m in model.modules():
        if isinstance(m, (QLinear, QConv2d)):
            m.backend = backend
    return model


def convert(unet: nn.Module, qstate: QuantState, backend: str = "auto", inplace: bool = False,
            allow_other_weights: bool = False) -> nn.Module:
    """Return ``unet`` with every layer named in ``qstate.layers`` quantized.

    ``unet`` is a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (any ``nn.Module`` whose
    forward takes ``(sample, timestep, ...)`` works). The input model is left untouched unless
    ``inplace=True``. Layers not in ``qstate`` (the config's ``exclude`` list) stay in float.
    A ``qstate`` calibrated on other float weights (``QuantState.float_fingerprint``) is refused
    unless ``allow_other_weights=True``: its scales and rounding belong to those weights.
    """
    if not isinstance(qstate, QuantState):
        raise TypeError(f"convert expects a tgpq.QuantState, got {type(qstate).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
    qstate.validate()
    if getattr(unet, "tgpq_router", None) is not None:
        raise ValueError("this model is already converted")
    if qstate.float_fingerprint is not None and not allow_other_weights:
        mine = WeightsFingerprint.of(unet)
        if not qstate.float_fingerprint.matches(mine):
            raise ValueError(f"this QuantState was calibrated on other float weights (fingerprint "
                             f"{qstate.float_fingerprint}, this UNet {mine}): convert the UNet it was calibrated "
                             f"on, or pass allow_other_weights=True")
    model = unet if inplace else copy.deepcopy(unet)
    bits = qstate.config.weight_bits
    for name, lq in qstate.layers.items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, quantized_layer(getattr(parent, attr), lq, bits, name))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    router = TimestepRouter(qstate.timestep_to_group, qstate.config.num_groups).to(device)
    install_router(model, router)
    model.tgpq_config = qstate.config
    set_backend(model, backend)
    choose_kernels(model, backend)
    return model


def choose_kernels(model: nn.Module, backend: str) -> None:
    """Make the backends' once-per-device kernel choices now, before any call (or torch.compile trace):
    the GPU GEMM variant on CUDA, the ISA path and the fusions on the CPU."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda" and backend in ("auto", "triton"):
        triton_backend.gemm_variant(device)
    maybe_fuse_for_cpu(model, backend)


def maybe_fuse_for_cpu(model: nn.Module, backend: str) -> None:
    """On the CPU with the extension, fuse GroupNorm+SiLU+quantize into the convs and merge q/k/v
    (``tgpq.unet.cpu_fusion``); the patched forwards fall back to the plain path for any other backend
    or device, so this never changes what is computed, only how fast."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if backend in ("auto", "cpu") and device.type == "cpu" and has_extension():
        fuse_for_cpu(model)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> quantized layer (QLinear / QConv2d / QSplitConv2d) of a converted model."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYER_TYPES) and not any(name.startswith(p + ".") for p in out):
            out[name] = m
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and persistent buffers, i.e. what ``save`` writes;
    packed weights count at their packed size). Backend caches such as the CPU kernels' repacked
    weights are not included."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
