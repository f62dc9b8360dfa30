r"""End-to-end DDIM sampling benchmark: speed and memory of quantized diffusion sampling.

    tgpq bench                                               # everything this machine can run
    tgpq bench --models ddpm-cifar10 --batches 1 256
    python benchmarks/bench_sampling.py --quick              # the same, from a checkout

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

Outputs under ``--out`` (default ``benchmarks/results/`` from a checkout's root, else ``./tgpq-bench``), all named ``sampling-<device>-<date>``:
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
``--compile-reserve-s`` (default 150) left; skipped cells are recorded as such. Most of the time goes to
warm-ups (torch.compile: ~40 s for the DDPM UNet, 1-2 min for SD 1.5, per batch size; Triton autotuning).

CPU mode (no CUDA): a reduced run (batches 1-2, 3 steps, the reference and DDPM UNets) whose numbers
describe this CPU only: GPU numbers need a GPU. ``--quick`` runs the tiny models at batch 1 with 2
steps in seconds.
"""
from .models import (DDPM_CIFAR10_CONFIG, DDPM_CIFAR10_PARAMS, SD15_PARAMS, SD15_UNET_CONFIG, model_spec,
                     param_count)
from .report import add_ratios, markdown_report, plot_report
from .run import main

__all__ = ["DDPM_CIFAR10_CONFIG", "DDPM_CIFAR10_PARAMS", "SD15_PARAMS", "SD15_UNET_CONFIG", "model_spec", "param_count",
           "add_ratios", "markdown_report", "plot_report", "main"]
