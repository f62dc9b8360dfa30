r"""End-to-end DDIM sampling benchmark: speed and memory of quantized diffusion sampling.

    python benchmarks/bench_sampling.py                      # everything this machine can run
    python benchmarks/bench_sampling.py --models ddpm-cifar10 --batches 1 256
    tgpq bench --quick                                       # the same script through the CLI

What is timed: a full DDIM sampling loop (``--steps`` UNet calls plus the scheduler update), from
Gaussian noise to the final latent, for one batch. Warm-up (first calls, torch.compile, Triton
autotuning, CUDA-graph capture) is excluded and reported separately as ``warmup_s``. On CUDA the
loop is timed with CUDA events; on the CPU with ``time.perf_counter``. The figure reported is the
median over repeats of whole loops; when one loop does not fit the cell's ``--max-seconds``
budget, ``--steps`` is extrapolated from the median time of the steps that were run
(``extrapolated: true``, ``steps_timed`` says how many; every DDIM step runs the same UNet, so
step times are flat across the schedule).

Models (``--models``):
  * ``reference``: the trained CIFAR-10 UNet shipped with tgpq (skipped with a message when its
    asset files are absent);
  * ``ddpm-cifar10``: the full-size DDPM CIFAR-10 UNet (35.7M parameters), random weights;
  * ``sd15``: the Stable Diffusion 1.5 ``UNet2DConditionModel`` (859.5M parameters) built from its
    published config, random weights, 64x64x4 latents, random text embeddings [B, 77, 768]; the
    batch is the UNet batch (with classifier-free guidance a user's B images cost a UNet batch 2B);
  * ``tiny-ddpm`` / ``tiny-ldm``: small versions of the two layouts, for tests and ``--quick``.

Quantized models use a round-to-nearest ``QuantState`` built here in seconds (abs-max per-channel
weight scales, per-timestep-group activation abs-max from one forward per group on random
inputs): speed does not depend on the calibration method, so no calibration set is needed.

Variants. GPU: ``fp16-eager``, ``fp16-compile``, ``fp16-cudagraph``, ``tgpq-w8a8``,
``tgpq-w4a8``, ``tgpq-w8a8-cudagraph``, ``tgpq-w4a8-cudagraph``, ``tgpq-w8a8-compile``,
``torchao-int8dq-compile`` (torchao's Int8DynamicActivationInt8WeightConfig + torch.compile, when
torchao imports; it quantizes Linear layers only). CPU: ``fp32-eager``, ``tgpq-w8a8-cpu``,
``tgpq-w4a8-cpu``, ``tgpq-w8a8-reference``. Speedups are against ``fp16-eager`` (GPU) or
``fp32-eager`` (CPU) at the same model and batch.

Outputs under ``--out`` (default ``benchmarks/results/``), all named ``sampling-<device>-<date>``:
``.json`` (device, versions, git commit, command line, one record per (model, batch, variant),
profiles), ``.md`` (tables), ``.png`` (speedup and memory bar charts) and ``-profile.txt`` (the
torch.profiler table of the top kernels of the W8A8 run per model). The JSON is rewritten after
every cell, so a run cut short keeps what it measured.

Memory: ``peak_mem_bytes`` is ``torch.cuda.max_memory_allocated`` over the timed sampling (reset after
warm-up; the float32 master copy stays on the CPU, so it holds the variant's model, its activations,
CUDA-graph / compile pools); ``weight_bytes`` is ``tgpq.weight_bytes`` (parameters + buffers at
their stored size; for torchao's tensor subclasses this may show the logical size, so
``device_model_bytes``, the allocator's growth while the model is built, is recorded as well).

Expected runtime on one H100 (estimates, not yet measured: this was written on a machine without a
GPU). Warm-ups dominate: a torch.compile cell costs ~30-60 s for the DDPM UNet and 1-2 min for
SD 1.5 (each batch size compiles anew), a timed cell at most ``--max-seconds`` (8) plus a few
seconds of convert and Triton autotuning. One device call is at most 10 minutes, so split the run,
headline first, each call writing under ``$OUT``:

    python benchmarks/bench_sampling.py --models ddpm-cifar10 --batches 256 64 --out $OUT
    python benchmarks/bench_sampling.py --models ddpm-cifar10 reference --batches 16 1 --out $OUT
    python benchmarks/bench_sampling.py --models sd15 --batches 256 16 1 --variants fp16-eager \
        fp16-cudagraph tgpq-w8a8 tgpq-w4a8 tgpq-w8a8-cudagraph torchao-int8dq-compile --out $OUT

Cells run batch by batch (each batch a complete comparison), in the ``--batches`` order (default
256 64 16 1: the headline batch first). ``--total-seconds`` (default 540) stops starting new cells
once the run has used that much time, and a torch.compile cell is not started with less than
``COMPILE_RESERVE_S`` left; skipped cells are recorded as such. Most of the time goes to warm-ups
(torch.compile: ~40 s for the DDPM UNet, 1-2 min for SD 1.5, per batch size; Triton autotuning).

CPU mode (no CUDA): a reduced run (batches 1-2, 3 steps, the reference and DDPM UNets) whose numbers
describe this CPU only: GPU numbers need a GPU. ``--quick`` runs the tiny models at batch 1 with 2
steps in seconds.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import tgpq  # noqa: E402
from tgpq.numerics import absmax_weight_scale, act_scale_from_range, quantize_weight  # noqa: E402
from tgpq.qstate import LayerQState, QuantState  # noqa: E402
from tgpq.routing import uniform_timestep_groups  # noqa: E402

GPU_VARIANTS = ("fp16-eager", "fp16-compile", "fp16-cudagraph", "tgpq-w8a8", "tgpq-w4a8", "tgpq-w8a8-cudagraph",
                "tgpq-w4a8-cudagraph", "tgpq-w8a8-compile", "torchao-int8dq-compile")
CPU_VARIANTS = ("fp32-eager", "tgpq-w8a8-cpu", "tgpq-w4a8-cpu", "tgpq-w8a8-reference")
BASELINE = {"gpu": "fp16-eager", "cpu": "fp32-eager"}
COMPILE_RESERVE_S = 150.0  # a torch.compile cell is not started with less time left (SD 1.5 compiles ~1-2 min)
PROFILE_VARIANT = {"gpu": "tgpq-w8a8", "cpu": "tgpq-w8a8-cpu"}
GPU_NOTE = ("CPU mode: no CUDA device here. These numbers describe this CPU only; the GPU numbers "
            "(fp16 / torch.compile / Triton W8A8 and W4A8 / torchao) need a GPU: run this script on one.")

# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

#: The DDPM CIFAR-10 UNet (google/ddpm-cifar10-32 layout), 35,746,307 parameters.
DDPM_CIFAR10_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
DDPM_CIFAR10_PARAMS = 35_746_307

#: The published Stable Diffusion 1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json),
#: 859,520,964 parameters.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_PARAMS = 859_520_964
SD15_TEXT_SHAPE = (77, 768)

TINY_DDPM_CONFIG = dict(
    sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 32),
    norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
)
TINY_LDM_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_LDM_TEXT_SHAPE = (7, 32)

ALL_MODELS = ("reference", "ddpm-cifar10", "sd15", "tiny-ddpm", "tiny-ldm")


@dataclass
class ModelSpec:
    """A benchmark model: ``build(device)`` returns the float32 UNet in eval mode on ``device``.

    ``sample_shape`` is ``(C, H, W)`` of one sample; ``text_shape`` is ``(L, D)`` of the
    ``encoder_hidden_states`` of a conditional UNet, or None.
    """

    name: str
    description: str
    build: Callable[[torch.device], torch.nn.Module]
    sample_shape: tuple
    text_shape: tuple | None = None
    expected_params: int | None = None


def _build_in_place(cls, config: dict, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Random-init a diffusers UNet directly on ``device`` (an 860M model inits in seconds on a GPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    return model.eval()


def _unet2d(config):
    from diffusers import UNet2DModel

    return lambda device: _build_in_place(UNet2DModel, config, device)


def _unet2d_cond(config):
    from diffusers import UNet2DConditionModel

    return lambda device: _build_in_place(UNet2DConditionModel, config, device)


def _reference(device):
    return tgpq.load_reference_model(device=device)


def model_spec(name: str) -> ModelSpec:
    if name == "reference":
        return ModelSpec(name, "shipped CIFAR-10 UNet (trained)", _reference, (3, 32, 32))
    if name == "ddpm-cifar10":
        return ModelSpec(name, "DDPM CIFAR-10 UNet, random weights", _unet2d(DDPM_CIFAR10_CONFIG), (3, 32, 32),
                         expected_params=DDPM_CIFAR10_PARAMS)
    if name == "sd15":
        return ModelSpec(name, "Stable Diffusion 1.5 UNet, random weights, 64x64x4 latents, random text [77, 768]",
                         _unet2d_cond(SD15_UNET_CONFIG), (4, 64, 64), SD15_TEXT_SHAPE, SD15_PARAMS)
    if name == "tiny-ddpm":
        return ModelSpec(name, "tiny DDPM-layout UNet (tests)", _unet2d(TINY_DDPM_CONFIG), (3, 16, 16))
    if name == "tiny-ldm":
        return ModelSpec(name, "tiny conditional UNet (tests)", _unet2d_cond(TINY_LDM_CONFIG), (4, 16, 16),
                         TINY_LDM_TEXT_SHAPE)
    raise ValueError(f"unknown model {name!r}: choose from {ALL_MODELS}")


def reference_model_available() -> str | None:
    """None when the shipped model loads, else the reason it does not."""
    try:
        tgpq.load_reference_model()
    except (FileNotFoundError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# A quick round-to-nearest QuantState (speed runs only)
# --------------------------------------------------------------------------------------------------

def random_inputs(spec: ModelSpec, batch: int, device, dtype, seed: int = 0):
    """Noise ``[batch, *sample_shape]`` and, for a conditional model, text embeddings ``[batch, L, D]``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *spec.sample_shape, generator=gen).to(device, dtype)
    text = None
    if spec.text_shape is not None:
        text = torch.randn(batch, *spec.text_shape, generator=gen).to(device, dtype)
    return x, text


