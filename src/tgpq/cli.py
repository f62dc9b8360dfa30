"""The ``tgpq`` command line: demo, calibrate, quantize, sample, evaluate, bench, info.

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


SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def _read_prompts(path: str) -> list[str]:
    import os

    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({e})") from None
    if not prompts:
        raise ValueError(f"--prompts {path}: holds no prompt (one prompt a line)")
    return prompts


def _cmd_quantize(a):
    import inspect
    import os

    from .recipe import QuantConfig, parse_bits
    from .unet.pipeline import is_pipeline, quantize
    from .unet.pretrained import check_output_folder, load_float_folder, save_pretrained

    wb, ab = parse_bits(a.bits)
    cfg = QuantConfig(weight_bits=wb, act_bits=ab, method=a.method, iters=a.iters, seed=a.seed)
    for name in ("trajectories", "steps", "batch_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if (a.interval is not None and a.interval < 1) or (a.val_trajectories is not None and a.val_trajectories < 0):
        raise ValueError("--interval must be positive and --val-trajectories >= 0")
    if os.path.abspath(a.out) == os.path.abspath(a.model):
        raise ValueError(f"--out {a.out}: is the model folder; write the quantized model elsewhere")
    check_output_folder(a.out)
    if a.checkpoint:
        _check_checkpoint_folder(a.checkpoint)
    prompts = _read_prompts(a.prompts) if a.prompts else None
    model = load_float_folder(a.model)
    kw = dict(num_inference_steps=a.steps, num_trajectories=a.trajectories, interval=a.interval, seed=a.seed,
              batch_size=a.batch_size, num_val_trajectories=a.val_trajectories, checkpoint_path=a.checkpoint or None)
    if is_pipeline(model):
        if a.scheduler:
            raise ValueError("--scheduler is for a UNet folder: a pipeline samples with its own scheduler")
        takes = inspect.signature(model.__call__).parameters
        if "prompt" in takes and prompts is None:
            raise ValueError(f"{a.model}: a text-to-image pipeline: pass --prompts FILE (one prompt a line)")
        if "prompt" not in takes and (prompts is not None or a.guidance_scale is not None):
            raise ValueError(f"{a.model}: {type(model).__name__} takes no prompts: drop --prompts / --guidance-scale")
        for name in ("height", "width"):
            if getattr(a, name) is not None:
                kw[name] = getattr(a, name)
        q = quantize(model, cfg, prompts=prompts, guidance_scale=a.guidance_scale, **kw)
    else:
        if prompts is not None or a.guidance_scale is not None:
            raise ValueError(f"{a.model}: a UNet folder samples without prompts; quantize its pipeline folder to "
                             f"calibrate on prompts")
        if getattr(model.config, "cross_attention_dim", None) is not None:
            raise ValueError(f"{a.model}: a text-conditioned UNet needs its text encoder: quantize the pipeline "
                             f"folder (model_index.json) with --prompts")
        import diffusers

        sched = getattr(diffusers, SCHEDULERS[a.scheduler or "ddim"])(num_train_timesteps=1000)
        q = quantize(model, cfg, scheduler=sched, **kw)
    save_pretrained(q, a.out)
    print(f"saved {a.out}")


def _load_any(spec: str):
    import json
    import os

    from .unet import load_unet

    if spec.endswith(".safetensors"):
        from .unet import load

        return load(spec)
    cfg = os.path.join(spec, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                quantized = "quantization_config" in json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{cfg}: not valid JSON ({e})") from None
        if quantized:  # a folder written by tgpq.save_pretrained
            from .unet import from_pretrained

            return from_pretrained(spec)
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

    q = sub.add_parser("quantize", help="quantize a diffusers pipeline or UNet folder into a diffusers-style folder")
    q.add_argument("--model", required=True, help="a float diffusers pipeline folder (model_index.json) or UNet folder")
    q.add_argument("--bits", default="W8A8", help="W8A8 or W4A8")
    q.add_argument("--method", default="gac", choices=["gac", "uniform", "rtn"])
    q.add_argument("--out", required=True, help="output folder (tgpq.from_pretrained reads it)")
    q.add_argument("--prompts", default=None, help="text file, one calibration prompt a line (text-to-image pipelines)")
    q.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    q.add_argument("--steps", type=int, default=50, help="sampling steps of each calibration run")
    q.add_argument("--trajectories", type=int, default=16, help="calibration runs (images)")
    q.add_argument("--val-trajectories", type=int, default=None,
                   help="validation runs (default: enough for 8 samples in every timestep group)")
    q.add_argument("--interval", type=int, default=None, help="keep every N-th UNet call (default: about 20 kept)")
    q.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    q.add_argument("--height", type=int, default=None)
    q.add_argument("--width", type=int, default=None)
    q.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help="for a UNet folder only (default ddim); a pipeline uses its own")
    q.add_argument("--iters", type=int, default=200)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--checkpoint", default=None, help="resume folder for block-by-block progress")
    q.set_defaults(func=_cmd_quantize)

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
