"""The calibration result that ``tgpq.convert`` consumes.

``QuantState`` is produced by ``tgpq.calibrate`` (any method) and holds, per quantized layer,
integer weights and scales, plus the timestep -> group table and the calibration record.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..numerics import qmax
from .config import QuantConfig


@dataclass
class LayerQState:
    """Quantization of one ``nn.Linear`` or ``nn.Conv2d``.

    * ``weight_q``: int8, the float weight's shape (``[N, K]`` or ``[N, Cin, kh, kw]``), values in
      ``[-qmax, qmax]`` (qmax 7 for 4-bit, 127 for 8-bit), already rounded (RTN or AdaRound).
    * ``weight_scale``: float32 ``[N]``; dequantized weight = ``weight_q * weight_scale[:, None...]``.
    * ``act_scale``: float32 ``[G]`` (one step size per timestep group) or ``[G, S]`` for a layer
      whose input is a concatenation quantized per branch (split quantization), ``S = len(in_splits)``.
    * ``in_splits``: channel counts of the concatenated branches (sum = input channels), or None.
    """

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    act_scale: torch.Tensor
    in_splits: tuple | None = None

    def validate(self, name: str, bits: int, num_groups: int) -> None:
        q = qmax(bits)
        if self.weight_q.dtype != torch.int8:
            raise ValueError(f"{name}: weight_q must be int8, got {self.weight_q.dtype}")
        if int(self.weight_q.abs().max()) > q:
            raise ValueError(f"{name}: weight_q has values outside [-{q}, {q}] for {bits}-bit weights")
        if self.weight_scale.shape != (self.weight_q.shape[0],):
            raise ValueError(f"{name}: weight_scale shape {tuple(self.weight_scale.shape)} != [{self.weight_q.shape[0]}]")
        if not bool((self.weight_scale > 0).all()):
            raise ValueError(f"{name}: weight_scale must be positive")
        if self.act_scale.shape[0] != num_groups:
            raise ValueError(f"{name}: act_scale has {self.act_scale.shape[0]} groups, config has {num_groups}")
        if not bool(torch.isfinite(self.act_scale).all() and (self.act_scale > 0).all()):
            raise ValueError(f"{name}: act_scale must be finite and positive")
        if self.in_splits is not None:
            if sum(self.in_splits) != self.weight_q.shape[1]:
                raise ValueError(f"{name}: in_splits {self.in_splits} do not sum to {self.weight_q.shape[1]} channels")
            if self.act_scale.dim() != 2 or self.act_scale.shape[1] != len(self.in_splits):
                raise ValueError(f"{name}: split layer needs act_scale [G, {len(self.in_splits)}]")


_RELATIVE_PRECISION = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@dataclass(frozen=True, eq=False)
class WeightsFingerprint:
    """Which float weights a ``QuantState`` was calibrated on (``WeightsFingerprint.of(unet)``).

    * ``layout``: sha256 (16 hex digits) of the names and shapes of the model's floating tensors;
    * ``samples``: float32 ``[num_tensors, k]``, ``k`` evenly strided values of each tensor;
    * ``dtype``: the coarsest floating dtype the samples were read from.
    Two fingerprints match when the layouts are equal and the samples agree up to the rounding of the
    coarser dtype, so the same weights held in float32, float16 or bfloat16 match while another
    checkpoint of the architecture (whose values differ almost everywhere) does not. A guard against
    mistakes, not a seal of every value; reading it costs ``k`` values a tensor.
    """

    layout: str
    samples: torch.Tensor
    dtype: torch.dtype

    @classmethod
    def of(cls, model: torch.nn.Module, k: int = 16) -> "WeightsFingerprint":
        h, rows, coarsest = hashlib.sha256(), [], torch.float32
        for name, t in sorted(model.state_dict().items()):
            if not t.is_floating_point():
                continue
            h.update(f"{name}|{tuple(t.shape)}|".encode())
            flat = t.detach().reshape(-1)
            v = flat[::max(1, flat.numel() // k)][:k].to("cpu", torch.float32)
            rows.append(torch.cat([v, v.new_zeros(k - v.numel())]))
            if _RELATIVE_PRECISION.get(t.dtype, 0.0) > _RELATIVE_PRECISION[coarsest]:
                coarsest = t.dtype
        samples = torch.stack(rows) if rows else torch.zeros(0, k)
        return cls(h.hexdigest()[:16], samples, coarsest)

    def matches(self, other: "WeightsFingerprint") -> bool:
        if self.layout != other.layout or self.samples.shape != other.samples.shape:
            return False
        rtol = max(_RELATIVE_PRECISION[self.dtype], _RELATIVE_PRECISION[other.dtype])
        atol = 2.0 ** -24 if torch.float16 in (self.dtype, other.dtype) else 0.0  # float16 subnormals
        return bool(((self.samples - other.samples).abs() <= rtol * other.samples.abs() + atol).all())

    def digest(self) -> str:
        """Exact identity (layout and sample bytes), e.g. for resuming a calibration."""
        h = hashlib.sha256(self.layout.encode())
        h.update(self.samples.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def __str__(self) -> str:
        return self.digest()


@dataclass
class QuantState:
    """Everything ``convert`` needs, plus what the calibration learned (for inspection).

    * ``timestep_to_group``: int64 ``[num_train_timesteps]``.
    * ``layers``: qualified module name in the UNet -> ``LayerQState``.
    * ``sample_weights``: block name -> ``{"timesteps": int64 [n], "weights": float32 [n]}``
      (gac only; empty otherwise).
    * ``block_mse``: block name -> dict of output MSEs measured during calibration.
    * ``float_fingerprint``: the ``WeightsFingerprint`` of the float UNet it was calibrated on
      (``convert`` refuses another UNet); None for states built without one.
    * ``meta``: free-form JSON-able info (timings, versions).
    """

    config: QuantConfig
    timestep_to_group: torch.Tensor
    layers: dict = field(default_factory=dict)
    sample_weights: dict = field(default_factory=dict)
    block_mse: dict = field(default_factory=dict)
    float_fingerprint: WeightsFingerprint | None = None
    meta: dict = field(default_factory=dict)

    def validate(self) -> None:
        cfg = self.config
        if self.timestep_to_group.dim() != 1 or self.timestep_to_group.dtype != torch.int64:
            raise ValueError("timestep_to_group must be a 1-D int64 tensor")
        if int(self.timestep_to_group.max()) >= cfg.num_groups or int(self.timestep_to_group.min()) < 0:
            raise ValueError(f"timestep_to_group has indices outside [0, {cfg.num_groups})")
        if not self.layers:
            raise ValueError("QuantState has no quantized layers")
        for name, layer in self.layers.items():
            layer.validate(name, cfg.weight_bits, cfg.num_groups)
