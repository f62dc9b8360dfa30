"""Calibration on a small random UNet2DModel: collection, rtn/uniform/gac, resumability, errors."""
import json

import pytest
import torch
from torch import nn

from tgpq import QuantConfig
from tgpq.calibration import CalibrationSet, calibrate, collect_calibration, fake_quant_model, plot_sample_weights
from tgpq.calibration.blocks import quantizable_layers

NUM_STEPS, INTERVAL, TRAJ = 20, 2, 4  # 10 kept timesteps x 4 trajectories = 40 training samples


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI machine has 2 cores shared with other jobs: one intra-op thread avoids oversubscription.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


@pytest.fixture(scope="module")
def calib(unet):
    from diffusers import DDIMScheduler

    return collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=TRAJ,
                               num_steps=NUM_STEPS, interval=INTERVAL, val_fraction=0.25, seed=0, batch_size=4,
                               progress=False)


def _cfg(method, **kw):
    base = dict(weight_bits=4, act_bits=8, method=method, iters=4, batch_size=8, weight_steps=2,
                lr_adaround=3e-2, seed=0)
    base.update(kw)
    return QuantConfig(**base)


@pytest.fixture(scope="module")
def gac_state(unet, calib):
    return calibrate(unet, calib, _cfg("gac"), progress=False)


def test_collect_shapes_balance_and_disjoint(calib):
    kept = calib.kept_timesteps
    assert kept.numel() == NUM_STEPS // INTERVAL
    assert calib.x.shape == (TRAJ * kept.numel(), 3, 16, 16) and calib.x.dtype == torch.float32
    assert calib.t.dtype == torch.int64 and set(calib.t.tolist()) == set(kept.tolist())
    # every kept timestep has the same count in both sets; 10 kept steps in 5 groups -> 2 per group,
    # so 4 validation trajectories give the minimum of 8 validation samples per group
    for t in kept.tolist():
        assert int((calib.t == t).sum()) == TRAJ
        assert int((calib.val_t == t).sum()) == 4
    # validation trajectories come from other seeds: no validation input equals a training input
    d = torch.cdist(calib.val_x.flatten(1), calib.x.flatten(1))
    assert float(d.min()) > 1e-3
    assert bool(torch.isfinite(calib.x).all())


def test_validation_trajectories_give_8_per_group():
    """collect_calibration's validation size: val_fraction of the trajectories, but at least 8 samples in
    every one of the 5 timestep groups (the documented defaults: 100-step DDIM, every 5th step kept)."""
    from diffusers import DDIMScheduler

    from tgpq.calibration.collect import validation_trajectories
    from tgpq.nn.routing import timestep_groups_from_calibration

    sched = DDIMScheduler(num_train_timesteps=1000)
    for steps, interval in ((100, 5), (50, 5), (20, 2), (100, 10)):
        sched.set_timesteps(steps)
        kept = sched.timesteps[::interval]
        table = timestep_groups_from_calibration(kept, 5)
        per_group_steps = torch.bincount(table[kept], minlength=5)
        for traj in (1, 4, 16, 64, 256):
            n_val = validation_trajectories(traj, 0.05, kept, 5, 8)
            assert int(per_group_steps.min()) * n_val >= 8
            assert n_val >= round(0.05 * traj)
    sched.set_timesteps(100)
    kept = sched.timesteps[::5]
    assert validation_trajectories(16, 0.05, kept, 5, 8) == 2  # 20 kept steps: 4 per group x 2 = 8
    assert validation_trajectories(256, 0.05, kept, 5, 8) == 13  # the paper's 5 % decides
    assert validation_trajectories(16, 0.0, kept, 5, 8) == 0


