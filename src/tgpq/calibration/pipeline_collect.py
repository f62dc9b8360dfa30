"""Calibration data recorded from a diffusers pipeline's own sampling runs, through a hook on its UNet.

``collect_from_pipeline(pipe, ...)`` runs ``pipe(...)`` (its scheduler, its conditioning, its
classifier-free guidance) from seeded generators and records, with a forward pre-hook on ``pipe.unet``,
exactly what the UNet is called with: the sample (the scheduler's ``scale_model_input`` already
applied), the timestep, and every per-sample keyword argument (``encoder_hidden_states``,
``added_cond_kwargs = {"text_embeds", "time_ids"}`` for SDXL, ``class_labels``, ``timestep_cond``, ...).

* One pipeline run samples ``batch_size`` trajectories; the UNet is called once per scheduler step with
  every row at one timestep. With classifier-free guidance a call holds the unconditional and the
  conditional half of the batch (``2 * batch_size`` rows, one timestep): both halves are recorded, every
  row one calibration sample tagged with the call's timestep, so a call never mixes timestep groups.
* Calls ``0, interval, 2 * interval, ...`` of a run are kept (``default_interval``: about 20 kept calls).
  The first run goes to the end and counts the calls; later runs stop at their last kept call (nothing
  after it, the VAE decode included, is computed).
* Trajectory ``j`` draws its noise from ``torch.Generator().manual_seed(seed + j)`` (validation:
  ``seed + 1_000_003 + j``) and takes prompt ``j % len(prompts)`` (and row ``j % K`` of each per-prompt
  tensor such as ``prompt_embeds``), so the record does not depend on ``batch_size``.
* Float timesteps (Euler-style schedulers) are stored rounded (``tgpq.nn.routing.timestep_index``), as
  the converted model routes them.
* The validation set (``num_val_trajectories`` further trajectories from other seeds) keeps the same calls,
  so it has the same count of samples at every kept timestep.

``UNetSampler`` is the smallest such pipeline for a bare UNet and a scheduler (any diffusers scheduler; a
learned-variance UNet steps on its epsilon half), so a bare UNet is collected the same way.
"""
from __future__ import annotations

import copy
import inspect
import math

import torch
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..nn.routing import timestep_index
from .collect import CalibrationSet, default_interval, scheduler_model_output

#: Per-prompt pipeline arguments: trajectory ``j`` takes element / row ``j % len`` of each.
PER_PROMPT_ARGS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "prompt_embeds",
                   "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                   "encoder_hidden_states", "class_labels")
VAL_SEED_OFFSET = 1_000_003


class _StopRun(Exception):
    """Raised by the hook once a run's last kept call is recorded."""


class UNetSampler:
    """A minimal diffusers-style pipeline around a bare UNet and a scheduler (no conditioning model).

    ``sampler(batch_size, num_inference_steps, generator, encoder_hidden_states=None, class_labels=None)``
    runs the standard loop (noise times ``init_noise_sigma``; per timestep ``scale_model_input``, the UNet,
    ``scheduler.step``) and returns the final samples, float ``[batch_size, C, H, W]``. ``generator`` is one
    ``torch.Generator`` or a list of one per sample. The scheduler is copied, never modified.
    """

    def __init__(self, unet, scheduler):
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
        self.unet = unet
        self.scheduler = scheduler

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50, generator=None,
                 encoder_hidden_states: torch.Tensor | None = None, class_labels: torch.Tensor | None = None):
        unet = self.unet
        cfg = unet.config
        size = (cfg.sample_size,) * 2 if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        param = next(unet.parameters())
        gens = generator if isinstance(generator, list) else [generator] * batch_size
        if len(gens) != batch_size:
            raise ValueError(f"{len(gens)} generators for a batch of {batch_size}")
        x = torch.stack([torch.randn((cfg.in_channels, *size), generator=g) for g in gens]).to(param.device)
        kw = {}
        if encoder_hidden_states is not None:
            kw["encoder_hidden_states"] = encoder_hidden_states.to(param.device, param.dtype)
        if class_labels is not None:
            kw["class_labels"] = class_labels.to(param.device)
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(num_inference_steps)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            model_in = sched.scale_model_input(x, t)
            out = unet(model_in.to(param.dtype), t, **kw, return_dict=False)[0]
            x = sched.step(scheduler_model_output(sched, out, x).float(), t, x).prev_sample
        return x


