"""Calibration quality: rtn / uniform / gac at W8A8 and W4A8 on the reference model.

For every (bits, method): calibrate on one calibration set (same for all), convert with the
``reference`` backend (dequantize + float compute: the oracle of the kernels), then compare with the
FP model from the same evaluation seeds (disjoint from the calibration seeds):

* per-timestep-group noise-prediction MSE: along the FP model's DDIM trajectories, the quantized
  and FP models predict the noise from the same ``x_t``; MSE averaged per timestep group;
* PSNR of the final images (each model samples its own trajectory from the same noise);
* the feature Frechet distance of ``tgpq.metrics`` (classifier features vs CIFAR-10 train
  statistics) when its assets are there, for FP and quantized images;
* calibration wall time and the peak resident-memory increase during calibration (RSS polled
  every 20 ms from ``/proc/self/statm``; tensor memory is not visible to tracemalloc).

Without the shipped reference weights (``tgpq.load_reference_model``) the script falls back to a
randomly initialised model of the reference architecture and says so in the table (MSE and PSNR
still compare quantized with FP; the Frechet distance is then meaningless and left out).

    nice -n 10 python benchmarks/calibration_quality.py            # small CPU setting (minutes)
    python benchmarks/calibration_quality.py --traj 64 --iters 200 --images 256
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # tgpq itself is the installed package (README: install)

import tgpq  # noqa: E402
from tgpq import QuantConfig  # noqa: E402
from tgpq.calibration import calibrate, collect_calibration, fake_quant_model  # noqa: E402
from tgpq.nn.routing import group_of  # noqa: E402


class PeakRSS:
    """Peak resident set size (bytes) of this process while the context is open, polled."""

    def __init__(self, every_s: float = 0.02):
        self.every_s = every_s
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self._rss()
        self.peak = self.start
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(self.every_s)
        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def increase(self) -> int:
        return self.peak - self.start


def load_model(device="cpu"):
    try:
        return tgpq.load_reference_model(device=device), "reference model (tgpq.load_reference_model)"
    except (FileNotFoundError, ValueError) as e:
        from tgpq.unet.loading import REFERENCE_ARCHITECTURE, build_unet

        torch.manual_seed(0)
        print(f"reference weights unavailable ({e}); using a randomly initialised reference architecture")
        return (build_unet(dict(REFERENCE_ARCHITECTURE)).eval().to(device),
                "random-init reference architecture (no weights shipped yet)")


def add_calibration_args(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """The calibration-set and reconstruction options (also used by quality.py, whose ``--batch-size``
    is the sampling batch: it passes ``batch_flag="--calib-batch-size"``)."""
    p.add_argument("--traj", type=int, default=16, help="calibration trajectories")
    p.add_argument("--calib-steps", type=int, default=50, help="DDIM steps of the calibration trajectories")
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--iters", type=int, default=40, help="reconstruction iterations per block")
    p.add_argument("--weight-steps", type=int, default=3, help="gac logit updates per block")
    p.add_argument("--lr-adaround", type=float, default=3e-2,
                   help="AdaRound lr (3e-2: BRECQ's 1e-3 is for 20k iterations; see the calibration notes)")
    p.add_argument(batch_flag, dest="calib_batch_size", type=int, default=32, help="reconstruction mini-batch")
    p.add_argument("--block-inputs", choices=["fp", "quantized"], default="quantized",
                   help="reconstruction inputs: the float model's, or the model with earlier blocks quantized")


def collect_calibration_set(unet, a, progress: bool = True):
    """The one calibration set every (bits, method) shares: ``a.traj`` DDIM trajectories (seed 1000)."""
    from diffusers import DDIMScheduler

    return collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=a.traj,
                               num_steps=a.calib_steps, interval=a.interval, seed=1000, batch_size=64,
                               progress=progress)


def quant_config(a, bits: str, method: str) -> QuantConfig:
    from tgpq.recipe import parse_bits

    wb, ab = parse_bits(bits)
    return QuantConfig(weight_bits=wb, act_bits=ab, method=method, iters=a.iters, batch_size=a.calib_batch_size,
                       weight_steps=a.weight_steps, lr_adaround=a.lr_adaround,
                       block_inputs=getattr(a, "block_inputs", "quantized"), seed=0)


def timed_calibrate(unet, calib, cfg: QuantConfig, progress: bool = True):
    """``(qstate, wall seconds, peak RSS increase in bytes)`` of ``calibrate(unet, calib, cfg)``."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        qstate = calibrate(unet, calib, cfg, progress=progress)
        seconds = time.perf_counter() - t0
    return qstate, seconds, mem.increase


def calibration_setting(a, calib) -> str:
    """One sentence stating the calibration set and the reconstruction options."""
    return (f"{len(calib)} samples ({a.traj} trajectories x {calib.kept_timesteps.numel()} kept steps of "
            f"{a.calib_steps}-step DDIM) + {calib.val_x.shape[0]} validation; iters {a.iters}, gac weight steps "
            f"{a.weight_steps}, lr_adaround {a.lr_adaround}, batch {a.calib_batch_size}, "
            f"block inputs {getattr(a, 'block_inputs', 'quantized')}")


def quantized(unet, qstate):
    try:
        return tgpq.convert(unet, qstate, backend="reference"), "convert(reference)"
    except Exception as e:  # noqa: BLE001 - fall back to our simulation, and say so
        print(f"convert failed ({e}); evaluating with tgpq.calibration.fake_quant_model")
        return fake_quant_model(unet, qstate), "fake_quant_model"


