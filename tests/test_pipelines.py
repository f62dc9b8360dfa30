"""tgpq.quantize on whole diffusers pipelines (issue 17): collection through the pipeline's own runs, text-to-image
calibration with classifier-free guidance, and quantized-vs-float sampling within a derived error bound.

The pipelines are tiny Stable Diffusion / SDXL layouts built from configs (``tiny_pipelines.py``): CLIP text
encoders with random weights, a tokenizer over a vocabulary the helpers write, nothing downloaded.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import tgpq
from tgpq.calibration.pipeline_collect import collect_from_pipeline, needed_val_trajectories
from tgpq.nn import timestep_index
from tiny_pipelines import LATENT, TEXT_DIM, TEXT_LEN, make_sd_pipeline, make_sdxl_pipeline

PROMPTS = ["a cat", "a red dog", "two birds"]
STEPS = 8


def _all_calls(pipe, **call):
    """Run ``pipe(**call)`` recording every UNet call independently of tgpq: (sample, timestep, kwargs)."""
    calls = []

    def hook(mod, args, kwargs):
        calls.append((args[0].detach().clone(), args[1], {k: v for k, v in kwargs.items()}))

    h = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**call)
    finally:
        h.remove()
    return calls


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------------------------- collection
def _schedulers():
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           PNDMScheduler)

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return {
        "ddim": lambda: DDIMScheduler(clip_sample=False, **common),
        "ddpm": lambda: DDPMScheduler(clip_sample=False, **common),
        "pndm": lambda: PNDMScheduler(skip_prk_steps=True, **common),
        "euler": lambda: EulerDiscreteScheduler(**common),  # 7 steps: fractional timesteps (999, 832.5, ...)
        "dpm++": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common),
    }


@pytest.mark.parametrize("name", list(_schedulers()))
def test_collection_records_exactly_what_the_unet_sees(tmp_path, name):
    """Every kept call of the pipeline's own run, as the UNet received it: the scheduler-scaled sample, the
    (rounded) timestep shared by both CFG halves, and the negative / positive text embeddings in their halves."""
    pipe = make_sd_pipeline(tmp_path, scheduler=_schedulers()[name]())
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=gen)
    neg = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen)
    steps = 7 if name == "euler" else STEPS
    calib = collect_from_pipeline(pipe, 3, steps, interval=2, guidance_scale=4.0, prompt_embeds=emb,
                                  negative_prompt_embeds=neg, num_val_trajectories=1, batch_size=2, seed=5,
                                  progress=False)
    # the same runs, recorded independently: trajectories 0, 1 (one pipeline call) and 2 (another)
    calls = [_all_calls(pipe, prompt_embeds=emb[[j % 2 for j in js]], negative_prompt_embeds=neg.expand(len(js), -1, -1),
                        num_inference_steps=steps, guidance_scale=4.0, generator=_generators([5 + j for j in js]),
                        output_type="latent") for js in ([0, 1], [2])]
    kept = list(range(0, len(calls[0]), 2))
    want_x = torch.cat([c[k][0] for c in calls for k in kept])
    want_t = torch.cat([timestep_index(torch.as_tensor(c[k][1])).expand(c[k][0].shape[0]) for c in calls for k in kept])
    want_e = torch.cat([c[k][2]["encoder_hidden_states"] for c in calls for k in kept])
    assert torch.equal(calib.x, want_x.float()) and torch.equal(calib.t, want_t)
    assert calib.cond_kind == "kwargs" and set(calib.cond) == {"encoder_hidden_states"}
    assert torch.equal(calib.cond["encoder_hidden_states"], want_e)
    # the CFG batch: unconditional rows first (the negative embedding), then the conditional ones; one timestep a call
    first = slice(0, 4)
    assert torch.equal(calib.cond["encoder_hidden_states"][first], torch.cat([neg, neg, emb[0:1], emb[1:2]]))
    assert calib.t[first].unique().numel() == 1
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps)
    rounded = [int(timestep_index(sched.timesteps[k])) for k in kept]
    assert calib.kept_timesteps.tolist() == list(dict.fromkeys(rounded))
    if name == "euler":
        assert any(float(t) != round(float(t)) for t in sched.timesteps)  # the rounding is exercised
    # validation: other noise, the same calls, so every kept timestep has the same count
    assert len(calib.val_x) == 2 * len(kept)  # one trajectory: 2 rows (CFG) per kept call, in call order
    assert calib.val_t.view(len(kept), 2).T.tolist() == [rounded, rounded]
    assert not torch.equal(calib.val_x, calib.x[:2 * len(kept)])


def test_sdxl_collection_records_added_cond_kwargs(tmp_path):
    pipe = make_sdxl_pipeline(tmp_path)
    calib = collect_from_pipeline(pipe, 2, 6, interval=3, guidance_scale=5.0, prompts=PROMPTS[:2],
                                  num_val_trajectories=0, batch_size=2, progress=False)
    calls = _all_calls(pipe, prompt=PROMPTS[:2], num_inference_steps=6, guidance_scale=5.0,
                       generator=_generators([0, 1]), output_type="latent")
    assert set(calib.cond) == {"encoder_hidden_states", "added_cond_kwargs"}
    added = calib.cond["added_cond_kwargs"]
    assert set(added) == {"text_embeds", "time_ids"}
    n = 2 * 2 * 2  # 2 kept calls x (2 images x 2 CFG halves)
    assert added["text_embeds"].shape == (n, TEXT_DIM) and added["time_ids"].shape == (n, 6)
    for j, k in enumerate((0, 3)):
        rows = slice(4 * j, 4 * j + 4)
        assert torch.equal(calib.x[rows], calls[k][0])
        for key in ("text_embeds", "time_ids"):
            assert torch.equal(added[key][rows], calls[k][2]["added_cond_kwargs"][key].float())
        assert torch.equal(calib.cond["encoder_hidden_states"][rows], calls[k][2]["encoder_hidden_states"])
    assert len(calib.val_x) == 0


def test_validation_set_is_sized_for_the_timestep_groups(tmp_path):
    """Default size: at least 8 validation samples in every group calibrate will form (QuantConfig.num_groups)."""
    pipe = make_sd_pipeline(tmp_path)
    calib = collect_from_pipeline(pipe, 2, 10, interval=1, guidance_scale=3.0, prompts=PROMPTS, batch_size=4,
                                  progress=False)
    # 10 kept timesteps in 5 groups of 2, 2 rows (CFG) each: 4 samples a trajectory and group -> 2 trajectories
    assert needed_val_trajectories(10, 2, 5, 8) == 2
    assert len(calib.val_x) == 2 * 10 * 2
    from tgpq.nn.routing import group_of, timestep_groups_from_calibration

    table = timestep_groups_from_calibration(calib.kept_timesteps, 5)
    assert torch.bincount(group_of(calib.val_t, table), minlength=5).min() >= 8


def test_collection_refuses_what_it_cannot_record(tmp_path):
    from diffusers import DDIMPipeline

    pipe = make_sd_pipeline(tmp_path)
    with pytest.raises(ValueError, match="prompts"):
        collect_from_pipeline(pipe, 1, 4, progress=False)
    from conftest import make_small_unet
    from diffusers import DDIMScheduler

    class ScalarLabelPipeline:  # calls its UNet with one label for the whole batch: not a per-sample tensor
        def __init__(self, unet):
            self.unet = unet

        def __call__(self, batch_size=1, num_inference_steps=2, generator=None):
            self.unet(torch.randn(batch_size, 3, 16, 16), 500, class_labels=torch.tensor(3))

    with pytest.raises(ValueError, match="class_labels=.*per-sample tensors"):
        collect_from_pipeline(ScalarLabelPipeline(make_small_unet()), 1, 4, progress=False)

    uncond = DDIMPipeline(make_small_unet(), DDIMScheduler())
    with pytest.raises(ValueError, match="guidance_scale"):
        collect_from_pipeline(uncond, 1, 4, guidance_scale=3.0, progress=False)


# ------------------------------------------------------------------------------------ the derived error bound
def _guided(out: torch.Tensor, g: float) -> torch.Tensor:
    """The classifier-free-guidance combination the pipelines apply: eps_u + g (eps_c - eps_u)."""
    u, c = out.chunk(2)
    return u + g * (c - u)


def _run_recording(pipe, call, shadow=None):
    """``pipe(**call)`` (latents out); per UNet call its input, timestep, kwargs, output and, with ``shadow``,
    the output of the ``shadow`` UNet on the same input."""
    rec = []

    def hook(mod, args, kwargs, out):
        item = {"x": args[0].detach().clone(), "t": args[1], "out": out[0].detach().clone(),
                "kw": {k: v for k, v in kwargs.items() if k != "return_dict"}}
        if shadow is not None:
            item["shadow"] = shadow(args[0], args[1], **item["kw"], return_dict=False)[0]
        rec.append(item)

    h = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            latents = pipe(**call, output_type="latent").images
    finally:
        h.remove()
    return latents, rec


def _step_coefficients(scheduler, steps: int, shape) -> list[tuple[float, float, float]]:
    """Per step ``k``: ``(a_k, b_k, s_k)`` with ``x_{k+1} = a_k x_k + b_k eps`` and UNet input ``s_k x_k``, probed
    on copies of the scheduler in the state the pipeline's run gives it; the affine form is checked on random
    inputs (it holds for DDIM with eta 0 and Euler without churn, the samplers used here)."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)

    def step(t, eps, x):
        c = copy.deepcopy(sched)
        c.scale_model_input(x, t)
        return c.step(eps, t, x).prev_sample

    out = []
    ones, zeros = torch.ones(shape), torch.zeros(shape)
    for t in sched.timesteps:
        s = float(copy.deepcopy(sched).scale_model_input(ones, t).mean())
        a, b = float(step(t, zeros, ones).mean()), float(step(t, ones, zeros).mean())
        x, e = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        assert torch.allclose(step(t, e, x), a * x + b * e, rtol=1e-4, atol=1e-4 * (abs(a) + abs(b))), t
        out.append((a, b, s))
        sched.scale_model_input(zeros, t)
        sched.step(zeros, t, zeros)  # advance the copy's state as the pipeline's run does
    return out