def _call_parameters(pipe) -> set:
    params = inspect.signature(pipe.__call__).parameters
    return set(params)


def _rows(value, idx: list[int]):
    """Elements ``idx`` (taken modulo the length) of a per-prompt argument (a string, a list or a tensor)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * len(idx)
    n = len(value)
    picked = [i % n for i in idx]
    if isinstance(value, torch.Tensor):
        return value[torch.tensor(picked)]
    return [value[i] for i in picked]


def _bind_unet_call(unet, args, kwargs) -> dict:
    """The UNet call's arguments by name (positional ones named after the forward's signature)."""
    sig = inspect.signature(type(unet).forward)
    try:
        bound = sig.bind(unet, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"cannot read the UNet call's arguments ({e})") from None
    named = dict(bound.arguments)
    named.pop(next(iter(sig.parameters)))  # self
    for name, p in sig.parameters.items():  # **kwargs of the forward: flatten
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


class _Recorder:
    """The forward pre-hook: per kept call, the sample, the timestep and the per-sample keyword arguments."""

    IGNORED = ("sample", "timestep", "return_dict")

    def __init__(self, unet, storage_device):
        self.unet = unet
        self.storage_device = storage_device
        self.keep: set | None = None  # None: record every call (first run)
        self.stop_at: int | None = None
        self.call = 0
        self.records: list[tuple[int, torch.Tensor, torch.Tensor, object]] = []  # (call, x, t, cond pytree)
        self.treedef = None

    def start_run(self):
        self.call = 0

    def _condition(self, named: dict, batch: int):
        cond = {}
        for name, value in named.items():
            if name in self.IGNORED or value is None:
                continue
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if v is not None}
                if not value:
                    continue
            leaves = pytree.tree_leaves(value)
            for leaf in leaves:
                if not (isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch):
                    what = (f"a tensor of shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor)
                            else f"{type(leaf).__name__} {leaf!r}")
                    raise ValueError(
                        f"the UNet is called with {name}={what}: tgpq records per-sample tensors only (first "
                        f"dimension = the batch of {batch}), so it cannot calibrate with this argument")
            cond[name] = value
        return cond

    def __call__(self, module, args, kwargs):
        i = self.call
        self.call += 1
        if self.keep is not None and i not in self.keep:
            return None
        named = _bind_unet_call(module, args, kwargs)
        x = named.get("sample")
        t = named.get("timestep")
        if not isinstance(x, torch.Tensor) or t is None:
            raise TypeError("the UNet was called without a sample tensor or a timestep")
        b = x.shape[0]
        ti = timestep_index(torch.as_tensor(t).detach().cpu()).reshape(-1)
        if ti.numel() == 1:
            ti = ti.expand(b)
        elif ti.numel() != b:
            raise ValueError(f"the UNet was called with {ti.numel()} timesteps for a batch of {b}")
        cond = self._condition(named, b)
        store = self.storage_device

        def keep_tensor(v):
            v = v.detach().to(store)
            return v.float() if v.is_floating_point() else v

        cond = pytree.tree_map(keep_tensor, cond) if cond else None
        treedef = pytree.tree_structure(cond)
        if self.treedef is None:
            self.treedef = treedef
        elif treedef != self.treedef:
            raise ValueError("the pipeline called its UNet with different arguments from one call to the next: "
                             f"{self.treedef} then {treedef}")
        self.records.append((i, x.detach().to(store, torch.float32), ti.to(store, torch.int64).clone(), cond))
        if self.stop_at is not None and i >= self.stop_at:
            raise _StopRun
        return None


def _stack(records):
    x = torch.cat([r[1] for r in records])
    t = torch.cat([r[2] for r in records])
    conds = [r[3] for r in records]
    if conds[0] is None:
        return x, t, None
    cond = pytree.tree_map(lambda *leaves: torch.cat(leaves), conds[0], *conds[1:])
    return x, t, cond


def needed_val_trajectories(num_kept_timesteps: int, rows_per_call: int, num_groups: int,
                            min_per_group: int) -> int:
    """Validation trajectories that give every timestep group at least ``min_per_group`` samples.

    ``calibrate`` cuts the distinct kept timesteps into ``num_groups`` contiguous chunks of nearly equal count
    (one group per timestep when there are fewer), so the smallest group holds
    ``max(1, num_kept_timesteps // num_groups)`` timesteps, each with ``rows_per_call`` samples a trajectory.
    """
    per_traj = rows_per_call * max(1, num_kept_timesteps // max(1, num_groups))
    return max(1, math.ceil(min_per_group / per_traj))


def collect_from_pipeline(pipe, num_trajectories: int, num_inference_steps: int = 50, *, interval: int | None = None,
                          guidance_scale: float | None = None, prompts=None, negative_prompts=None,
                          prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                          num_val_trajectories: int | None = None, val_fraction: float = 0.05, num_groups: int = 5,
                          min_val_per_group: int = 8, seed: int = 0, batch_size: int = 4,
                          storage_device: str | torch.device = "cpu", progress: bool = True,
                          **pipeline_kwargs) -> CalibrationSet:
    """Record the UNet inputs of ``num_trajectories`` runs of ``pipe`` (module docstring).

    * ``pipe``: a diffusers pipeline with a ``unet`` (``DDIMPipeline``, ``DDPMPipeline``,
      ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ...) or a ``UNetSampler``; it samples with its
      own scheduler (DDIM, DDPM, PNDM, Euler, DPM-Solver++, ...). Its UNet is not modified; its scheduler's
      state is whatever the last run leaves, as after any pipeline call.
    * Text pipelines need ``prompts`` (strings) or ``prompt_embeds`` ``[K, L, D]`` (SDXL also
      ``pooled_prompt_embeds=`` ``[K, P]``); negatives likewise (``negative_prompts`` /
      ``negative_prompt_embeds``, ``negative_pooled_prompt_embeds=``). ``guidance_scale`` > 1 runs
      classifier-free guidance, so the UNet sees unconditional and conditional rows.
    * ``**pipeline_kwargs`` go to every ``pipe(...)`` call (``height``, ``width``, ``eta``, ...); per-prompt
      ones (``PER_PROMPT_ARGS``) are cycled over the trajectories like ``prompts``.
    * Validation: ``num_val_trajectories`` (default: the larger of ``round(val_fraction * num_trajectories)``
      and what gives every one of ``num_groups`` timestep groups ``min_val_per_group`` samples,
      ``needed_val_trajectories``); 0 for none.
    Returns a ``CalibrationSet`` whose condition, when the UNet gets one, is a dict of its keyword arguments
    (``cond_kind == "kwargs"``), every tensor float32 (integers kept) on ``storage_device``.
    """
    if num_trajectories < 1:
        raise ValueError(f"num_trajectories={num_trajectories}: need at least one trajectory")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be positive")
    interval = default_interval(num_inference_steps) if interval is None else interval
    if interval < 1:
        raise ValueError(f"interval={interval} must be positive")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if num_val_trajectories is not None and num_val_trajectories < 0:
        raise ValueError(f"num_val_trajectories={num_val_trajectories} must be >= 0")
    if not (0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, torch.nn.Module) or not callable(pipe):
        raise TypeError(f"expected a diffusers pipeline with a UNet (pipe.unet), got {type(pipe).__name__}")
    if getattr(unet, "tgpq_router", None) is not None:
        raise ValueError("the pipeline's UNet is already quantized: collect calibration data with the float UNet")

    accepted = _call_parameters(pipe)
    per_prompt = {k: v for k, v in pipeline_kwargs.items() if k in PER_PROMPT_ARGS}
    fixed = {k: v for k, v in pipeline_kwargs.items() if k not in PER_PROMPT_ARGS}
    if prompts is not None:
        per_prompt["prompt"] = prompts
    if negative_prompts is not None:
        per_prompt["negative_prompt"] = negative_prompts
    if prompt_embeds is not None:
        per_prompt["prompt_embeds"] = prompt_embeds
    if negative_prompt_embeds is not None:
        per_prompt["negative_prompt_embeds"] = negative_prompt_embeds
    if guidance_scale is not None:
        fixed["guidance_scale"] = guidance_scale
    for name, value in per_prompt.items():
        if isinstance(value, (list, tuple, torch.Tensor)) and len(value) == 0:
            raise ValueError(f"{name} is empty")
        if isinstance(value, (list, tuple)) and not all(isinstance(p, str) for p in value):
            raise TypeError(f"{name} must be a string or a list of strings")
    unknown = sorted(k for k in [*per_prompt, *fixed] if k not in accepted)
    if unknown:
        raise ValueError(f"{type(pipe).__name__} does not take {unknown} (it takes {sorted(accepted)})")
    text = "prompt" in accepted
    if text and "prompt" not in per_prompt and "prompt_embeds" not in per_prompt:
        raise ValueError(f"{type(pipe).__name__} is a text-to-image pipeline: pass prompts=[...] or prompt_embeds=")
    if "output_type" in accepted and "output_type" not in fixed and hasattr(pipe, "vae"):
        fixed["output_type"] = "latent"  # latent pipelines: no decode in the first run

    recorder = _Recorder(unet, storage_device)
    rows_per_call: list[int] = []

    def run(first: int, n: int, seed0: int, desc: str) -> list:
        recorder.records = []
        bar = tqdm(total=n, desc=desc, disable=not progress, leave=False)
        for start in range(first, first + n, batch_size):
            idx = list(range(start - first, min(start - first + batch_size, n)))
            kw = dict(fixed)
            kw["num_inference_steps"] = num_inference_steps
            kw["generator"] = [torch.Generator().manual_seed(seed0 + j) for j in idx]
            for name, value in per_prompt.items():
                kw[name] = _rows(value, idx)
            if not text and "batch_size" in accepted:
                kw["batch_size"] = len(idx)
            elif text and "num_images_per_prompt" in accepted:
                kw["num_images_per_prompt"] = 1
            before = len(recorder.records)
            recorder.start_run()
            try:
                pipe(**kw)
            except _StopRun:
                pass
            if recorder.keep is None:  # first run: every call recorded; keep every interval-th
                total = recorder.call
                if total == 0:
                    raise RuntimeError(f"{type(pipe).__name__} never called its UNet")
                recorder.keep = set(range(0, total, interval))
                recorder.stop_at = max(recorder.keep)
                recorder.records = [r for r in recorder.records if r[0] in recorder.keep]
                rows_per_call.append(int(recorder.records[0][1].shape[0]) // len(idx))
            got = sorted(r[0] for r in recorder.records[before:])
            if got != sorted(recorder.keep):
                raise RuntimeError(f"{type(pipe).__name__} made {len(got)} of the {len(recorder.keep)} expected "
                                   f"UNet calls: its runs differ in length")
            bar.update(len(idx))
        bar.close()
        return list(recorder.records)

    was_training = unet.training
    unet.eval()
    bar_config = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    handle = unet.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        with torch.no_grad():
            train = run(0, num_trajectories, seed, "calibration runs")
            kept_calls = sorted(recorder.keep)
            x, t, cond = _stack(train)
            distinct = torch.unique(t)
            if num_val_trajectories is None:
                n_val = max(round(val_fraction * num_trajectories),
                            needed_val_trajectories(int(distinct.numel()), rows_per_call[0], num_groups,
                                                    min_val_per_group)) if val_fraction > 0 else 0
            else:
                n_val = num_val_trajectories
            if n_val:
                vx, vt, vcond = _stack(run(0, n_val, seed + VAL_SEED_OFFSET, "validation runs"))
            else:
                vx, vt = x.new_zeros((0, *x.shape[1:])), t.new_zeros((0,))
                vcond = None if cond is None else pytree.tree_map(lambda c: c[:0], cond)
    finally:
        handle.remove()
        unet.train(was_training)
        if bar_config is not None:
            pipe._progress_bar_config = bar_config
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config
    kept = []
    for r in train:  # distinct kept timesteps in call order
        if r[0] in kept_calls and int(r[2][0]) not in kept:
            kept.append(int(r[2][0]))
    return CalibrationSet(x=x, t=t, val_x=vx, val_t=vt, kept_timesteps=torch.tensor(kept, dtype=torch.int64),
                          cond=cond, val_cond=vcond, cond_kind=None if cond is None else "kwargs")


__all__ = ["collect_from_pipeline", "UNetSampler", "needed_val_trajectories", "PER_PROMPT_ARGS"]