def unet_kwargs(text) -> dict:
    return {} if text is None else {"encoder_hidden_states": text}


@torch.no_grad()
def quick_rtn_qstate(unet: torch.nn.Module, spec: ModelSpec, config: "tgpq.QuantConfig", seed: int = 0) -> QuantState:
    """Round-to-nearest ``QuantState`` for speed measurements.

    Weights: per-output-channel abs-max scales (no clipping search). Activations: for each timestep
    group, the abs-max of each quantized layer's input over one forward (batch 2) of random inputs at
    the group's middle timestep. Kept on the model's device; takes seconds even for SD 1.5.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    groups = config.num_groups
    table = uniform_timestep_groups(groups, config.num_train_timesteps)
    names = [n for n, m in unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not any(n.startswith(e) for e in config.exclude)]
    amax = {n: torch.zeros(groups, device=device) for n in names}
    current = {"g": 0}

    def record(name):
        def hook(mod, inp, out):
            g = current["g"]
            amax[name][g] = torch.maximum(amax[name][g], inp[0].detach().abs().amax().float())
        return hook

    hooks = [unet.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        for g in range(groups):
            current["g"] = g
            t = int((g + 0.5) * config.num_train_timesteps / groups)
            x, text = random_inputs(spec, 2, device, dtype, seed + g)
            unet(x, torch.tensor(t, device=device), **unet_kwargs(text))
    finally:
        for h in hooks:
            h.remove()
    layers = {}
    for n in names:
        w = unet.get_submodule(n).weight.detach().float()
        a = amax[n].cpu()
        a = torch.where(a > 0, a, a.max() if a.max() > 0 else torch.tensor(1.0))
        s = absmax_weight_scale(w, config.weight_bits)
        layers[n] = LayerQState(quantize_weight(w, s, config.weight_bits), s, act_scale_from_range(-a, a).to(device))
    return QuantState(config=config, timestep_to_group=table, layers=layers)


# --------------------------------------------------------------------------------------------------
# Variants: each builds a callable  denoise(x, t) -> eps  over a fixed batch
# --------------------------------------------------------------------------------------------------

class Denoiser:
    """``denoise(x, t)`` -> predicted noise for one batch; holds the model and the text embeddings."""

    def __init__(self, model, text):
        self.model, self.text = model, text

    def __call__(self, x, t):
        return self.model(x, t, **unet_kwargs(self.text)).sample


class GraphedDenoiser:
    """The UNet call captured in one CUDA graph for a fixed input shape; replays copy into static buffers."""

    def __init__(self, model, x, t, text):
        self.x, self.t = x.clone(), t.clone()
        self.text = text
        kw = unet_kwargs(text)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton autotuning, cuBLAS handles) outside capture
            for _ in range(3):
                model(self.x, self.t, **kw)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model(self.x, self.t, **kw).sample

    def __call__(self, x, t):
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out


@dataclass
class Variant:
    """How to turn the float model into the thing that is timed."""

    name: str
    dtype: torch.dtype
    bits: int | None = None  # tgpq weight bits, None for float / torchao
    backend: str = "auto"
    compile: bool = False
    cudagraph: bool = False
    torchao: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def needs_gpu(self) -> bool:
        return (self.dtype == torch.float16 or self.compile or self.cudagraph or self.torchao
                or (self.bits is not None and self.backend == "auto"))


def parse_variant(name: str) -> Variant:
    if name == "fp32-eager":
        return Variant(name, torch.float32)
    if name.startswith("fp16-"):
        mode = name.split("-", 1)[1]
        if mode not in ("eager", "compile", "cudagraph"):
            raise ValueError(f"unknown variant {name!r}")
        return Variant(name, torch.float16, compile=mode == "compile", cudagraph=mode == "cudagraph")
    m = re.fullmatch(r"tgpq-w([48])a8(?:-(cpu|reference|compile|cudagraph))?", name)
    if m:
        mode = m.group(2)
        if mode in ("cpu", "reference"):
            return Variant(name, torch.float32, bits=int(m.group(1)), backend=mode)
        return Variant(name, torch.float16, bits=int(m.group(1)), compile=mode == "compile",
                       cudagraph=mode == "cudagraph")
    if name in ("torchao-int8dq", "torchao-int8dq-compile"):
        return Variant(name, torch.float16, torchao=True, compile=name.endswith("-compile"))
    raise ValueError(f"unknown variant {name!r}: choose from {GPU_VARIANTS + CPU_VARIANTS + ('torchao-int8dq',)}")


def torchao_available() -> str | None:
    """None when torchao's int8 dynamic-activation config imports, else why not."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except Exception as e:  # torchao raises several types on a torch it was not built for
        return f"torchao not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def prepare_model(float_model: torch.nn.Module, spec: ModelSpec, variant: Variant, device) -> torch.nn.Module:
    """The model of ``variant`` on ``device`` (a new object; ``float_model``, the float32 master copy kept
    on the CPU so that it never counts in the device's peak memory, is left as is)."""
    import copy

    model = copy.deepcopy(float_model).to(device=device, dtype=variant.dtype)
    if variant.bits is not None:
        cfg = tgpq.QuantConfig(weight_bits=variant.bits, act_bits=8, method="rtn")
        qstate = quick_rtn_qstate(model, spec, cfg)
        model = tgpq.convert(model, qstate, backend=variant.backend, inplace=True)
    if variant.torchao:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model.eval()