def derived_error_bound(fpipe, qpipe, call: dict, g: float):
    """Quantized vs float latents from the same seeds, and the bound on their distance derived step by step.

    With guidance the pipeline steps ``x_{k+1} = a_k x_k + b_k eps_k``, ``eps_k = eps_u + g (eps_c - eps_u)``.
    For the float run ``x`` and the quantized run ``x'`` the error ``e_k = x'_k - x_k`` obeys exactly
    ``e_{k+1} = a_k e_k + b_k (d_k + D_k)`` with
      * ``d_k = eps'(x'_k) - eps(x'_k)``: the quantized UNet's error on the quantized run's own input (measured:
        the float UNet is evaluated on the same input, both CFG halves combined as the pipeline does);
      * ``D_k = eps(x'_k) - eps(x_k)``: the float model's response to the error so far, ``|D_k| <= L_k |e_k|``.
    So ``|e_{k+1}| <= |a_k| E_k + |b_k| (|d_k| + L_k E_k) =: E_{k+1}`` with ``E_0 = 0``. ``L_k`` is the float
    guided eps's gain at the float run's point at the scale of the error, ``|eps(x_k + E_k u) - eps(x_k)| / E_k``,
    the largest over three random unit directions ``u``.
    Returns ``(|x'_K - x_K|, E_K, |x_K|, per-step (|d_k|, |eps'(x'_k)| both halves))``.
    """
    lat_f, rec_f = _run_recording(fpipe, dict(call, generator=_generators(call["generator"])))
    lat_q, rec_q = _run_recording(qpipe, dict(call, generator=_generators(call["generator"])), shadow=fpipe.unet)
    coeffs = _step_coefficients(fpipe.scheduler, call["num_inference_steps"], lat_f.shape)
    assert len(coeffs) == len(rec_f) == len(rec_q)
    bound, per_step = 0.0, []
    gen = torch.Generator().manual_seed(1)
    for (a, b, s), f, q in zip(coeffs, rec_f, rec_q):
        d = float((_guided(q["out"], g) - _guided(q["shadow"], g)).norm())
        per_step.append((d, q["out"], q["shadow"]))
        x = f["x"].chunk(2)[0] / s  # the float run's latent
        h = max(bound, 1e-3 * float(x.norm()))
        eps0 = _guided(f["out"], g)
        gain = 0.0
        for _ in range(3):
            u = torch.randn(x.shape, generator=gen)
            xin = (x + h * u / u.norm()) * s
            with torch.no_grad():
                eps1 = _guided(fpipe.unet(torch.cat([xin, xin]), f["t"], **f["kw"], return_dict=False)[0], g)
            gain = max(gain, float((eps1 - eps0).norm()) / h)
        bound = abs(a) * bound + abs(b) * (d + gain * bound)
    return float((lat_q - lat_f).norm()), bound, float(lat_f.norm()), per_step


