"""Timestep routing: which activation scale group serves a diffusion timestep, and the router that
tells every quantized layer of a converted model.

A *scale group* is a contiguous range of diffusion timesteps that shares one activation step size per
quantized layer. The mapping is a lookup table ``timestep_to_group`` of shape ``[num_train_timesteps]``
(int64), kept on the model's device (``uniform_timestep_groups``, ``timestep_groups_from_calibration``).
Timesteps are mapped the same way everywhere (``timestep_index``): integers as they are, float
timesteps (Euler-style schedulers) rounded half to even; outside ``[0, num_train_timesteps)`` they
are refused, never clamped.

The converted UNet owns one ``TimestepRouter`` (a submodule named ``tgpq_router``) and a forward
(``routed_forward``) that routes the call's timestep and runs the diffusers forward as one step: in
eager mode under the router's lock, so concurrent calls from several threads each compute with
their own group (they run one at a time); under ``torch.compile`` the group flows through the
traced graph. Routing writes ``router.group_index`` (int64 ``[1]``, on the model's device, no host
sync on CUDA), which every quantized layer reads.

A batch mixing timesteps of different groups, or a timestep out of range, is rejected: with a
``ValueError`` for CPU tensors in eager mode, with ``torch._assert_async`` on CUDA and under compile.
"""
from __future__ import annotations

import threading

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


def timestep_index(timestep) -> torch.Tensor:
    """Integer timesteps (int64, any shape) of ``timestep``: integers as they are, floats rounded half to
    even. The one mapping of float timesteps (calibration, routing, simulation)."""
    t = torch.as_tensor(timestep)
    return (torch.round(t) if t.is_floating_point() else t).to(torch.int64)


def check_timesteps(t: torch.Tensor, num_train_timesteps: int) -> None:
    """Raise ``ValueError`` when an integer timestep lies outside ``[0, num_train_timesteps)`` (host check)."""
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_train_timesteps):
        raise ValueError(f"timesteps {sorted(set(t.flatten().tolist()))[:8]} lie outside [0, "
                         f"{num_train_timesteps}) (num_train_timesteps of the quantization config)")


def group_of(timestep: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Map timesteps (any shape, int or float; ``timestep_index``) to group indices with ``table`` (no host
    sync). Out-of-range timesteps are clamped here: callers check them first (``check_timesteps``)."""
    t = timestep_index(torch.as_tensor(timestep, device=table.device))
    return table[t.clamp(0, table.numel() - 1)]


class TimestepRouter(nn.Module):
    """The converted model's timestep -> scale-group table and the current group (``group_index``)."""

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
        self.lock = threading.RLock()

    def __getstate__(self):  # copy / deepcopy / pickle: a lock is not state
        state = self.__dict__.copy()
        state.pop("lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.lock = threading.RLock()

    def route(self, timestep) -> None:
        """Set ``group_index`` from a timestep (python number, 0-d or 1-d tensor); see the module docstring
        for what is refused."""
        table = self.timestep_to_group
        t = timestep_index(torch.as_tensor(timestep, device=table.device)).reshape(-1)
        if t.numel() == 0:
            raise ValueError("empty timestep tensor")
        n = table.numel()
        if t.device.type == "cpu" and not torch.compiler.is_compiling():
            check_timesteps(t, n)
            g = table[t]
            if g.numel() > 1 and not bool((g == g[0]).all()):
                raise ValueError(
                    "a batch mixes timesteps from different scale groups "
                    f"({sorted(set(t.tolist()))[:8]}...); tgpq quantizes a batch with one "
                    "activation scale per layer: call the model once per timestep")
        else:
            torch._assert_async(((t >= 0) & (t < n)).all(), "tgpq: a timestep lies outside [0, num_train_timesteps)")
            g = table[t.clamp(0, n - 1)]
            torch._assert_async((g == g[0]).all(), "tgpq: a batch mixes timesteps from different scale groups")
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


def routed_forward(self, *args, **kwargs):
    """The forward of a converted UNet (installed on the instance by ``tgpq.unet.convert``): routes the
    call's timestep, then runs the model class's own forward, as one step (see the module docstring).
    It is the instance's ``forward``, so ``model(x, t)`` and ``model.forward(x, t)`` both route."""
    router = self.tgpq_router
    timestep = timestep_from_call(args, kwargs)
    if torch.compiler.is_compiling():
        router.route(timestep)
        return type(self).forward(self, *args, **kwargs)
    with router.lock:
        router.route(timestep)
        return type(self).forward(self, *args, **kwargs)