def make_denoiser(model, variant: Variant, x, t, text):
    if variant.compile:
        return Denoiser(torch.compile(model, dynamic=False), text)
    if variant.cudagraph:
        return GraphedDenoiser(model, x, t, text)
    return Denoiser(model, text)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

class Clock:
    """Elapsed seconds of device work: CUDA events on CUDA, perf_counter (after the work) on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return start.elapsed_time(ev) / 1e3
        return time.perf_counter() - start


def make_scheduler(steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    return sched


def device_timesteps(sched, device) -> list:
    """The schedule's timesteps as separate 0-d int64 tensors on ``device`` (copied once, before timing;
    separate storages so torch.compile sees the same input layout at every step)."""
    return [t.to(device).clone() for t in sched.timesteps]


@torch.no_grad()
def ddim_loop(denoise, sched, x, timesteps_dev, timesteps_cpu, n: int | None = None):
    """Run the first ``n`` (default all) DDIM steps from ``x``; returns the last latent."""
    n = len(timesteps_cpu) if n is None else n
    for i in range(n):
        eps = denoise(x, timesteps_dev[i])
        x = sched.step(eps, timesteps_cpu[i], x, eta=0.0).prev_sample
    return x


@dataclass
class Timing:
    sampling_s: float  # median seconds for one whole DDIM run of the batch (maybe extrapolated)
    step_s: float  # median seconds of one step (UNet + scheduler)
    repeats: int  # whole runs timed (0 when extrapolated)
    steps_timed: int
    extrapolated: bool


def time_sampling(denoise, x0, steps: int, device, max_seconds: float, repeats: int) -> Timing:
    """Time DDIM sampling within ``max_seconds`` (warm-up already done by the caller)."""
    clock = Clock(device)
    sched = make_scheduler(steps)
    ts_cpu = sched.timesteps
    ts_dev = device_timesteps(sched, device)
    # one step measured alone tells how much fits in the budget
    step_times = []
    for i in range(min(3, steps)):
        c = clock.start()
        ddim_loop(denoise, sched, x0, ts_dev[i:i + 1], ts_cpu[i:i + 1])
        step_times.append(clock.stop(c))
    step = statistics.median(step_times)
    whole_runs = min(repeats, int(max_seconds / max(step * steps, 1e-9)))
    if whole_runs >= 1:
        runs = []
        for _ in range(whole_runs):
            c = clock.start()
            ddim_loop(denoise, sched, x0, ts_dev, ts_cpu)
            runs.append(clock.stop(c))
        return Timing(statistics.median(runs), statistics.median(runs) / steps, whole_runs, whole_runs * steps, False)
    extra = max(0, min(steps, int(max_seconds / max(step, 1e-9))) - len(step_times))
    for i in range(extra):
        j = (len(step_times) + i) % steps
        c = clock.start()
        ddim_loop(denoise, sched, x0, ts_dev[j:j + 1], ts_cpu[j:j + 1])
        step_times.append(clock.stop(c))
    step = statistics.median(step_times)
    return Timing(step * steps, step, 0, len(step_times), True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{cpu} ({n} thread{'s' if n > 1 else ''})"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def run_cell(float_model, spec: ModelSpec, variant: Variant, batch: int, args, device) -> dict:
    """Measure one (model, variant, batch). Never raises: failures are recorded as status."""
    rec = {"model": spec.name, "variant": variant.name, "batch": batch, "status": "ok"}
    cuda = device.type == "cuda"
    model = denoise = None
    try:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        before = torch.cuda.memory_allocated(device) if cuda else 0
        model = prepare_model(float_model, spec, variant, device)
        rec["weight_bytes"] = tgpq.weight_bytes(model)
        if cuda:  # what the model really holds on the device (torchao's tensor subclasses included)
            gc.collect()
            rec["device_model_bytes"] = torch.cuda.memory_allocated(device) - before
        x0, text = random_inputs(spec, batch, device, variant.dtype, seed=1)
        sched = make_scheduler(args.steps)
        ts_first = device_timesteps(sched, device)[:1]
        denoise = make_denoiser(model, variant, x0, ts_first[0], text)
        for _ in range(args.warmup):  # compile, autotune, caches
            ddim_loop(denoise, sched, x0, ts_first, sched.timesteps[:1])
        if cuda:
            torch.cuda.synchronize()
        rec["warmup_s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_sampling(denoise, x0, args.steps, device, args.max_seconds, args.repeats)
        rec.update(sampling_s=timing.sampling_s, step_ms=timing.step_s * 1e3, repeats=timing.repeats,
                   steps_timed=timing.steps_timed, extrapolated=timing.extrapolated,
                   s_per_image=timing.sampling_s / batch, images_per_s=batch / timing.sampling_s)
        rec["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) if cuda else None
    except torch.cuda.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:  # a failing variant must not end the benchmark
        rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        if args.verbose:
            traceback.print_exc()
    finally:
        del model, denoise
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
    return rec


# --------------------------------------------------------------------------------------------------
# Profile of the W8A8 run
# --------------------------------------------------------------------------------------------------

def profile_steps(float_model, spec: ModelSpec, variant: Variant, batch: int, device, steps: int = 2,
                  row_limit: int = 15) -> dict:
    """torch.profiler over ``steps`` DDIM steps of ``variant``: the top kernels by device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    model = prepare_model(float_model, spec, variant, device)
    x0, text = random_inputs(spec, batch, device, variant.dtype, seed=2)
    sched = make_scheduler(max(steps, 2))
    ts_dev = device_timesteps(sched, device)
    denoise = Denoiser(model, text)
    ddim_loop(denoise, sched, x0, ts_dev, sched.timesteps, 1)  # warm-up / autotune
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        ddim_loop(denoise, sched, x0, ts_dev, sched.timesteps, steps)
        if cuda:
            torch.cuda.synchronize()
    table = None
    for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=row_limit)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    events = [e for e in prof.key_averages()]

    def dev_time(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) if cuda \
            else e.self_cpu_time_total

    total = sum(dev_time(e) for e in events) or 1.0
    top = sorted(events, key=dev_time, reverse=True)[:row_limit]
    return {
        "model": spec.name, "variant": variant.name, "batch": batch, "steps": steps,
        "sorted_by": "self device time" if cuda else "self CPU time",
        "top": [{"name": e.key[:160], "calls": e.count, "self_time_us": dev_time(e),
                 "pct": 100.0 * dev_time(e) / total} for e in top],
        "table": table,
    }


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

