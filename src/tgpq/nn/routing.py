"""Timestep routing: which activation scale group serves a diffusion timestep, and the router that
tells every quantized layer of a converted model.

A *scale group* is a contiguous range of diffusion timesteps that shares one activation step size per
quantized layer. The mapping is a lookup table ``timestep_to_group`` of shape ``[num_train_timesteps]``
(int64), kept on the model's device (``uniform_timestep_groups``, ``timestep_groups_from_calibration``;
``group_of`` maps timesteps through it, the same way everywhere).

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


def uniform_timestep_groups(num_groups: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Equal-width contiguous groups: timestep t -> floor(t * G / T). int64 [T]."""
    t = torch.arange(num_train_timesteps)
    return torch.div(t * num_groups, num_train_timesteps, rounding_mode="floor").to(torch.int64)


def timestep_groups_from_calibration(kept_timesteps, num_groups: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Groups built from the calibration timesteps (the paper's "tasks").

    The distinct kept timesteps are sorted and cut into ``num_groups`` contiguous chunks of (nearly)
    equal count; every integer timestep in ``[0, num_train_timesteps)`` is then assigned to the
    group whose chunk it falls in, boundaries at the midpoint between neighbouring chunks.
    Returns int64 [num_train_timesteps].
    """
    ts = sorted({int(t) for t in torch.as_tensor(kept_timesteps).flatten().tolist()})
    if len(ts) < num_groups:
        raise ValueError(
            f"{len(ts)} distinct calibration timesteps cannot form {num_groups} groups: "
            f"collect more steps or lower num_groups"
        )
    chunks = [c.tolist() for c in torch.tensor(ts).tensor_split(num_groups)]
    bounds = [(chunks[i][-1] + chunks[i + 1][0]) / 2 for i in range(num_groups - 1)]
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    return torch.bucketize(t, torch.tensor(bounds, dtype=torch.float64), right=True).to(torch.int64)


def group_of(timestep: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Map timesteps (any shape, int or float) to group indices with ``table`` (no host sync)."""
    t = torch.as_tensor(timestep, device=table.device)
    if t.is_floating_point():
        t = torch.round(t)
    t = t.to(torch.int64).clamp_(0, table.numel() - 1)
    return table[t]


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