def test_gac_with_zero_logit_steps_is_uniform(unet, calib):
    """gac and uniform share one code path: with lr_sample_logits = 0 the weights stay uniform and gac's
    refreshes draw nothing from the mini-batch generator, so the result is uniform's, bit for bit."""
    u = calibrate(unet, calib, _cfg("uniform", iters=8), progress=False)
    g = calibrate(unet, calib, _cfg("gac", iters=8, lr_sample_logits=0.0), progress=False)
    assert all(len(r) == 3 for r in g.meta["gac"].values())  # refreshes at 2, 4, 6
    for name, lq in u.layers.items():
        assert torch.equal(lq.weight_q, g.layers[name].weight_q), name
        assert torch.equal(lq.act_scale, g.layers[name].act_scale), name


def test_uniform_lowers_every_block_mse_below_rtn(unet, calib):
    """W4A8: block reconstruction (AdaRound + LSQ) beats round-to-nearest on every block."""
    q = calibrate(unet, calib, _cfg("uniform", iters=60), progress=False)
    assert q.sample_weights == {}
    worse = {b: m for b, m in q.block_mse.items() if not m["final"] < m["rtn"]}
    assert not worse, f"reconstruction did not improve on rtn for {worse}"


def test_qstate_covers_every_layer(unet, calib, gac_state):
    q = gac_state
    cfg = q.config
    expected = set(quantizable_layers(unet, cfg.exclude))
    assert set(q.layers) == expected
    assert not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in q.layers)
    modules = dict(unet.named_modules())
    for name, lq in q.layers.items():
        assert lq.weight_q.dtype == torch.int8 and lq.weight_q.shape == modules[name].weight.shape
        assert int(lq.weight_q.abs().max()) <= 7
    split = {n: lq for n, lq in q.layers.items() if lq.in_splits is not None}
    # up blocks: every resnet's conv1 and conv_shortcut see cat([h, skip])
    assert set(split) == {f"up_blocks.{b}.resnets.{r}.{c}" for b in (0, 1) for r in (0, 1)
                          for c in ("conv1", "conv_shortcut")}
    for n, lq in split.items():
        assert lq.act_scale.shape == (cfg.num_groups, 2)
        assert sum(lq.in_splits) == modules[n].in_channels
    assert q.timestep_to_group.shape == (1000,)
    assert set(q.meta) >= {"block_seconds", "total_seconds", "units"}


def test_gac_weights_learned_nonnegative_normalised(calib, gac_state):
    q = gac_state
    assert set(q.sample_weights) == set(q.block_mse)
    n = len(calib)
    last = None
    for b, sw in q.sample_weights.items():
        w = sw["weights"]
        assert w.shape == (n,) and w.dtype == torch.float32
        assert torch.equal(sw["timesteps"], calib.t)
        assert bool((w >= 0).all())
        assert abs(float(w.sum()) - 1) < 1e-5
        last = w
    # moved away from uniform (normalised logit steps of RMS 0.5 at each refresh)
    assert float((last * n - 1).abs().max()) > 0.05
    for b, recs in q.meta["gac"].items():
        assert [r["iteration"] for r in recs] == [1, 2, 3], b  # iters 4: refreshes every iters // 4
    for m in q.block_mse.values():
        assert m["final"] > 0 and m["rtn"] > 0


def test_deterministic(unet, calib, gac_state):
    q2 = calibrate(unet, calib, _cfg("gac"), progress=False)
    for name, lq in gac_state.layers.items():
        assert torch.equal(lq.weight_q, q2.layers[name].weight_q), name
        assert torch.equal(lq.act_scale, q2.layers[name].act_scale), name
    for b, sw in gac_state.sample_weights.items():
        assert torch.equal(sw["weights"], q2.sample_weights[b]["weights"])


