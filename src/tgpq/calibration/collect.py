"""Calibration data: UNet inputs recorded along the full-precision model's DDIM trajectories.

DESIGN.md section 1.1 (TFMQ-DM / Q-Diffusion recipe): run the FP sampler from seeded Gaussian
noise, keep the UNet inputs ``(x_t, t[, condition])`` every ``interval`` steps (the training set
``X_T``), and draw a second, disjoint, timestep-balanced set the same way from other seeds (the
validation set ``X_V``, about ``val_fraction`` of ``X_T``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..nn.routing import timestep_groups_from_calibration, timestep_index

#: ``"kwargs"``: the condition is a dict of UNet keyword arguments (a pytree of per-sample tensors), e.g.
#: SDXL's ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}``.
COND_KINDS = ("class_labels", "encoder_hidden_states", "kwargs")


def condition_rows(cond, idx, device=None, dtype=None):
    """Rows ``idx`` of a condition (a tensor or a pytree of tensors whose first dimension is the sample),
    moved to ``device``; floating tensors cast to ``dtype`` when given. None stays None."""
    if cond is None:
        return None

    def rows(c):
        c = c[idx]
        return c.to(device=device, dtype=dtype if (dtype is not None and c.is_floating_point()) else None)

    return pytree.tree_map(rows, cond)


def condition_kwargs(cond, cond_kind: str | None) -> dict:
    """The UNet keyword arguments that pass ``cond`` (rows of a ``CalibrationSet`` condition)."""
    if cond is None or cond_kind is None:
        return {}
    if cond_kind == "kwargs":
        return dict(cond)
    return {cond_kind: cond}


@dataclass
class CalibrationSet:
    """UNet inputs recorded along DDIM trajectories of the full-precision model.

    Shapes (``N`` training samples, ``M`` validation samples, ``[C, H, W]`` the UNet sample shape):

    * ``x``: float32 ``[N, C, H, W]``, the noisy samples ``x_t`` fed to the UNet.
    * ``t``: int64 ``[N]``, the timestep of each sample (``0 <= t < num_train_timesteps``).
    * ``cond``: the condition of each sample or None: int64 ``[N]`` class labels when
      ``cond_kind == "class_labels"``, float ``[N, L, D]`` when ``cond_kind == "encoder_hidden_states"``,
      and when ``cond_kind == "kwargs"`` a dict of UNet keyword arguments whose values are tensors or
      dicts of tensors, every tensor with the sample as its first dimension (``[N, ...]``), e.g.
      ``{"encoder_hidden_states": [N, L, D], "added_cond_kwargs": {"text_embeds": [N, P], "time_ids": [N, 6]}}``.
    * ``val_x`` float32 ``[M, C, H, W]``, ``val_t`` int64 ``[M]``, ``val_cond`` (like ``cond``):
      the validation set, from seeds disjoint from the training trajectories, with the same
      count of samples at every kept timestep.
    * ``kept_timesteps``: int64 ``[S]``, the distinct kept timesteps, in sampling order (descending).

    Samples are ordered trajectory-batch by trajectory-batch and, inside a batch, step by step.
    """

    x: torch.Tensor
    t: torch.Tensor
    val_x: torch.Tensor
    val_t: torch.Tensor
    kept_timesteps: torch.Tensor
    cond: torch.Tensor | None = None
    val_cond: torch.Tensor | None = None
    cond_kind: str | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def cond_kwargs(self, cond: torch.Tensor | None) -> dict:
        """The keyword arguments that pass ``cond`` (rows of ``cond``/``val_cond``) to the UNet."""
        return condition_kwargs(cond, self.cond_kind)


def scheduler_model_output(scheduler, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """What ``scheduler.step`` takes from a UNet output: a learned-variance UNet (``2 * C`` output channels for a
    ``C``-channel sample) gives its epsilon half ``[:, :C]``, unless the scheduler learns the variance itself
    (``variance_type`` ``"learned"`` / ``"learned_range"``, e.g. DDPM), which takes the whole output."""
    c = sample.shape[1]
    learned = getattr(scheduler, "config", {}).get("variance_type") in ("learned", "learned_range")
    if model_output.shape[1] == 2 * c and not learned:
        return model_output[:, :c]
    return model_output


def _seeded_noise(n: int, shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g, dtype=torch.float32)


def _check_cond(name: str, cond: torch.Tensor | None) -> None:
    if cond is None:
        return
    if not isinstance(cond, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(cond).__name__}")
    if cond.shape[0] < 1:
        raise ValueError(f"{name} is empty")


def _cycle(cond: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Row ``j`` of the result is row ``j % len(cond)`` of ``cond``."""
    if cond is None:
        return None
    idx = torch.arange(n) % cond.shape[0]
    return cond[idx]