def _check_per_call_error(per_step, g):
    """The UNet-level bound the whole comparison rests on, per call and CFG half: W8A8 leaves a relative MSE under
    5e-3 on these small conditional UNets (tests/test_conditional_unet.py derives it: ~1e-4 per quantized layer,
    a few tens of layers), i.e. a relative norm error under sqrt(5e-3); the guided combination weighs the halves'
    errors by |1 - g| and g."""
    r = math.sqrt(5e-3)
    for d, q, f in per_step:
        (qu, qc), (fu, fc) = q.chunk(2), f.chunk(2)
        for qh, fh in ((qu, fu), (qc, fc)):
            assert float((qh - fh).pow(2).mean() / fh.pow(2).mean()) < 5e-3
        assert d <= (abs(1 - g) + g) * r * max(float(fu.norm()), float(fc.norm())) * 1.0001


@pytest.fixture(scope="module")
def sd_pair(tmp_path_factory):
    """A tiny SD pipeline (DDIM) and its gac W8A8 quantization, calibrated on prompts with guidance."""
    pipe = make_sd_pipeline(tmp_path_factory.mktemp("sd"))
    cfg = tgpq.QuantConfig(weight_bits=8, method="gac", iters=10, weight_steps=1, batch_size=16)
    qpipe = tgpq.quantize(pipe, cfg, prompts=PROMPTS, guidance_scale=5.0, num_inference_steps=STEPS,
                          num_trajectories=3, batch_size=3, progress=False)
    return pipe, qpipe