def test_resume_after_interruption(unet, calib, gac_state, tmp_path):
    class Interrupt(Exception):
        pass

    def stop_in_block_2(event):
        if event["stage"] == "start" and event["index"] == 2:
            raise Interrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        calibrate(unet, calib, _cfg("gac"), checkpoint_path=ckpt, callback=stop_in_block_2, progress=False)
    record = json.loads((ckpt / "progress.json").read_text())
    assert record["done"] == gac_state.meta["units"][:2]
    started = []
    q = calibrate(unet, calib, _cfg("gac"), checkpoint_path=ckpt, progress=False,
                  callback=lambda e: started.append(e["index"]) if e["stage"] == "start" else None)
    assert started[0] == 2 and q.meta["resumed_blocks"] == sorted(gac_state.meta["units"][:2])
    for name, lq in gac_state.layers.items():
        assert torch.equal(lq.weight_q, q.layers[name].weight_q), name
        assert torch.equal(lq.act_scale, q.layers[name].act_scale), name
    for b, sw in gac_state.sample_weights.items():
        assert torch.equal(sw["weights"], q.sample_weights[b]["weights"])
    # another config refuses the same checkpoint
    with pytest.raises(ValueError, match="another config"):
        calibrate(unet, calib, _cfg("gac", seed=1), checkpoint_path=ckpt, progress=False)


def test_fake_quant_model_matches_convert_reference(unet, calib, gac_state):
    """calibrate -> convert -> DDIM sample end to end; our simulation agrees with convert's
    reference backend (both dequantize and compute in float: only summation order differs)."""
    import tgpq
    from tgpq.eval.sampling import ddim_sample

    sim = fake_quant_model(unet, gac_state)
    conv = tgpq.convert(unet, gac_state, backend="reference")
    t0 = int(calib.t[0])  # convert's layers take one timestep (group) per batch
    x = calib.x[calib.t == t0]
    t = torch.tensor(t0)
    with torch.no_grad():
        a = sim(x, t).sample
        b = conv(x, t).sample
        fp = unet(x, t).sample
    assert float((a - fp).abs().max()) > 1e-4  # quantization is active
    # Both compute in float; summation order differs by ulps, which can flip an activation that lies
    # on a rounding boundary by one step, and a flip spreads through later layers (per layer the two
    # agree to ~1e-6, tests/test_modules.py). So: the simulation is far closer to convert than the
    # quantization error is large, and most outputs agree to 1e-3.
    rms = lambda v: float(v.pow(2).mean().sqrt())  # noqa: E731
    assert rms(a - b) <= 0.3 * rms(a - fp)
    assert float(((a - b).abs() <= 1e-3).float().mean()) >= 0.6
    imgs = ddim_sample(conv, 2, steps=5, seed=0, progress=False)
    assert imgs.shape == (2, 3, 16, 16) and bool(torch.isfinite(imgs).all())


def test_plot_sample_weights(gac_state, tmp_path):
    p = plot_sample_weights(gac_state, tmp_path / "w.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rtn_has_no_reconstruction(unet, calib):
    q = calibrate(unet, calib, _cfg("rtn"), progress=False)
    assert all(set(m) == {"rtn"} for m in q.block_mse.values())
    # rtn weights are exactly round-half-even of w / scale
    from tgpq import numerics

    modules = dict(unet.named_modules())
    for name, lq in list(q.layers.items())[:5]:
        assert torch.equal(lq.weight_q, numerics.quantize_weight(modules[name].weight, lq.weight_scale, 4))


# -- bad input ----------------------------------------------------------------------------------

def test_error_empty_set(unet, calib):
    empty = CalibrationSet(x=calib.x[:0], t=calib.t[:0], val_x=calib.val_x, val_t=calib.val_t,
                           kept_timesteps=calib.kept_timesteps)
    with pytest.raises(ValueError, match="empty"):
        calibrate(unet, empty, _cfg("rtn"), progress=False)


def test_too_few_timesteps_for_groups_uses_fewer_groups_with_a_warning(unet, calib):
    few = CalibrationSet(x=calib.x[:8], t=torch.tensor([500] * 4 + [300] * 4), val_x=calib.val_x[:2],
                         val_t=torch.tensor([500, 300]), kept_timesteps=torch.tensor([500, 300]))
    with pytest.warns(UserWarning, match="num_groups=5"):
        qs = calibrate(unet, few, _cfg("rtn"), progress=False)
    assert qs.config.num_groups == 2 and int(qs.timestep_to_group[500]) != int(qs.timestep_to_group[300])


def test_error_timesteps_outside_schedule(unet, calib):
    bad = CalibrationSet(x=calib.x, t=calib.t + 2000, val_x=calib.val_x, val_t=calib.val_t,
                         kept_timesteps=calib.kept_timesteps)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        calibrate(unet, bad, _cfg("rtn"), progress=False)


def test_error_nan_activation_names_layer(calib):
    broken = _tiny_unet()
    with torch.no_grad():
        broken.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"down_blocks\.0\.resnets\.0\.conv2"):
        calibrate(broken, calib, _cfg("rtn"), progress=False)


