"""The ``tgpq`` command line: demo, calibrate, sample, evaluate, bench, info.

Errors a user can cause (bad paths, bad bit specs, bad settings, corrupt files, unwritable outputs) print
one line ``tgpq: error: ...`` and exit with status 2; no traceback. Outputs are checked before the work.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(a):
    from .demo import run_demo

    run_demo(out_dir=a.out, bits=a.bits, method=a.method, num_images=a.num, steps=a.steps, seed=a.seed,
             fast=not a.full)


def _check_checkpoint_folder(path: str) -> None:
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--checkpoint {path}: exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--checkpoint {path}: its parent folder {parent} is missing or not writable")


def _cmd_calibrate(a):
    import torch

    from .calibration import calibrate, collect_calibration
    from .recipe import QuantConfig, parse_bits
    from .unet import convert, load_unet, save
    from .unet.serialization import check_output_path

    wb, ab = parse_bits(a.bits)
    cfg = QuantConfig(weight_bits=wb, act_bits=ab, method=a.method, iters=a.iters, seed=a.seed)
    if a.trajectories < 1 or a.steps < 1 or (a.interval is not None and a.interval < 1):
        raise ValueError("--trajectories, --steps and --interval must be positive")
    check_output_path(a.out)
    if a.checkpoint:
        _check_checkpoint_folder(a.checkpoint)
    unet = load_unet(a.model)
    from diffusers import DDIMScheduler

    torch.manual_seed(a.seed)
    calib = collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=a.trajectories,
                                num_steps=a.steps, interval=a.interval, seed=a.seed)
    qstate = calibrate(unet, calib, cfg, checkpoint_path=a.checkpoint or None)
    save(convert(unet, qstate), a.out)
    print(f"saved {a.out}")


def _load_any(spec: str):
    from .unet import load_unet

    if spec.endswith(".safetensors"):
        from .unet import load

        return load(spec)
    return load_unet(spec)


def _cmd_sample(a):
    from .eval import ddim_sample, save_grid
    from .unet.serialization import check_output_path

    if a.num < 1 or a.steps < 1 or a.batch_size < 1:
        raise ValueError("--num, --steps and --batch-size must be positive")
    check_output_path(a.out)
    model = _load_any(a.model)
    imgs = ddim_sample(model, a.num, a.steps, a.seed, batch_size=a.batch_size)
    save_grid(imgs, a.out)
    print(f"saved {a.out}")


def _cmd_evaluate(a):
    from . import metrics
    from .eval import ddim_sample

    fp = _load_any(a.reference)
    q = _load_any(a.model)
    x_fp = ddim_sample(fp, a.num, a.steps, a.seed)
    x_q = ddim_sample(q, a.num, a.steps, a.seed)
    print(f"PSNR vs FP: {float(metrics.psnr(x_q, x_fp)):.2f} dB   SSIM vs FP: {float(metrics.ssim(x_q, x_fp)):.4f}")
    print(f"feature Frechet distance: FP {metrics.feature_frechet_distance(x_fp):.2f}   "
          f"quantized {metrics.feature_frechet_distance(x_q):.2f}")


def _cmd_bench(a):
    from .eval.bench import main as bench_main

    bench_main(a.args)


def _cmd_info(a):
    from .unet.serialization import _read

    meta, tensors = _read(a.file)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    cfg = meta["quant_config"]
    print(f"{a.file}: {meta['unet_class']}, W{cfg['weight_bits']}A{cfg['act_bits']} ({cfg['method']}), "
          f"{len(meta['layers'])} quantized layers, {cfg['num_groups']} timestep groups, {nbytes / 1e6:.2f} MB")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tgpq", description="Quantize diffusion UNets: calibrate once, serve faster and smaller.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the shipped CIFAR-10 model, float vs quantized: images, speed, memory, quality")
    d.add_argument("--out", default="tgpq-demo", help="output folder (default: ./tgpq-demo)")
    d.add_argument("--bits", default="W8A8")
    d.add_argument("--method", default="gac", choices=["gac", "uniform", "rtn"])
    d.add_argument("--num", type=int, default=64, help="images per model")
    d.add_argument("--steps", type=int, default=50, help="DDIM steps")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--full", action="store_true", help="slower, paper-size calibration instead of the fast setting")
    d.set_defaults(func=_cmd_demo)

    c = sub.add_parser("calibrate", help="calibrate a UNet and save the quantized model")
    c.add_argument("--model", default="reference", help="'reference' or a local diffusers UNet folder")
    c.add_argument("--bits", default="W8A8", help="W8A8 or W4A8")
    c.add_argument("--method", default="gac", choices=["gac", "uniform", "rtn"])
    c.add_argument("--trajectories", type=int, default=64)
    c.add_argument("--steps", type=int, default=100)
    c.add_argument("--interval", type=int, default=None, help="keep every N-th step (default: about 20 kept steps)")
    c.add_argument("--iters", type=int, default=200)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--checkpoint", default=None, help="resume file for block-by-block progress")
    c.add_argument("--out", required=True, help="output .safetensors")
    c.set_defaults(func=_cmd_calibrate)

    s = sub.add_parser("sample", help="sample an image grid from a float or quantized model")
    s.add_argument("--model", default="reference", help="'reference', a diffusers folder, or a tgpq .safetensors")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=_cmd_sample)

    e = sub.add_parser("evaluate", help="quality of a quantized model against its float model (same seeds)")
    e.add_argument("--model", required=True, help="a tgpq .safetensors")
    e.add_argument("--reference", default="reference", help="the float model ('reference' or a folder)")
    e.add_argument("--num", type=int, default=256)
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_cmd_evaluate)

    b = sub.add_parser("bench", help="end-to-end sampling benchmark (tgpq.eval.bench)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser("info", help="describe a tgpq .safetensors file")
    i.add_argument("file")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark script
        rest = argv[1:]
        args = argparse.Namespace(func=_cmd_bench, args=rest[1:] if rest[:1] == ["--"] else rest)
    else:
        args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"tgpq: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tgpq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
