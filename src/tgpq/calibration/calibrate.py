"""``calibrate(unet, calib, config) -> QuantState``: rtn, uniform and gac on one code path.

For every reconstruction unit (``blocks.find_units``), in the UNet's execution order:

1. record the unit's inputs and FP outputs on the training set (and the validation set for gac)
   and, per timestep group, the EMA running min/max of every quantized layer's input
   (``capture.capture_unit``). ``config.block_inputs == "quantized"`` (default): inputs from a float
   copy in which every finished block is fake-quantized (``simulate.install_fake_quant``), so a
   block is fitted to the error it will receive; targets stay the float model's outputs.
   ``"fp"``: inputs from the float model, blocks independent. Both resume block by block;
2. wrap the unit's layers in ``QuantLayer`` (weight scale: MSE clipping search; act step per group
   from the EMA range) and measure the block output MSE with round-to-nearest: ``block_mse["rtn"]``;
3. ``rtn`` stops here. ``uniform`` / ``gac``: reconstruction (``reconstruct.reconstruct_block``) with
   the weights ``w = softmax(s / tau)``, then AdaRound's hard rounding: ``block_mse["final"]``. For gac
   a ``gac.SampleWeighter`` refreshes ``s`` every ``weight_update_every`` AdaRound iterations from
   the block's current rounding (the validation set's inputs are recorded too); its per-refresh
   records go to ``qstate.meta["gac"][block]`` and the final weights to ``qstate.sample_weights``.
   ``uniform`` is exactly this path with ``s`` frozen at zero (same mini-batches: the refreshes draw
   no random numbers).

The time-embedding MLP, ``conv_in`` and ``conv_out`` stay in float by default (``config.exclude``).
Every block starts from uniform weights unless ``config.weights_carry_over`` (then the logits of
the previous block are the start).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import numerics
from ..nn.routing import group_of, timestep_groups_from_calibration
from ..recipe import LayerQState, QuantConfig, QuantState, WeightsFingerprint
from .blocks import ReconUnit, check_convertible, find_units
from .capture import ActRangeStats, UnitData, capture_unit, main_output
from .checkpoint import CalibrationCheckpoint
from .collect import CalibrationSet, condition_kwargs, condition_rows
from .fake_quant import GroupContext, QuantLayer, replace_submodule
from .gac import SampleWeighter
from .reconstruct import block_output_mse, reconstruct_block, set_weight_mode
from .simulate import attach_group_router, install_fake_quant


def _check_calibration_set(calib: CalibrationSet, config: QuantConfig) -> None:
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a CalibrationSet (from collect_calibration), got {type(calib).__name__}")
    if len(calib) == 0:
        raise ValueError("the calibration set is empty: collect at least one trajectory")
    if calib.t.shape[0] != calib.x.shape[0]:
        raise ValueError(f"calibration set has {calib.x.shape[0]} samples but {calib.t.shape[0]} timesteps")
    for name, t in (("training", calib.t), ("validation", calib.val_t)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= config.num_train_timesteps):
            raise ValueError(f"{name} timesteps span [{int(t.min())}, {int(t.max())}], outside the config's "
                             f"[0, num_train_timesteps={config.num_train_timesteps})")
    if not bool(torch.isfinite(calib.x).all()):
        raise ValueError("the calibration inputs contain NaN or Inf")
    if config.method == "gac" and calib.val_x.shape[0] == 0:
        raise ValueError("method='gac' needs a validation set: collect with val_fraction > 0")


def _group_table(calib: CalibrationSet, config: QuantConfig) -> tuple[torch.Tensor, QuantConfig]:
    """The timestep -> group table; with fewer distinct timesteps than ``config.num_groups``, one group per
    timestep (a warning says so) and the config that records it."""
    kept = torch.unique(calib.t)
    if kept.numel() < config.num_groups:
        warnings.warn(f"only {kept.numel()} distinct calibration timesteps: using {kept.numel()} timestep groups "
                      f"instead of config.num_groups={config.num_groups} (collect more steps for more groups)")
        config = dataclasses.replace(config, num_groups=int(kept.numel()))
    return timestep_groups_from_calibration(kept, config.num_groups, config.num_train_timesteps), config


def _sample_fn(x, t, cond, cond_kind, device, dtype):
    def fn(idx):
        return x[idx].to(device, dtype), t[idx].to(device), condition_kwargs(condition_rows(cond, idx, device, dtype),
                                                                             cond_kind)
    return fn


def _group_batches(groups: torch.Tensor, batch_size: int, with_group: bool) -> list:
    """Batches of sample indices, each inside one group, groups in order (for the EMA statistics)."""
    out = []
    for g in torch.unique(groups).tolist():
        members = torch.nonzero(groups == g).flatten()
        for chunk in members.split(batch_size):
            out.append((chunk, int(g) if with_group else None))
    return out


def _capture(unet, unit_module, layer_modules, x, t, cond, cond_kind, groups, batch_size, stats, in_splits,
             device, dtype):
    batches = _group_batches(groups, batch_size, stats is not None)
    data = capture_unit(unet, unit_module, layer_modules, _sample_fn(x, t, cond, cond_kind, device, dtype),
                        batches, stats, in_splits)
    order = torch.cat([b[0] for b in batches])
    return data.select(torch.argsort(order))


def _capture_unit_data(unet, qwork, unit, unit_module, layer_modules, x, t, cond, cond_kind, groups, batch_size,
                       stats, device, dtype) -> UnitData:
    """The unit's inputs (and activation ranges, into ``stats``) and its float outputs as targets.

    ``qwork is None``: everything from the float ``unet``. Otherwise the inputs and ranges come from
    ``qwork`` (earlier blocks fake-quantized), the targets from ``unet``: same samples, same order.
    """
    if qwork is None:
        return _capture(unet, unit_module, layer_modules, x, t, cond, cond_kind, groups, batch_size, stats,
                        unit.in_splits, device, dtype)
    qmods = dict(qwork.named_modules())  # rebuilt: finished blocks were replaced in qwork
    q_in = _capture(qwork, qmods[unit.name], {n: qmods[n] for n in layer_modules}, x, t, cond, cond_kind, groups,
                    batch_size, stats, unit.in_splits, device, torch.float32)
    fp = _capture(unet, unit_module, layer_modules, x, t, cond, cond_kind, groups, batch_size, None,
                  unit.in_splits, device, dtype)
    return UnitData(q_in.treedef, q_in.leaves, q_in.batched, fp.out)


def _build_quant_block(unit: ReconUnit, unit_module: nn.Module, stats: ActRangeStats, config: QuantConfig,
                       ctx: GroupContext) -> nn.Module:
    """A copy of the unit with every quantizable layer replaced by a ``QuantLayer``."""
    block = copy.deepcopy(unit_module).float()
    for name in unit.layers:
        local = unit.local(name)
        layer = block if local == "" else block.get_submodule(local)
        w_scale = numerics.mse_weight_scale(layer.weight, config.weight_bits, config.weight_clip_grid)
        lo, hi = stats.ranges(name)
        a_scale = numerics.act_scale_from_range(lo, hi)  # [G, S]
        splits = unit.in_splits.get(name)
        if splits is None:
            a_scale = a_scale[:, 0]
        q = QuantLayer(layer, w_scale, a_scale, config.weight_bits, ctx, splits)
        if local == "":
            block = q
        else:
            replace_submodule(block, local, q)
    for p in block.parameters():
        p.requires_grad_(False)
    for m in block.modules():
        if isinstance(m, QuantLayer):
            m.alpha.requires_grad_(True)
    return block


def _layer_states(unit: ReconUnit, block: nn.Module) -> dict:
    out = {}
    for name in unit.layers:
        local = unit.local(name)
        q = block if local == "" else block.get_submodule(local)
        out[name] = LayerQState(weight_q=q.weight_q.detach().cpu().clone(),
                                weight_scale=q.weight_scale.detach().cpu().clone(),
                                act_scale=q.act_scale.detach().cpu().float().clone(),
                                in_splits=q.in_splits)
    return out


@dataclass
class UnitProblem:
    """One unit's reconstruction problem as ``calibrate`` sets it up (for tests and diagnostics).

    ``block``: the unit with QuantLayers (MSE weight scales, act step sizes from the training set's
    EMA ranges, ``alpha`` at its AdaRound start, weight mode ``"soft"``); ``ctx`` its group context;
    ``train`` / ``val``: recorded inputs and float outputs; ``groups`` / ``val_groups``: int64
    timestep group per sample.
    """

    name: str
    block: nn.Module
    ctx: GroupContext
    train: UnitData
    groups: torch.Tensor
    val: UnitData
    val_groups: torch.Tensor


def unit_problem(unet: nn.Module, calib: CalibrationSet, config: QuantConfig, name: str) -> UnitProblem:
    """Build the reconstruction problem of the unit called ``name`` on ``calib``, from the float model's
    inputs (``block_inputs="fp"``: the unit on its own). ValueError naming the units when unknown."""
    _check_calibration_set(calib, config)
    table, config = _group_table(calib, config)
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    groups = group_of(calib.t, table.cpu()).cpu()
    val_groups = group_of(calib.val_t, table.cpu()).cpu() if calib.val_t.numel() else calib.val_t
    probe = (calib.x[:1].to(device, dtype), calib.t[:1].to(device),
             calib.cond_kwargs(condition_rows(calib.cond, slice(0, 1), device, dtype)))
    units = {u.name: u for u in find_units(unet, config.exclude, probe)}
    if name not in units:
        raise ValueError(f"unit {name!r} is not one of the model's units {list(units)}")
    unit, modules = units[name], dict(unet.named_modules())
    layer_modules = {ln: modules[ln] for ln in unit.layers}
    stats = ActRangeStats(config.num_groups, config.act_ema_momentum, config.act_quantile)
    was_training = unet.training
    unet.eval()
    try:
        train = _capture_unit_data(unet, None, unit, modules[name], layer_modules, calib.x, calib.t, calib.cond,
                                   calib.cond_kind, groups, config.batch_size, stats, device, dtype)
        val = _capture_unit_data(unet, None, unit, modules[name], layer_modules, calib.val_x, calib.val_t,
                                 calib.val_cond, calib.cond_kind, val_groups, config.batch_size, None, device, dtype)
    finally:
        unet.train(was_training)
    ctx = GroupContext()
    block = _build_quant_block(unit, modules[name], stats, config, ctx).to(device)
    set_weight_mode(block, "soft")
    return UnitProblem(name, block, ctx, train, groups, val, val_groups)


def _fingerprint(calib: CalibrationSet, config: QuantConfig, weights: str) -> dict:
    """JSON-normalised identity of a calibration run (config, float weights, calibration-set size and checksums)."""
    return json.loads(json.dumps({"config": config.to_dict(), "float_weights": weights, "num_train": len(calib),
                                  "num_val": int(calib.val_x.shape[0]),
                                  "x_sum": round(float(calib.x.double().sum()), 6), "t_sum": int(calib.t.sum())}))


def calibrate(unet: nn.Module, calib: CalibrationSet, config: QuantConfig | None = None, *,
              checkpoint_path=None, callback: Callable[[dict], None] | None = None,
              progress: bool = True) -> QuantState:
    """Calibrate every quantizable layer of ``unet`` on ``calib``; returns a validated ``QuantState``.

    * ``unet``: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (not modified).
    * ``config.method``: ``"rtn"``, ``"uniform"`` or ``"gac"`` (module docstring).
    * ``checkpoint_path``: a directory; progress is saved after every block and a rerun with the
      same path (same config and calibration set) skips the finished blocks.
    * ``callback(event)``: called with ``{"stage": "start" | "end", "index": k, "block": name,
      "num_blocks": n}`` around each block computed in this call; an exception it raises stops
      the calibration (blocks already saved stay saved).
    Deterministic for a fixed ``config.seed`` (mini-batches come from per-block seeded generators).
    """
    config = config if config is not None else QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    check_convertible(unet, config.exclude)
    _check_calibration_set(calib, config)
    table, config = _group_table(calib, config)
    t_start = time.perf_counter()
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    groups = group_of(calib.t, table.cpu()).cpu()
    val_groups = group_of(calib.val_t, table.cpu()).cpu() if calib.val_t.numel() else calib.val_t
    was_training = unet.training
    unet.eval()
    probe = (calib.x[:1].to(device, dtype), calib.t[:1].to(device),
             calib.cond_kwargs(condition_rows(calib.cond, slice(0, 1), device, dtype)))
    units = find_units(unet, config.exclude, probe)
    modules = dict(unet.named_modules())

    weights_fp = WeightsFingerprint.of(unet)
    ckpt = None
    if checkpoint_path is not None:
        ckpt = CalibrationCheckpoint(checkpoint_path, _fingerprint(calib, config, weights_fp.digest()))
        ckpt.load()
    done = set(ckpt.done) if ckpt is not None else set()

    qstate = QuantState(config=config, timestep_to_group=table.clone(),
                        float_fingerprint=weights_fp)
    n = len(calib)
    logits = torch.zeros(n, dtype=torch.float32)
    block_seconds = {}
    gac_record = {}  # block -> one record per logit refresh (gac.refresh_sample_logits)
    ctx = GroupContext()
    bs = config.batch_size
    qwork = None  # block_inputs == "quantized": a float copy whose finished blocks are fake-quantized
    if config.block_inputs == "quantized":
        qwork = copy.deepcopy(unet).float().eval()
        qctx = GroupContext()
        attach_group_router(qwork, table.to(device), qctx)
    try:
        for k, unit in enumerate(tqdm(units, desc=f"calibrate ({config.method})", disable=not progress)):
            if unit.name in done:
                for name in unit.layers:
                    qstate.layers[name] = ckpt.layer(name)
                if qwork is not None:
                    install_fake_quant(qwork, {n: qstate.layers[n] for n in unit.layers}, config.weight_bits, qctx)
                qstate.block_mse[unit.name] = ckpt.record["block_mse"][unit.name]
                sw = ckpt.sample_weights(unit.name)
                if sw is not None:
                    qstate.sample_weights[unit.name] = sw
                saved = ckpt.logits(unit.name)
                if saved is not None and config.weights_carry_over:
                    logits = saved.clone()
                block_seconds[unit.name] = ckpt.record["block_seconds"][unit.name]
                if unit.name in ckpt.record.get("gac", {}):
                    gac_record[unit.name] = ckpt.record["gac"][unit.name]
                continue
            if callback is not None:
                callback({"stage": "start", "index": k, "block": unit.name, "num_blocks": len(units)})
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + k)
            layer_modules = {ln: modules[ln] for ln in unit.layers}
            stats = ActRangeStats(config.num_groups, config.act_ema_momentum, config.act_quantile)
            train = _capture_unit_data(unet, qwork, unit, modules[unit.name], layer_modules, calib.x, calib.t,
                                       calib.cond, calib.cond_kind, groups, bs, stats, device, dtype)
            block = _build_quant_block(unit, modules[unit.name], stats, config, ctx).to(device)
            for m in block.modules():
                if isinstance(m, QuantLayer):
                    m.freeze("rtn")
            mse = {"rtn": block_output_mse(block, ctx, train, groups, 4 * bs, device)}
            sample_w = None
            if config.method != "rtn":
                weighter = None
                if config.method == "gac":
                    val = _capture_unit_data(unet, qwork, unit, modules[unit.name], layer_modules, calib.val_x,
                                             calib.val_t, calib.val_cond, calib.cond_kind, val_groups, bs, None,
                                             device, dtype)
                    if not config.weights_carry_over:
                        logits = torch.zeros(n, dtype=torch.float32)
                    weighter = SampleWeighter(block, ctx, train, groups, val, val_groups, logits, config, main_output,
                                              device)
                    w = weighter.weights
                else:
                    w = torch.full((n,), 1.0 / n)
                reconstruct_block(block, ctx, train, groups, w, config, gen, device, progress, desc=f"{unit.name}",
                                  refresh=weighter, refresh_every=weighter.every if weighter is not None else 1)
                if weighter is not None:
                    logits = weighter.logits
                    sample_w = {"timesteps": calib.t.clone().to(torch.int64),
                                "weights": weighter.weights.float().clone()}
                    gac_record[unit.name] = weighter.records
                mse["final"] = block_output_mse(block, ctx, train, groups, 4 * bs, device)
            layers = _layer_states(unit, block)
            qstate.layers.update(layers)
            if qwork is not None:
                install_fake_quant(qwork, layers, config.weight_bits, qctx)
            qstate.block_mse[unit.name] = mse
            if sample_w is not None:
                qstate.sample_weights[unit.name] = sample_w
            block_seconds[unit.name] = time.perf_counter() - t0
            if ckpt is not None:
                ckpt.add_block(unit.name, layers, mse, block_seconds[unit.name], sample_w,
                               logits if config.method == "gac" else None, gac_record.get(unit.name))
            if callback is not None:
                callback({"stage": "end", "index": k, "block": unit.name, "num_blocks": len(units)})
    finally:
        unet.train(was_training)
    qstate.meta = {
        "method": config.method,
        "units": [u.name for u in units],
        "num_train_samples": n,
        "num_val_samples": int(calib.val_x.shape[0]),
        "block_seconds": block_seconds,
        "resumed_blocks": sorted(done),
        "total_seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
    }
    if config.method == "gac":
        qstate.meta["gac"] = gac_record
    qstate.validate()
    return qstate