def test_error_no_quantizable_layer(unet, calib):
    cfg = _cfg("rtn", exclude=("conv_in", "conv_out", "time_embedding", "down_blocks", "mid_block", "up_blocks"))
    with pytest.raises(ValueError, match="no quantizable layer"):
        calibrate(unet, calib, cfg, progress=False)


def test_error_gac_without_validation(unet, calib):
    noval = CalibrationSet(x=calib.x, t=calib.t, val_x=calib.val_x[:0], val_t=calib.val_t[:0],
                           kept_timesteps=calib.kept_timesteps)
    with pytest.raises(ValueError, match="validation"):
        calibrate(unet, noval, _cfg("gac"), progress=False)


def test_error_collect_bad_arguments(unet):
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="num_trajectories"):
        collect_calibration(unet, DDIMScheduler(), num_trajectories=0)
    with pytest.raises(ValueError, match="not both"):
        collect_calibration(unet, DDIMScheduler(), 1, class_labels=torch.tensor([1]),
                            encoder_hidden_states=torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="min_val_per_group"):
        collect_calibration(unet, DDIMScheduler(), 1, min_val_per_group=-1)
    with pytest.raises(ValueError, match="num_groups"):
        collect_calibration(unet, DDIMScheduler(), 1, num_groups=0)


def test_not_modified(calib):
    u = _tiny_unet(seed=1)
    before = {k: v.clone() for k, v in u.state_dict().items()}
    calibrate(u, calib, _cfg("uniform", iters=2), progress=False)
    assert all(torch.equal(before[k], v) for k, v in u.state_dict().items())
    assert not any(type(m).__name__ == "QuantLayer" for m in u.modules())
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for n, m in u.named_modules() if n.endswith("conv1"))


def test_quantized_block_inputs(unet, calib, tmp_path):
    """block_inputs="quantized": the first block sees the float model's inputs (identical result), later
    blocks the partially quantized model's (a different result); resuming reproduces the run."""
    fp = calibrate(unet, calib, _cfg("uniform", block_inputs="fp"), progress=False)
    cfg = _cfg("uniform", block_inputs="quantized")
    q = calibrate(unet, calib, cfg, progress=False)
    units = q.meta["units"]
    first = [n for n in q.layers if n == units[0] or n.startswith(units[0] + ".")]
    assert first
    for name in first:
        assert torch.equal(q.layers[name].weight_q, fp.layers[name].weight_q), name
        assert torch.equal(q.layers[name].act_scale, fp.layers[name].act_scale), name
    later = [n for n in q.layers if n not in first]
    assert any(not torch.equal(q.layers[n].act_scale, fp.layers[n].act_scale) for n in later)

    class Interrupt(Exception):
        pass

    def stop_in_block_3(event):
        if event["stage"] == "start" and event["index"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        calibrate(unet, calib, cfg, checkpoint_path=tmp_path / "ck", callback=stop_in_block_3, progress=False)
    r = calibrate(unet, calib, cfg, checkpoint_path=tmp_path / "ck", progress=False)
    assert r.meta["resumed_blocks"] == sorted(units[:3])
    for name, lq in q.layers.items():
        assert torch.equal(lq.weight_q, r.layers[name].weight_q), name
        assert torch.equal(lq.act_scale, r.layers[name].act_scale), name
    with pytest.raises(ValueError, match="block_inputs"):
        QuantConfig(block_inputs="float")
