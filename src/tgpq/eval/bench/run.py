"""The sampling benchmark's cells (one model x batch x variant), the W8A8 profile and the command line."""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from ... import unet as tgpq_unet
from .models import ALL_MODELS, ModelSpec, model_spec, param_count, random_inputs, reference_model_available
from .report import (add_ratios, device_name, device_slug, git_commit, markdown_report, plot_report, version,
                     write_outputs)
from .timing import ddim_loop, device_timesteps, make_scheduler, time_sampling
from .variants import (BASELINE, COMPILE_RESERVE_S, CPU_VARIANTS, GPU_NOTE, GPU_VARIANTS, PROFILE_VARIANT, Denoiser,
                       Variant, make_denoiser, parse_variant, prepare_model, torchao_available)

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
        rec["weight_bytes"] = tgpq_unet.weight_bytes(model)
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
# Main
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgpq bench", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="End-to-end DDIM sampling benchmark: speed and memory of quantized "
                                            "diffusion sampling (tgpq/eval/bench/__init__.py says what it measures).")
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
    p.add_argument("--compile-reserve-s", type=float, default=COMPILE_RESERVE_S,
                   help=f"start no torch.compile cell with less than this left of --total-seconds (default "
                        f"{COMPILE_RESERVE_S:.0f}: SD 1.5 compiles in 1-2 min; the DDPM UNet needs less)")
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
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results from a checkout's root, "
                   "else ./tgpq-bench)")
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


def default_out_dir() -> Path:
    """``benchmarks/results`` when run from a checkout's root, else ``./tgpq-bench``."""
    return Path("benchmarks/results") if Path("benchmarks").is_dir() else Path("tgpq-bench")


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
        "date": now.isoformat(timespec="seconds"), "torch": torch.__version__, "triton": version("triton"),
        "diffusers": version("diffusers"), "torchao": version("torchao") if torchao_available() is None else None,
        "python": platform.python_version(), "git_commit": git_commit(),
        "command": " ".join(["bench_sampling.py"] + argv),
        "steps": args.steps, "batches": args.batches, "variants": args.variants, "max_seconds": args.max_seconds,
        "threads": torch.get_num_threads(), "baseline": BASELINE[mode],
        "note": GPU_NOTE if mode == "cpu" else "CUDA events, warm-up excluded, median of repeats",
        "qstate": "round-to-nearest, abs-max weight scales, activation abs-max per timestep group (speed only)",
        "models": {}, "skipped_models": {}, "results": [], "profiles": [],
    }
    out_dir = Path(args.out) if args.out else default_out_dir()
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
            if left <= 0 or (variant.compile and left < args.compile_reserve_s):
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

