"""``tgpq demo``: the shipped CIFAR-10 model, float vs quantized, on this machine.

Loads the reference model, calibrates it (fast setting by default), converts it, samples the same
seeds with both models and reports model size, sampling time and peak memory, PSNR / SSIM vs the
float images and the feature-space Frechet distance of both; saves a comparison grid PNG.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def _fmt_mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def run_demo(out_dir="tgpq-demo", bits: str = "W8A8", method: str = "gac", num_images: int = 64,
             steps: int = 50, seed: int = 0, fast: bool = True, device: str | None = None) -> dict:
    from diffusers import DDIMScheduler

    from . import metrics
    from .calibration import calibrate, collect_calibration
    from .unet import convert, load_reference_model, weight_bytes
    from .eval import ddim_sample, measure, save_grid
    from .recipe import QuantConfig, parse_bits

    wb, ab = parse_bits(bits)
    if num_images < 2 or steps < 1:
        raise ValueError("the demo needs at least 2 images and 1 step")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: the demo's output folder is not writable")
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = load_reference_model(device=device)
    print(f"reference model: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, device {device}")

    # Calibration: fast = fewer trajectories and steps, paper-size otherwise.
    # fast: 16 trajectories x 10 kept steps, 40 iterations, 3 gac weight steps per block (minutes on 2 cores)
    n_traj, n_steps, iters, wsteps = (16, 50, 40, 3) if fast else (256, 100, 2000, 10)
    t0 = time.perf_counter()
    calib = collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=n_traj,
                                num_steps=n_steps, interval=5, seed=seed + 1)
    cfg = QuantConfig(weight_bits=wb, act_bits=ab, method=method, iters=iters, weight_steps=wsteps, seed=seed)
    qstate = calibrate(unet, calib, cfg)
    calib_s = time.perf_counter() - t0
    qunet = convert(unet, qstate)
    print(f"calibrated {len(qstate.layers)} layers ({method}, W{wb}A{ab}) in {calib_s:.0f} s")

    def sample(model):
        return ddim_sample(model, num_images, steps, seed=seed, batch_size=num_images, device=device, dtype=dtype)

    sample(unet) if device == "cuda" else None  # warm-up (CUDA kernels)
    x_fp, t_fp, m_fp = measure(lambda: sample(unet), device)
    x_q, t_q, m_q = measure(lambda: sample(qunet), device)

    report = {
        "device": device, "bits": f"W{wb}A{ab}", "method": method, "images": num_images, "ddim_steps": steps,
        "calibration_seconds": calib_s,
        "model_bytes": {"fp32": weight_bytes(unet), "quantized": weight_bytes(qunet)},
        "sampling_seconds": {"fp": t_fp, "quantized": t_q},
        # weights + the peak of memory allocated while sampling (activations, workspaces)
        "peak_memory_bytes": {"fp": weight_bytes(unet) + m_fp, "quantized": weight_bytes(qunet) + m_q},
        "psnr_vs_fp_db": float(metrics.psnr(x_q, x_fp)),
        "ssim_vs_fp": float(metrics.ssim(x_q, x_fp)),
        "feature_frechet": {"fp": float(metrics.feature_frechet_distance(x_fp)),
                            "quantized": float(metrics.feature_frechet_distance(x_q))},
    }
    grid = torch.cat([x_fp[:32], x_q[:32]]) if num_images >= 32 else torch.cat([x_fp, x_q])
    save_grid(grid, out / "fp_vs_quantized.png", nrow=8)
    (out / "report.json").write_text(json.dumps(report, indent=2))

    mb = report["model_bytes"]
    print()
    print(f"{'':24}{'float':>14}{'quantized':>14}")
    print(f"{'model size':24}{_fmt_mb(mb['fp32']):>14}{_fmt_mb(mb['quantized']):>14}   ({mb['fp32'] / mb['quantized']:.2f}x smaller)")
    print(f"{'sampling time':24}{t_fp:>13.2f}s{t_q:>13.2f}s   ({t_fp / t_q:.2f}x, {num_images} images x {steps} DDIM steps)")
    pm = report["peak_memory_bytes"]
    print(f"{'peak memory (sampling)':24}{_fmt_mb(pm['fp']):>14}{_fmt_mb(pm['quantized']):>14}   (weights + activations)")
    ff = report["feature_frechet"]
    print(f"{'feature Frechet dist.':24}{ff['fp']:>14.2f}{ff['quantized']:>14.2f}")
    print(f"PSNR vs float: {report['psnr_vs_fp_db']:.2f} dB, SSIM vs float: {report['ssim_vs_fp']:.4f}")
    print(f"grid (top 4 rows float, bottom 4 quantized, same seeds): {out / 'fp_vs_quantized.png'}")
    return report