def test_quantize_returns_the_pipeline_with_its_unet_replaced(sd_pair):
    pipe, qpipe = sd_pair
    assert type(qpipe) is type(pipe) and qpipe is not pipe
    assert getattr(qpipe.unet, "tgpq_router", None) is not None and getattr(pipe.unet, "tgpq_router", None) is None
    assert qpipe.text_encoder is pipe.text_encoder and qpipe.vae is pipe.vae and qpipe.tokenizer is pipe.tokenizer
    assert qpipe.scheduler is not pipe.scheduler and type(qpipe.scheduler) is type(pipe.scheduler)
    assert qpipe.unet.tgpq_config.method == "gac"
    assert any(isinstance(m, tgpq.QLinear) for m in qpipe.unet.modules())
    assert any(isinstance(m, (tgpq.QConv2d, tgpq.QSplitConv2d)) for m in qpipe.unet.modules())
    images = qpipe(PROMPTS[:1], num_inference_steps=3, guidance_scale=5.0, generator=_generators([3]),
                   output_type="pt").images  # the full pipeline, VAE decode included
    assert images.shape == (1, 3, 2 * LATENT, 2 * LATENT) and bool(torch.isfinite(images).all())


def test_sd_quantized_samples_within_the_derived_bound(sd_pair):
    pipe, qpipe = sd_pair
    g = 5.0
    call = dict(prompt=["a blue bird", "a cat"], num_inference_steps=STEPS, guidance_scale=g, generator=[100, 101])
    err, bound, signal, per_step = derived_error_bound(pipe, qpipe, call, g)
    _check_per_call_error(per_step, g)
    assert 0 < err <= bound, (err, bound)
    print(f"SD/DDIM: |x_q - x| = {err:.3f} <= bound {bound:.3f} (|x| = {signal:.1f})")