def add_ratios(results: list[dict], baseline: str) -> None:
    """speedup / memory ratios against the baseline variant at the same model and batch."""
    base = {(r["model"], r["batch"]): r for r in results if r["variant"] == baseline and r["status"] == "ok"}
    for r in results:
        b = base.get((r["model"], r["batch"]))
        if r["status"] != "ok" or b is None:
            continue
        r["speedup_vs_baseline"] = b["sampling_s"] / r["sampling_s"]
        r["weight_mem_vs_baseline"] = r["weight_bytes"] / b["weight_bytes"]
        if r.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
            r["peak_mem_vs_baseline"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]
        if r.get("device_model_bytes") and b.get("device_model_bytes"):
            r["device_model_vs_baseline"] = r["device_model_bytes"] / b["device_model_bytes"]


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def markdown_report(doc: dict) -> str:
    lines = [f"# Sampling benchmark: {doc['device']}", "",
             f"{doc['date']}, torch {doc['torch']}, triton {doc['triton']}, commit {doc['git_commit']}, "
             f"DDIM {doc['steps']} steps, baseline `{doc['baseline']}`.", "", f"`{doc['command']}`", ""]
    if doc["mode"] == "cpu":
        lines += [f"**{GPU_NOTE}**", ""]
    for name, why in doc.get("skipped_models", {}).items():
        lines.append(f"- model `{name}` skipped: {why}")
    for model in dict.fromkeys(r["model"] for r in doc["results"]):
        info = doc["models"].get(model, {})
        lines += ["", f"## {model}: {info.get('description', '')} ({info.get('params', 0) / 1e6:.1f}M parameters)", "",
                  "| batch | variant | ms / image | images / s | speedup | peak MiB | weight MiB | weight x "
                  "| on-device model MiB | note |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in (r for r in doc["results"] if r["model"] == model):
            if r["status"] != "ok":
                lines.append(f"| {r['batch']} | {r['variant']} | - | - | - | - | - | - | - | {r['status']}: "
                             f"{r.get('error', '')[:80].replace('|', '/')} |")
                continue
            sp = r.get("speedup_vs_baseline")
            wx = r.get("weight_mem_vs_baseline")
            note = f"extrapolated from {r['steps_timed']} steps" if r["extrapolated"] else f"median of {r['repeats']}"
            lines.append(f"| {r['batch']} | {r['variant']} | {r['s_per_image'] * 1e3:.2f} | {r['images_per_s']:.1f} | "
                         f"{'-' if sp is None else f'{sp:.2f}x'} | {_mib(r.get('peak_mem_bytes'))} | "
                         f"{_mib(r['weight_bytes'])} | {'-' if wx is None else f'{1 / wx:.2f}x smaller'} | "
                         f"{_mib(r.get('device_model_bytes'))} | {note} |")
    for prof in doc.get("profiles", []):
        lines += ["", f"## Where the time goes: {prof['model']} {prof['variant']} batch {prof['batch']}, "
                      f"{prof['steps']} steps ({prof['sorted_by']})", "", "| % | self us | calls | kernel / op |",
                  "| ---: | ---: | ---: | --- |"]
        for k in prof["top"][:12]:
            lines.append(f"| {k['pct']:.1f} | {k['self_time_us']:.0f} | {k['calls']} | `{k['name'][:90]}` |")
    return "\n".join(lines) + "\n"


def plot_report(doc: dict, path: Path) -> None:
    """Per model: speedup vs the baseline (left) and peak / weight memory (right), grouped by batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        rs = [r for r in ok if r["model"] == model]
        batches = sorted({r["batch"] for r in rs})
        variants = list(dict.fromkeys(r["variant"] for r in rs))
        width = 0.8 / max(len(variants), 1)
        for vi, v in enumerate(variants):
            by_b = {r["batch"]: r for r in rs if r["variant"] == v}
            xs = [bi + vi * width for bi in range(len(batches))]
            sp = [by_b[b].get("speedup_vs_baseline", 0) if b in by_b else 0 for b in batches]
            axes[row][0].bar(xs, sp, width, label=v)
            mem = [(by_b[b].get("peak_mem_bytes") or by_b[b]["weight_bytes"]) / 2**20 if b in by_b else 0
                   for b in batches]
            axes[row][1].bar(xs, mem, width, label=v)
            if doc["mode"] == "gpu":  # weights as a dark inner bar inside the peak bar
                wts = [by_b[b]["weight_bytes"] / 2**20 if b in by_b else 0 for b in batches]
                axes[row][1].bar(xs, wts, width * 0.45, color="k", alpha=0.45,
                                 label="weights" if vi == 0 else None)
        for ax, title in ((axes[row][0], f"{model}: speedup vs {doc['baseline']}"),
                          (axes[row][1], f"{model}: {'peak (bar) / weight (inner) ' if doc['mode'] == 'gpu' else 'weight '}"
                                         f"memory (MiB)")):
            ax.set_xticks([bi + 0.4 - width / 2 for bi in range(len(batches))], [f"batch {b}" for b in batches])
            ax.set_title(title, fontsize=10)
        axes[row][0].axhline(1.0, color="k", lw=0.8)
        axes[row][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"DDIM {doc['steps']}-step sampling on {doc['device']}" +
                 (" (CPU mode: GPU numbers need a GPU)" if doc["mode"] == "cpu" else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def write_outputs(doc: dict, out_dir: Path, stem: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{stem}{suffix}" for k, suffix in
             (("json", ".json"), ("md", ".md"), ("png", ".png"), ("profile", "-profile.txt"))}
    profiles = doc.get("profiles", [])
    serial = dict(doc, profiles=[{k: v for k, v in p.items() if k != "table"} for p in profiles])
    paths["json"].write_text(json.dumps(serial, indent=1, default=str))
    paths["md"].write_text(markdown_report(doc))
    if profiles:
        paths["profile"].write_text("\n\n".join(
            f"== {p['model']} {p['variant']} batch {p['batch']} ({p['steps']} steps) ==\n{p['table']}" for p in profiles))
    return paths


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None,
                   help="default GPU: reference ddpm-cifar10 sd15; CPU: reference ddpm-cifar10; --quick: tiny-ddpm tiny-ldm")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="default GPU: 1 16 64 256; CPU: 1 2; --quick: 1")
    p.add_argument("--variants", nargs="+", default=None, help=f"default GPU: {' '.join(GPU_VARIANTS)}; "
                   f"CPU: {' '.join(CPU_VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default GPU 100, CPU 3, --quick 2)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="timing budget per (model, batch, variant), warm-up excluded (default GPU 8, CPU 20)")
    p.add_argument("--total-seconds", type=float, default=540.0,
                   help="start no new cell after this many seconds (default 540: fits one 10-minute GPU call)")
    p.add_argument("--repeats", type=int, default=3, help="whole sampling runs per cell, budget allowing (median)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up DDIM steps per cell (not timed)")
    p.add_argument("--profile-batch", type=int, default=None,
                   help="batch of the profiled W8A8 run (default: the largest batch measured)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run in seconds (tiny models, batch 1, 2 steps, 1 thread)")
    p.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA is available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    p.add_argument("--tag", default=None, help="appended to the output file names")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing cells")
    return p


def resolve_args(args) -> str:
    """Fill the mode-dependent defaults; returns the mode ("gpu" or "cpu")."""
    mode = "gpu" if torch.cuda.is_available() and not args.cpu and not args.quick else "cpu"
    if args.quick:
        args.models = args.models or ["tiny-ddpm", "tiny-ldm"]
        args.batches = args.batches or [1]
        args.steps = args.steps or 2
        args.repeats = min(args.repeats, 1)
        args.warmup = min(args.warmup, 1)
        args.max_seconds = args.max_seconds or 5.0
        args.variants = args.variants or list(CPU_VARIANTS)
        # one thread: on a shared CPU, OpenMP threads spinning against other processes made a
        # tiny-model step ~100x slower (measured here at load 10 on 2 cores)
        args.threads = args.threads or 1
    if mode == "gpu":
        args.models = args.models or ["reference", "ddpm-cifar10", "sd15"]
        args.batches = args.batches or [256, 64, 16, 1]  # the headline batch first
        args.steps = args.steps or 100
        args.max_seconds = args.max_seconds or 8.0
        args.variants = args.variants or list(GPU_VARIANTS)
    else:
        args.models = args.models or ["reference", "ddpm-cifar10"]
        args.batches = args.batches or [1, 2]
        args.steps = args.steps or 3
        args.max_seconds = args.max_seconds or 20.0
        args.variants = args.variants or list(CPU_VARIANTS)
    if args.steps < 1 or any(b < 1 for b in args.batches) or args.max_seconds <= 0:
        raise ValueError("--steps, --batches and --max-seconds must be positive")
    for v in args.variants:
        var = parse_variant(v)
        if mode == "cpu" and var.needs_gpu:
            raise ValueError(f"variant {v!r} needs a GPU; CPU variants: {' '.join(CPU_VARIANTS)}")
    return mode


def main(argv=None) -> dict:
    """Run the benchmark; ``argv`` as on the command line (default ``sys.argv[1:]``). Returns the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `tgpq bench -- --quick ...` hands the separator through
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    mode = resolve_args(args)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # `.to(float16)` warns on every model copy
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    if mode == "cpu":
        print(GPU_NOTE, flush=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    stem = f"sampling-{device_slug(device)}-{now:%Y%m%d-%H%M}" + (f"-{args.tag}" if args.tag else "")
    doc = {
        "benchmark": "sampling", "mode": mode, "device": device_name(device), "device_slug": device_slug(device),
        "date": now.isoformat(timespec="seconds"), "torch": torch.__version__, "triton": _version("triton"),
        "diffusers": _version("diffusers"), "torchao": _version("torchao") if torchao_available() is None else None,
        "python": platform.python_version(), "git_commit": git_commit(),
        "command": " ".join(["bench_sampling.py"] + argv),
        "steps": args.steps, "batches": args.batches, "variants": args.variants, "max_seconds": args.max_seconds,
        "threads": torch.get_num_threads(), "baseline": BASELINE[mode],
        "note": GPU_NOTE if mode == "cpu" else "CUDA events, warm-up excluded, median of repeats",
        "qstate": "round-to-nearest, abs-max weight scales, activation abs-max per timestep group (speed only)",
        "models": {}, "skipped_models": {}, "results": [], "profiles": [],
    }
    out_dir = Path(args.out)
    t_start = time.perf_counter()
    ao_missing = torchao_available()
    from tqdm.auto import tqdm

    for name in args.models:
        if name == "reference":
            why = reference_model_available()
            if why is not None:
                print(f"skipping model 'reference': {why}", flush=True)
                doc["skipped_models"][name] = why
                continue
        spec = model_spec(name)
        float_model = spec.build(device).to("cpu")  # built on the device (fast), kept on the CPU
        n_params = param_count(float_model)
        if spec.expected_params is not None and n_params != spec.expected_params:
            raise RuntimeError(f"{name}: built {n_params} parameters, the published model has {spec.expected_params}")
        doc["models"][name] = {"description": spec.description, "params": n_params,
                               "sample_shape": list(spec.sample_shape),
                               "text_shape": list(spec.text_shape) if spec.text_shape else None}
        print(f"model {name}: {n_params / 1e6:.2f}M parameters", flush=True)
        cells = [(v, b) for b in args.batches for v in args.variants]  # each batch a complete comparison
        for vname, batch in tqdm(cells, desc=name, unit="cell"):
            variant = parse_variant(vname)
            left = args.total_seconds - (time.perf_counter() - t_start)
            if left <= 0 or (variant.compile and left < COMPILE_RESERVE_S):
                rec = {"model": name, "variant": vname, "batch": batch, "status": "skipped",
                       "error": f"--total-seconds {args.total_seconds:.0f}: {max(left, 0):.0f} s left"}
            elif variant.torchao and ao_missing:
                rec = {"model": name, "variant": vname, "batch": batch, "status": "skipped", "error": ao_missing}
            else:
                rec = run_cell(float_model, spec, variant, batch, args, device)
            doc["results"].append(rec)
            add_ratios(doc["results"], BASELINE[mode])
            write_outputs(doc, out_dir, stem)
            if rec["status"] == "ok":
                tqdm.write(f"  {name} b={batch:<4d} {vname:24s} {rec['s_per_image'] * 1e3:9.2f} ms/img "
                           f"{rec['images_per_s']:9.1f} img/s  x{rec.get('speedup_vs_baseline', float('nan')):.2f}")
            else:
                tqdm.write(f"  {name} b={batch:<4d} {vname:24s} {rec['status']}: {rec.get('error', '')[:120]}")
        prof_variant = PROFILE_VARIANT[mode]
        done = [r["batch"] for r in doc["results"] if r["model"] == name and r["variant"] == prof_variant
                and r["status"] == "ok"]
        if not args.no_profile and done and time.perf_counter() - t_start <= args.total_seconds:
            pb = args.profile_batch or max(done)
            try:
                doc["profiles"].append(profile_steps(float_model, spec, parse_variant(prof_variant), pb, device))
            except Exception as e:  # the profile is a report, not a measurement: never fatal
                doc["profiles"].append({"model": name, "variant": prof_variant, "batch": pb, "steps": 0,
                                        "sorted_by": "-", "top": [], "table": f"profiling failed: {e}"})
        del float_model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_ratios(doc["results"], BASELINE[mode])
    doc["elapsed_s"] = time.perf_counter() - t_start
    paths = write_outputs(doc, out_dir, stem)
    try:
        plot_report(doc, paths["png"])
    except Exception as e:  # pragma: no cover - a plotting failure must not lose the numbers
        print(f"plot failed: {e}", file=sys.stderr)
    print(markdown_report(doc))
    print(f"wrote {paths['json']}, {paths['md'].name}, {paths['png'].name}", flush=True)
    if mode == "cpu":
        print(GPU_NOTE, flush=True)
    doc["paths"] = {k: str(v) for k, v in paths.items()}
    return doc


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"bench_sampling: error: {e}", file=sys.stderr)
        sys.exit(2)