@torch.no_grad()
def eval_against_fp(unet, qunet, table, num_groups, num_images, steps, seed):
    """Per-group eps MSE along the FP trajectories, and both models' final images."""
    from diffusers import DDIMScheduler
    from tgpq.eval.sampling import ddim_sample, initial_noise

    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x = initial_noise(num_images, shape, seed)
    sums = torch.zeros(num_groups, dtype=torch.float64)
    counts = torch.zeros(num_groups, dtype=torch.float64)
    for t in sched.timesteps:
        e_fp = unet(x, t).sample
        e_q = qunet(x, t).sample
        g = int(group_of(t, table))
        sums[g] += float((e_q - e_fp).pow(2).mean())
        counts[g] += 1
        x = sched.step(e_fp, t, x).prev_sample
    fp_images = x.clamp(-1, 1)
    q_images = ddim_sample(qunet, num_images, steps, seed=seed, batch_size=num_images, progress=False)
    mse = [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())]  # None: no step in group
    return mse, fp_images, q_images


def frechet(images):
    try:
        from tgpq.metrics import feature_frechet_distance
        return float(feature_frechet_distance(images))
    except Exception as e:  # noqa: BLE001 - metric assets may be missing
        print(f"feature Frechet distance unavailable: {e}")
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_calibration_args(p)
    p.add_argument("--images", type=int, default=32, help="evaluation images")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the evaluation")
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--methods", nargs="+", default=["rtn", "uniform", "gac"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration_quality"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from tgpq.metrics import psnr

    unet, model_desc = load_model()
    n_params = sum(p.numel() for p in unet.parameters())
    t0 = time.perf_counter()
    calib = collect_calibration_set(unet, a)
    collect_s = time.perf_counter() - t0
    print(f"{model_desc}: {n_params / 1e6:.2f}M params; calibration set {len(calib)} + {calib.val_x.shape[0]} "
          f"samples in {collect_s:.1f} s")

    rows = []
    fp_fd = None
    for bits in a.bits:
        for method in a.methods:
            cfg = quant_config(a, bits, method)
            qstate, calib_s, rss_increase = timed_calibrate(unet, calib, cfg)
            if method == "gac":
                from tgpq.calibration import plot_sample_weights
                png = Path(a.out).parent / f"{Path(a.out).name}_gac_{bits}_weights.png"
                plot_sample_weights(qstate, png)
                print(f"sample weights plotted to {png}")
            qunet, path = quantized(unet, qstate)
            mse, fp_img, q_img = eval_against_fp(unet, qunet, qstate.timestep_to_group, cfg.num_groups,
                                                 a.images, a.sample_steps, seed=0)
            real_model = model_desc.startswith("reference model")
            if fp_fd is None and real_model:
                fp_fd = frechet(fp_img)
            block_ratio = [m["final"] / m["rtn"] for m in qstate.block_mse.values() if "final" in m]
            row = {
                "bits": bits, "method": method, "eval": path,
                "eps_mse_per_group": mse, "eps_mse_mean": sum(v for v in mse if v is not None) / max(1, sum(v is not None for v in mse)),
                "psnr_vs_fp_db": float(psnr(q_img, fp_img)),
                "feature_fd": frechet(q_img) if real_model else None,
                "calib_seconds": calib_s, "calib_peak_rss_increase_mb": rss_increase / 2**20,
                "mean_block_mse_ratio_final_over_rtn": (sum(block_ratio) / len(block_ratio)) if block_ratio else None,
            }
            rows.append(row)
            print(json.dumps(row))

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_desc, "params": n_params, "calibration_samples": len(calib),
            "validation_samples": int(calib.val_x.shape[0]), "collect_seconds": collect_s,
            "fp_feature_fd": fp_fd, "args": vars(a), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    g = len(rows[0]["eps_mse_per_group"])
    lines = [f"# Calibration quality ({model_desc}, {n_params / 1e6:.2f}M params)", "",
             f"Calibration: {calibration_setting(a, calib)}. Evaluation: {a.images} images, "
             f"{a.sample_steps}-step DDIM, seeds disjoint from calibration; {torch.get_num_threads()} threads. "
             f"eps MSE per timestep group (group 0 = lowest t). FP feature FD: {fp_fd}.", "",
             "| bits | method | " + " | ".join(f"eps MSE g{i}" for i in range(g)) +
             " | eps MSE mean | PSNR vs FP (dB) | feature FD | calib s | calib peak RSS +MB | block MSE final/rtn |",
             "|" + "---|" * (g + 8)]
    for r in rows:
        fd = "n/a" if r["feature_fd"] is None else f"{r['feature_fd']:.2f}"
        ratio = "-" if r["mean_block_mse_ratio_final_over_rtn"] is None else f"{r['mean_block_mse_ratio_final_over_rtn']:.3f}"
        lines.append(f"| {r['bits']} | {r['method']} | " + " | ".join("-" if v is None else f"{v:.2e}" for v in r["eps_mse_per_group"]) +
                     f" | {r['eps_mse_mean']:.2e} | {r['psnr_vs_fp_db']:.2f} | {fd} | {r['calib_seconds']:.1f} | "
                     f"{r['calib_peak_rss_increase_mb']:.0f} | {ratio} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
