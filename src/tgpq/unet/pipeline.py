"""``quantize``: a whole diffusers pipeline (or a bare UNet with its scheduler) in one call.

``quantize(pipe, config, prompts=..., guidance_scale=..., num_inference_steps=..., num_trajectories=...)``:

1. collects calibration samples by running the pipeline itself, with its own scheduler and conditioning
   and classifier-free guidance, recording every UNet call through a hook
   (``tgpq.calibration.pipeline_collect.collect_from_pipeline``);
2. calibrates the pipeline's float UNet on them (``tgpq.calibrate``);
3. converts it (``tgpq.convert``) and returns the pipeline with its UNet replaced: a new pipeline object
   of the same class sharing every other component (its scheduler copied), or ``pipe`` itself with
   ``inplace=True``. It samples as before: ``qpipe(prompt, ...)``.

A bare UNet (``UNet2DModel`` / ``UNet2DConditionModel``) with ``scheduler=`` is sampled by
``UNetSampler`` (conditioning ``encoder_hidden_states=`` / ``class_labels=`` rows, cycled over the
trajectories) and the converted UNet is returned. ``collect_calibration`` + ``calibrate`` + ``convert``
stay the lower-level API.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from ..calibration import calibrate
from ..calibration.pipeline_collect import UNetSampler, collect_from_pipeline
from ..recipe import QuantConfig
from .convert import convert


def is_pipeline(obj) -> bool:
    """True for a diffusers pipeline holding a UNet (``pipe.unet`` and ``pipe.components``)."""
    return isinstance(getattr(obj, "unet", None), nn.Module) and hasattr(obj, "components") and callable(obj)


def replace_unet(pipe, unet, inplace: bool = False):
    """``pipe`` with ``unet`` as its UNet: ``pipe`` itself (``inplace``) or a new pipeline of the same class
    sharing every other component (the scheduler copied, since a scheduler holds sampling state)."""
    if inplace:
        pipe.unet = unet
        return pipe
    comps = dict(pipe.components)
    comps["unet"] = unet
    if comps.get("scheduler") is not None:
        comps["scheduler"] = copy.deepcopy(comps["scheduler"])
    params = inspect.signature(type(pipe).__init__).parameters
    for name in params:  # init arguments kept in the config (e.g. requires_safety_checker)
        if name not in comps and name != "self" and name in pipe.config:
            comps[name] = pipe.config[name]
    comps = {k: v for k, v in comps.items() if k in params}
    new = type(pipe)(**comps)
    if hasattr(pipe, "_progress_bar_config"):
        new._progress_bar_config = dict(pipe._progress_bar_config)
    return new


def quantize(model, config: QuantConfig | None = None, *, prompts=None, negative_prompts=None,
             prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
             num_inference_steps: int = 50, guidance_scale: float | None = None, num_trajectories: int = 16,
             num_val_trajectories: int | None = None, interval: int | None = None, seed: int = 0,
             batch_size: int = 4, scheduler=None, encoder_hidden_states: torch.Tensor | None = None,
             class_labels: torch.Tensor | None = None, backend: str = "auto", inplace: bool = False,
             checkpoint_path=None, progress: bool = True, **pipeline_kwargs):
    """Calibrate and convert the UNet of a diffusers pipeline (or a bare UNet) in one call.

    * ``model``: a diffusers pipeline with a ``unet`` (``DDIMPipeline``, ``DDPMPipeline``,
      ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ...), sampled with its own scheduler; or a
      bare ``UNet2DModel`` / ``UNet2DConditionModel`` with ``scheduler=`` (any diffusers scheduler) and
      optionally ``encoder_hidden_states=`` ``[K, L, D]`` / ``class_labels=`` ``[K]`` (trajectory ``j`` takes
      row ``j % K``).
    * ``config``: the ``QuantConfig`` (default ``QuantConfig()``: W8A8, gac).
    * Text pipelines: ``prompts`` (a list of strings) or ``prompt_embeds`` ``[K, L, D]`` (SDXL also
      ``pooled_prompt_embeds=``), negatives likewise; ``guidance_scale`` > 1 calibrates on the
      classifier-free-guidance batch the pipeline builds. Trajectory ``j`` takes prompt ``j % K``.
    * ``num_inference_steps``, ``num_trajectories``, ``interval`` (keep every ``interval``-th UNet call of a
      run; default about 20 kept calls), ``num_val_trajectories`` (default: for gac, enough for 8 validation
      samples in every timestep group, ``collect_from_pipeline``; none for rtn / uniform), ``seed``, ``batch_size`` (trajectories per
      pipeline call); ``**pipeline_kwargs`` go to every pipeline call (``height``, ``width``, ...).
    * ``backend``, ``inplace`` (convert the UNet in place and put it into ``model``; saves the memory of a
      copy), ``checkpoint_path`` (resume a calibration, ``tgpq.calibrate``), ``progress``.
    Returns the pipeline with its UNet quantized (``model`` itself when ``inplace``), or the converted UNet.
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a tgpq.QuantConfig, got {type(config).__name__}")
    if is_pipeline(model):
        if scheduler is not None or encoder_hidden_states is not None or class_labels is not None:
            raise ValueError("scheduler=, encoder_hidden_states= and class_labels= are for a bare UNet: a pipeline "
                             "samples with its own scheduler and conditioning")
        runner, unet = model, model.unet
    elif isinstance(model, nn.Module) and hasattr(model, "config"):
        if scheduler is None:
            raise ValueError("a bare UNet needs scheduler= (e.g. diffusers.DDIMScheduler(num_train_timesteps=1000))")
        if prompts is not None or prompt_embeds is not None or guidance_scale is not None:
            raise ValueError("prompts, prompt_embeds and guidance_scale need a pipeline; a bare UNet takes "
                             "encoder_hidden_states= or class_labels=")
        runner, unet = UNetSampler(model, scheduler), model
        if encoder_hidden_states is not None:
            pipeline_kwargs["encoder_hidden_states"] = encoder_hidden_states
        if class_labels is not None:
            pipeline_kwargs["class_labels"] = class_labels
    else:
        raise TypeError(f"quantize expects a diffusers pipeline with a UNet or a diffusers UNet, "
                        f"got {type(model).__name__}")
    if getattr(unet, "tgpq_router", None) is not None:
        raise ValueError("this UNet is already quantized")
    if num_val_trajectories is None and config.method != "gac":
        num_val_trajectories = 0  # only gac reads a validation set
    calib = collect_from_pipeline(
        runner, num_trajectories, num_inference_steps, interval=interval, guidance_scale=guidance_scale,
        prompts=prompts, negative_prompts=negative_prompts, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, num_val_trajectories=num_val_trajectories,
        val_fraction=config.val_fraction, num_groups=config.num_groups, seed=seed, batch_size=batch_size,
        progress=progress, **pipeline_kwargs)
    qstate = calibrate(unet, calib, config, checkpoint_path=checkpoint_path, progress=progress)
    del calib
    qunet = convert(unet, qstate, backend=backend, inplace=inplace)
    if is_pipeline(model):
        return replace_unet(model, qunet, inplace=inplace)
    return qunet


__all__ = ["quantize", "is_pipeline", "replace_unet"]
