"""Record a unit's full-precision inputs, outputs and per-group activation ranges.

The UNet is run on the calibration samples, batch by batch; a forward hook on the unit stores its
positional and keyword arguments and its output, then stops the forward pass (nothing after the
unit is computed). Forward pre-hooks on the unit's quantizable layers keep, per timestep group,
the running min/max of every layer input (EMA, ``momentum``), per branch for split layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree


class _StopForward(Exception):
    pass


def main_output(out):
    """The tensor a unit returns (diffusers blocks return a tensor, a tuple or an output object)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


@dataclass
class UnitData:
    """A unit's recorded inputs and FP outputs for ``n`` samples.

    ``leaves``: the flattened ``(args, kwargs)``; a leaf in ``batched`` is a tensor whose first
    dimension is the sample index (concatenated over batches), any other leaf is the same in every
    batch. ``out``: float ``[n, ...]``, the FP unit output.
    """

    treedef: object
    leaves: list
    batched: list
    out: torch.Tensor

    def __len__(self):
        return int(self.out.shape[0])

    def inputs(self, idx: torch.Tensor, device=None, dtype=None) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the samples ``idx`` (int64 ``[b]``)."""
        leaves = []
        for leaf, b in zip(self.leaves, self.batched):
            if b:
                v = leaf[idx]
                if device is not None or (dtype is not None and v.is_floating_point()):
                    v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                leaves.append(v)
            else:
                leaves.append(leaf)
        args, kwargs = pytree.tree_unflatten(leaves, self.treedef)
        return args, kwargs

    def target(self, idx: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
        return self.out[idx].to(device=device, dtype=dtype)

    def select(self, idx: torch.Tensor) -> "UnitData":
        return UnitData(self.treedef, [l[idx] if b else l for l, b in zip(self.leaves, self.batched)],
                        list(self.batched), self.out[idx])


class ActRangeStats:
    """Per layer and group: EMA of the input's min and max (per branch for split layers)."""

    def __init__(self, num_groups: int, momentum: float, quantile: float = 1.0):
        self.num_groups = num_groups
        self.momentum = momentum
        self.quantile = quantile
        self.lo: dict = {}
        self.hi: dict = {}

    def _range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float().flatten()
        if self.quantile >= 1.0:
            return x.min(), x.max()
        if x.numel() > 1 << 22:
            x = x[torch.linspace(0, x.numel() - 1, 1 << 22).long()]
        return torch.quantile(x, 1 - self.quantile), torch.quantile(x, self.quantile)

    def update(self, name: str, x: torch.Tensor, group: int, in_splits) -> None:
        if in_splits is None:
            parts = [x]
        else:
            dim = 1 if x.dim() == 4 else -1
            parts = list(torch.split(x, list(in_splits), dim=dim))
        lo = torch.stack([self._range(p)[0] for p in parts])
        hi = torch.stack([self._range(p)[1] for p in parts])
        if name not in self.lo:
            self.lo[name] = torch.full((self.num_groups, len(parts)), float("nan"))
            self.hi[name] = torch.full((self.num_groups, len(parts)), float("nan"))
        old_lo, old_hi = self.lo[name][group], self.hi[name][group]
        m = self.momentum
        if torch.isnan(old_lo).any():
            self.lo[name][group], self.hi[name][group] = lo, hi
        else:
            self.lo[name][group] = m * old_lo + (1 - m) * lo
            self.hi[name][group] = m * old_hi + (1 - m) * hi

    def ranges(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``[G, S]`` lo and hi; raises if a group never saw data."""
        lo, hi = self.lo[name], self.hi[name]
        if torch.isnan(lo).any():
            missing = sorted(set(torch.nonzero(torch.isnan(lo))[:, 0].tolist()))
            raise ValueError(f"{name}: no calibration samples for timestep groups {missing}")
        return lo, hi


@torch.no_grad()
def capture_unit(unet: nn.Module, unit_module: nn.Module, layer_modules: dict, samples, batches,
                 stats: ActRangeStats | None, in_splits: dict, storage_device="cpu") -> UnitData:
    """Run ``unet`` on ``batches`` of ``samples`` and record ``unit_module``'s inputs and outputs.

    * ``samples``: callable ``idx -> (x, t, kwargs)`` giving the UNet inputs of samples ``idx``.
    * ``batches``: list of ``(idx, group or None)``; ``group`` (int) feeds ``stats`` (None: no stats).
    * ``layer_modules``: ``{qualified name: module}`` of the unit's quantizable layers.
    Raises ``ValueError`` naming the layer when a layer input holds NaN or Inf.
    """
    records = []
    current = {"group": None}

    def unit_hook(mod, args, kwargs, out):
        leaves, treedef = pytree.tree_flatten((args, kwargs))
        records.append((treedef, [l.detach().to(storage_device) if isinstance(l, torch.Tensor) else l for l in leaves],
                        main_output(out).detach().to(storage_device, torch.float32)))
        raise _StopForward

    def make_layer_hook(name):
        def hook(mod, args):
            x = args[0]
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"non-finite activations (NaN/Inf) at the input of layer {name!r}: "
                                 f"check the model weights and the calibration inputs")
            if stats is not None and current["group"] is not None:
                stats.update(name, x, current["group"], in_splits.get(name))
        return hook

    handles = [unit_module.register_forward_hook(unit_hook, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(make_layer_hook(n)) for n, m in layer_modules.items()]
    try:
        for idx, group in batches:
            current["group"] = group
            x, t, kw = samples(idx)
            try:
                unet(x, t, **kw, return_dict=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the unit was not executed by the UNet forward pass")
    finally:
        for h in handles:
            h.remove()
    treedef = records[0][0]
    n0 = records[0][2].shape[0]
    batched = [isinstance(l, torch.Tensor) and l.dim() > 0 and l.shape[0] == n0 for l in records[0][1]]
    leaves = []
    for j, b in enumerate(batched):
        leaves.append(torch.cat([r[1][j] for r in records]) if b else records[0][1][j])
    out = torch.cat([r[2] for r in records])
    if not bool(torch.isfinite(out).all()):
        raise ValueError("non-finite activations (NaN/Inf) at the output of the unit")
    return UnitData(treedef=treedef, leaves=leaves, batched=batched, out=out)