@torch.no_grad()
def _run_trajectories(unet, scheduler, noise, cond, cond_kind, num_steps, interval, batch_size,
                      storage_device, desc, progress):
    """DDIM-sample from ``noise`` [n, C, H, W]; return the kept inputs and their timesteps."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_steps)
    timesteps = sched.timesteps
    keep = [i for i in range(len(timesteps)) if i % interval == 0]
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    xs, ts, cs = [], [], []
    n = noise.shape[0]
    bar = tqdm(total=math.ceil(n / batch_size) * len(timesteps), desc=desc, disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        x = noise[start:start + batch_size].to(device)
        c = None if cond is None else cond[start:start + batch_size].to(device)
        kw = {} if c is None else {cond_kind: c}
        x = x * sched.init_noise_sigma
        for i, t in enumerate(timesteps):
            model_in = sched.scale_model_input(x, t)
            if i in keep:
                xs.append(model_in.to(storage_device, torch.float32))
                ts.append(torch.full((x.shape[0],), int(timestep_index(t)), dtype=torch.int64, device=storage_device))
                if c is not None:
                    cs.append(c.to(storage_device))
            eps = unet(model_in.to(dtype), t, **kw, return_dict=False)[0]
            x = sched.step(scheduler_model_output(sched, eps, x).float(), t, x).prev_sample
            bar.update(1)
    bar.close()
    kept = torch.tensor([int(timestep_index(timesteps[i])) for i in keep], dtype=torch.int64)
    return torch.cat(xs), torch.cat(ts), (torch.cat(cs) if cs else None), kept


def default_interval(num_steps: int) -> int:
    """Keep about 20 steps of a trajectory (TFMQ-DM / Q-Diffusion: every 5th of 100)."""
    return max(1, round(num_steps / 20))


def validation_trajectories(num_trajectories: int, val_fraction: float, kept_timesteps: torch.Tensor,
                            num_groups: int, min_val_per_group: int, num_train_timesteps: int = 1000) -> int:
    """How many validation trajectories ``collect_calibration`` draws (see its docstring)."""
    if val_fraction <= 0:
        return 0
    n = max(1, round(val_fraction * num_trajectories))
    kept = torch.unique(kept_timesteps)
    if kept.numel() >= num_groups:
        table = timestep_groups_from_calibration(kept, num_groups, max(num_train_timesteps, int(kept.max()) + 1))
        per_group = torch.bincount(table[kept], minlength=num_groups)
        n = max(n, math.ceil(min_val_per_group / int(per_group.min())))
    return n


def collect_calibration(unet, scheduler, num_trajectories: int, num_steps: int = 100, interval: int | None = None,
                        val_fraction: float = 0.05, seed: int = 0, batch_size: int = 64,
                        storage_device: str | torch.device = "cpu", class_labels: torch.Tensor | None = None,
                        encoder_hidden_states: torch.Tensor | None = None, progress: bool = True,
                        num_groups: int = 5, min_val_per_group: int = 8) -> CalibrationSet:
    """Record UNet inputs along ``num_trajectories`` DDIM trajectories of the FP model.

    * ``scheduler``: a diffusers scheduler with ``set_timesteps`` / ``step`` (DDIM expected); it is
      copied, not modified.
    * Trajectory ``j`` starts from noise drawn with seed ``seed`` (training) or ``seed + 1_000_003``
      (validation); every ``interval``-th of the ``num_steps`` steps (starting with the first) is kept
      (default ``default_interval(num_steps)``: about 20 kept steps, 5 for 100 steps as in the paper).
    * Validation (none when ``val_fraction == 0``): ``max(round(val_fraction * num_trajectories), m)``
      further trajectories, so every kept timestep has the same count there. ``m`` is the fewest
      trajectories that give every one of ``num_groups`` timestep groups (``QuantConfig.num_groups``,
      built as ``calibrate`` builds them) at least ``min_val_per_group`` validation samples (our
      choice: 8, so that gac's per-group validation losses are not noise). At the paper's scale
      (256 trajectories, 20 kept steps) ``val_fraction`` decides (13 trajectories, 52 per group); at
      16 trajectories of 100 steps the minimum does (2 trajectories: 8 per group, 12.5 % of ``X_T``).
    * ``class_labels`` int64 ``[K]`` or ``encoder_hidden_states`` ``[K, L, D]`` (at most one):
      trajectory ``j`` is conditioned on row ``j % K`` (validation trajectories likewise).
    * Inputs are stored once per kept step on ``storage_device`` (float32).
    """
    if num_trajectories < 1:
        raise ValueError(f"num_trajectories={num_trajectories}: need at least one trajectory")
    interval = default_interval(num_steps) if interval is None else interval
    if num_steps < 1 or interval < 1:
        raise ValueError(f"num_steps={num_steps} and interval={interval} must be positive")
    if not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be at least 1")
    if min_val_per_group < 0:
        raise ValueError(f"min_val_per_group={min_val_per_group} must be >= 0")
    if class_labels is not None and encoder_hidden_states is not None:
        raise ValueError("pass class_labels or encoder_hidden_states, not both")
    _check_cond("class_labels", class_labels)
    _check_cond("encoder_hidden_states", encoder_hidden_states)
    cond_kind, cond = None, None
    if class_labels is not None:
        cond_kind, cond = "class_labels", class_labels.to(torch.int64)
    elif encoder_hidden_states is not None:
        cond_kind, cond = "encoder_hidden_states", encoder_hidden_states

    cfg = unet.config
    shape = (cfg.in_channels, *((cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else cfg.sample_size))
    was_training = unet.training
    unet.eval()
    try:
        x, t, c, kept = _run_trajectories(
            unet, scheduler, _seeded_noise(num_trajectories, shape, seed), _cycle(cond, num_trajectories),
            cond_kind, num_steps, interval, batch_size, storage_device, "calibration trajectories", progress)
        n_val = validation_trajectories(num_trajectories, val_fraction, kept, num_groups, min_val_per_group,
                                        int(getattr(scheduler.config, "num_train_timesteps", 1000)))
        if n_val:
            vx, vt, vc, _ = _run_trajectories(
                unet, scheduler, _seeded_noise(n_val, shape, seed + 1_000_003), _cycle(cond, n_val), cond_kind,
                num_steps, interval, batch_size, storage_device, "validation trajectories", progress)
        else:
            vx = x.new_zeros((0, *shape))
            vt = t.new_zeros((0,))
            vc = None
    finally:
        unet.train(was_training)
    return CalibrationSet(x=x, t=t, cond=c, val_x=vx, val_t=vt, val_cond=vc, kept_timesteps=kept,
                          cond_kind=cond_kind)
