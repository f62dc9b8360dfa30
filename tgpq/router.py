"""Timestep routing for a converted model: one shared device tensor holds the scale-group index.

The converted UNet owns one ``TimestepRouter`` (a submodule named ``tgpq_router``). A forward
pre-hook on the UNet maps the incoming timestep to a group with the router's lookup table and
writes it into ``router.group_index`` (int64 ``[1]``, on the model's device, no host sync on
CUDA). Every quantized layer reads that same tensor.

Mixed timesteps in one batch are rejected with a ValueError (checked on the host for CPU
tensors, with ``torch._assert_async`` on CUDA): the kernels use one activation scale per call.
"""
from __future__ import annotations

import torch
from torch import nn

from .routing import group_of


class TimestepRouter(nn.Module):
    def __init__(self, timestep_to_group: torch.Tensor, num_groups: int):
        super().__init__()
        table = torch.as_tensor(timestep_to_group, dtype=torch.int64)
        if table.dim() != 1 or table.numel() == 0:
            raise ValueError("timestep_to_group must be a non-empty 1-D table")
        if int(table.min()) < 0 or int(table.max()) >= num_groups:
            raise ValueError(f"timestep_to_group holds group indices outside [0, {num_groups})")
        self.num_groups = num_groups
        self.register_buffer("timestep_to_group", table.clone())
        self.register_buffer("group_index", torch.zeros(1, dtype=torch.int64))

    def route(self, timestep) -> None:
        """Set ``group_index`` from a timestep (python number, 0-d or 1-d tensor)."""
        t = torch.as_tensor(timestep, device=self.timestep_to_group.device).reshape(-1)
        if t.numel() == 0:
            raise ValueError("empty timestep tensor")
        g = group_of(t, self.timestep_to_group)
        if g.numel() > 1:
            same = (g == g[0]).all()
            if g.device.type == "cpu":
                if not bool(same):
                    raise ValueError(
                        "a batch mixes timesteps from different scale groups "
                        f"({sorted(set(t.tolist()))[:8]}...); tgpq quantizes a batch with one "
                        "activation scale per layer: call the model once per timestep"
                    )
            else:
                torch._assert_async(same, "tgpq: a batch mixes timesteps from different scale groups")
        self.group_index.copy_(g[:1])

    def set_group(self, g: int) -> None:
        if not 0 <= g < self.num_groups:
            raise ValueError(f"group {g} is outside [0, {self.num_groups})")
        self.group_index.fill_(g)


def timestep_from_call(args, kwargs):
    """The timestep argument of a diffusers UNet call ``unet(sample, timestep, ...)``."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    if len(args) >= 2:
        return args[1]
    raise TypeError("the quantized UNet needs a timestep: call it as unet(sample, timestep, ...)")


def route_pre_hook(module, args, kwargs):
    """Forward pre-hook installed by ``convert`` on the UNet."""
    module.tgpq_router.route(timestep_from_call(args, kwargs))
    return None