def test_sdxl_quantized_samples_within_the_derived_bound(tmp_path):
    """SDXL layout (two text encoders, text_embeds / time_ids), Euler: calibrate on prompts with guidance, sample."""
    pipe = make_sdxl_pipeline(tmp_path)
    cfg = tgpq.QuantConfig(weight_bits=8, method="gac", iters=10, weight_steps=1, batch_size=16)
    qpipe = tgpq.quantize(pipe, cfg, prompts=PROMPTS, guidance_scale=5.0, num_inference_steps=STEPS,
                          num_trajectories=3, batch_size=3, progress=False)
    assert type(qpipe).__name__ == "StableDiffusionXLPipeline" and qpipe.text_encoder_2 is pipe.text_encoder_2
    g = 5.0
    call = dict(prompt=["a blue bird", "a cat"], num_inference_steps=STEPS, guidance_scale=g, generator=[100, 101])
    err, bound, signal, per_step = derived_error_bound(pipe, qpipe, call, g)
    _check_per_call_error(per_step, g)
    assert 0 < err <= bound, (err, bound)
    print(f"SDXL/Euler: |x_q - x| = {err:.3f} <= bound {bound:.3f} (|x| = {signal:.1f})")


def test_inplace_quantize_changes_the_pipeline_itself(tmp_path):
    pipe = make_sd_pipeline(tmp_path)
    unet = pipe.unet
    out = tgpq.quantize(pipe, tgpq.QuantConfig(method="rtn"), prompt_embeds=torch.randn(2, TEXT_LEN, TEXT_DIM),
                        guidance_scale=1.0, num_inference_steps=5, num_trajectories=2, inplace=True, progress=False)
    assert out is pipe and pipe.unet is unet and unet.tgpq_router is not None
    with pytest.raises(ValueError, match="already quantized"):
        tgpq.quantize(pipe, tgpq.QuantConfig(method="rtn"), prompts=PROMPTS, num_inference_steps=5, progress=False)


# ------------------------------------------------------------------------------- unconditional and bare UNets
def test_ddim_pipeline_and_bare_unet(tmp_path):
    from conftest import make_small_unet
    from diffusers import DDIMPipeline, DDIMScheduler

    unet = make_small_unet(seed=2)
    pipe = DDIMPipeline(unet, DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    cfg = tgpq.QuantConfig(method="rtn")
    qpipe = tgpq.quantize(pipe, cfg, num_inference_steps=10, num_trajectories=2, progress=False)
    assert type(qpipe) is DDIMPipeline and qpipe.unet.tgpq_router is not None
    img = qpipe(batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 16, 16, 3)
    qunet = tgpq.quantize(unet, cfg, scheduler=DDIMScheduler(num_train_timesteps=1000), num_inference_steps=10,
                          num_trajectories=2, progress=False)
    assert type(qunet) is type(unet) and qunet.tgpq_router is not None
    assert getattr(unet, "tgpq_router", None) is None  # not in place: the float UNet is untouched
    with pytest.raises(ValueError, match="scheduler="):
        tgpq.quantize(unet, cfg, num_inference_steps=4, progress=False)
    with pytest.raises(ValueError, match="own scheduler"):
        tgpq.quantize(pipe, cfg, scheduler=DDIMScheduler(), progress=False)
    with pytest.raises(TypeError, match="pipeline"):
        tgpq.quantize(object(), cfg)


def test_learned_variance_unet_calibrates_and_samples_on_its_epsilon_half():
    """out_channels == 2 * in_channels: the samplers step on the first half (eps); calibration sees every call."""
    from conftest import make_small_unet
    from diffusers import DDIMScheduler

    from tgpq.eval import ddim_sample

    unet = make_small_unet(seed=3, out_channels=6)
    qunet = tgpq.quantize(unet, tgpq.QuantConfig(method="rtn"), scheduler=DDIMScheduler(num_train_timesteps=1000),
                          num_inference_steps=10, num_trajectories=2, progress=False)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in (950, 450, 20):
            ref, out = unet(x, t).sample, qunet(x, t).sample
            assert out.shape == (2, 6, 16, 16)
            # W8A8 per call, the bound of tests/test_convert.py on this UNet family
            assert 0 < float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 5e-3
    x_q = ddim_sample(qunet, 2, steps=6, seed=4, progress=False)  # a 6-channel eps would not broadcast
    assert x_q.shape == (2, 3, 16, 16) and bool(torch.isfinite(x_q).all())
