"""Timestep -> scale-group routing.

A *scale group* is a contiguous range of diffusion timesteps that shares one activation step size
per quantized layer. The mapping is a lookup table ``timestep_to_group`` of shape
``[num_train_timesteps]`` (int64), kept on the model's device.
"""
from __future__ import annotations

import torch


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
