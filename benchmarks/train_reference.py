"""Train, export and sample tgpq's reference CIFAR-10 DDPM UNet.

Conventions (published DDPM CIFAR-10): epsilon prediction, linear betas 1e-4..0.02 over 1000
steps (``DDPMScheduler`` defaults), inputs in [-1, 1], random horizontal flips, uniform
timesteps, MSE loss, gradient clipping at 1.0, EMA of the weights.

Modes:

* train (default): resumable. ``--ckpt DIR`` holds ``DIR/state.pt`` (model, EMA, optimizer,
  step, images seen, RNG). It is written atomically (tmp file + ``os.replace``) every
  ``--save-every-min`` minutes, at ``--max-minutes`` and on SIGINT/SIGTERM; an existing one is
  resumed automatically. Without one, ``--init-from FILE.safetensors`` starts model and EMA from
  exported weights (e.g. the committed ``src/tgpq/assets/reference_unet.safetensors``).
* ``--export``: EMA weights of ``--ckpt`` -> fp16 safetensors + config JSON + model card (md)
  with a held-out loss (2000 CIFAR-10 test images, fixed noise and timesteps, fp32).
  Safe while training runs: it only reads ``state.pt``, which is replaced atomically; copying it
  first (``cp ckpt/reference/state.pt /tmp/x/state.pt``) avoids even contending for the file.
* ``--sample-grid PATH``: 8x8 grid with DDIM (50 steps, seed 0) from the exported weights.

EMA decay: effective decay is ``min(decay, (1 + step) / (10 + step))``. The default 0.995 (a
~200-step horizon, ~6,400 images at batch 32) fits the first CPU run, which manages only a few
thousand steps (fp32, a shared AVX2 CPU: a few images/s); 0.999 (~1000 steps) suits runs of tens of
thousands of steps, DDPM's 0.9999 hundreds of thousands. ``--ema-decay`` may change on resume.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent  # tgpq itself is the installed package (README: install)

from tgpq.eval.cifar10 import load_cifar10  # noqa: E402
from tgpq.unet.loading import REFERENCE_ARCHITECTURE, build_unet, load_reference_model  # noqa: E402

NUM_TRAIN_TIMESTEPS = 1000
HELDOUT_IMAGES = 2000
HELDOUT_SEED = 1234


def alphas_cumprod() -> torch.Tensor:
    """``[1000]`` float32 cumulative alphas of the default ``DDPMScheduler`` (linear 1e-4..0.02)."""
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear", prediction_type="epsilon")
    return sch.alphas_cumprod.to(torch.float32)


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, 32, 32]`` -> float32 in [-1, 1]."""
    return x_uint8.to(torch.float32).div_(127.5).sub_(1.0)


def load_split_chw(split: str) -> torch.Tensor:
    """CIFAR-10 ``split`` as a uint8 ``[N, 3, 32, 32]`` tensor (decoded once)."""
    imgs, _ = load_cifar10(split)
    return torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))


def noised(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    a = acp.to(x0.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# ----------------------------------------------------------------------------- training

class EMA:
    """Exponential moving average of float parameters and buffers (kept in float32)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """``s = d * s + (1 - d) * v`` for float entries (two foreach ops: a few launches on CUDA
        instead of two per tensor), a copy for the others."""
        d = min(self.decay, (1 + step) / (10 + step))
        fs, fv = [], []
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                fs.append(self.shadow[k])
                fv.append(v.detach().float())
            else:
                self.shadow[k].copy_(v)
        torch._foreach_mul_(fs, d)
        torch._foreach_add_(fs, fv, alpha=1 - d)


def save_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA or on CPUs where oneDNN has native bf16 (AVX-512 BF16/AMX),
    else ``fp32``: without native bf16, CPU autocast falls back to a slow reference convolution
    (measured 5-15x slower than fp32 on an AVX2-only EPYC)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup))


def train(args) -> None:
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    ckpt_file = Path(args.ckpt) / "state.pt"

    config = dict(REFERENCE_ARCHITECTURE)
    if args.config:
        config = json.loads(Path(args.config).read_text())
    state = None
    if ckpt_file.is_file():
        state = torch.load(ckpt_file, map_location="cpu", weights_only=False)
        config = state["config"]
        print(f"resuming from {ckpt_file}: step {state['step']}, {state['images_seen']} images seen", flush=True)
    elif args.init_from:
        init_model = load_reference_model(args.init_from)
        config = dict(init_model.config)
        config = {k: v for k, v in config.items() if k in REFERENCE_ARCHITECTURE or not k.startswith("_")}
        config = {k: config[k] for k in REFERENCE_ARCHITECTURE}
        print(f"initialising from {args.init_from}", flush=True)

    model = build_unet(config)
    if state is not None:
        model.load_state_dict(state["model"])
    elif args.init_from:
        model.load_state_dict(init_model.state_dict())
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"UNet2DModel {config['block_out_channels']} x{config['layers_per_block']}: {n_params:,} parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    ema = EMA(model, args.ema_decay)
    step, images_seen = 0, 0
    if state is None and args.init_from:  # an exported model continues its counts (its header records them)
        from safetensors import safe_open

        with safe_open(args.init_from, framework="pt") as f:
            meta = f.metadata() or {}
        step, images_seen = int(meta.get("step", 0)), int(meta.get("images_seen", 0))
        print(f"continuing the exported model's counts: step {step}, {images_seen} images", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    perm, perm_pos = None, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        ema.decay = args.ema_decay
        step, images_seen = state["step"], state["images_seen"]
        gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        perm, perm_pos = state["perm"], state["perm_pos"]

    data = load_split_chw("train")
    n = data.shape[0]
    acp = alphas_cumprod().to(device)
    use_autocast = resolve_precision(args.precision, device) == "bf16"
    print(f"precision: {'bf16 autocast' if use_autocast else 'fp32'}", flush=True)
    amp_dtype = torch.bfloat16

    def checkpoint(reason: str) -> None:
        save_atomic({
            "config": config, "model": model.state_dict(), "ema": ema.shadow, "optimizer": opt.state_dict(),
            "step": step, "images_seen": images_seen, "perm": perm, "perm_pos": perm_pos,
            "rng": {"data": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()},
            "args": vars(args), "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }, ckpt_file)
        tqdm.write(f"[{time.strftime('%H:%M:%S')}] checkpoint ({reason}) step {step} images {images_seen} -> {ckpt_file}")

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    t_start = time.monotonic()
    step0, images0 = step, images_seen
    t_save = t_start
    t_log, img_log = t_start, 0
    loss_sum, loss_cnt = 0.0, 0
    interactive = sys.stderr.isatty()
    bar = tqdm(initial=step, total=args.max_steps or None, unit="step", dynamic_ncols=True,
               mininterval=1.0 if interactive else 60.0, desc="train")
    model.train()
    reason = "max-minutes"
    while True:
        if stop["signal"]:
            reason = stop["signal"]
            break
        if args.max_steps and step >= args.max_steps:
            reason = "max-steps"
            break
        if args.steps and step - step0 >= args.steps:
            reason = "steps"
            break
        if (time.monotonic() - t_start) / 60 >= args.max_minutes:
            break
        if args.stop_at and time.time() >= args.stop_at:
            reason = "stop-at"
            break
        if perm is None or perm_pos + args.batch_size > n:
            perm, perm_pos = torch.randperm(n, generator=gen), 0
        idx = perm[perm_pos:perm_pos + args.batch_size]
        perm_pos += args.batch_size
        x0 = to_model_range(data[idx])
        flip = torch.rand(x0.shape[0], generator=gen) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        xt = noised(x0, t, noise, acp)
        if device.type == "cuda":
            xt = xt.contiguous(memory_format=torch.channels_last)

        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_autocast):
            pred = model(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        images_seen += x0.shape[0]
        img_log += x0.shape[0]
        loss_sum = loss_sum + loss.detach()  # a device tensor: no host sync per step (read at log time)
        loss_cnt += 1

        now = time.monotonic()
        if now - t_log >= (5 if interactive else args.log_every_min * 60):
            ips = img_log / (now - t_log)
            mean_loss = float(loss_sum) / loss_cnt
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}", refresh=False)
            if not interactive:
                tqdm.write(f"[{time.strftime('%H:%M:%S')}] step {step} images {images_seen} "
                           f"loss {mean_loss:.4f} lr {lr_at(step, args.lr, args.warmup):.2e} {ips:.1f} img/s")
            t_log, img_log, loss_sum, loss_cnt = now, 0, 0.0, 0
        bar.update(1)
        if now - t_save >= args.save_every_min * 60:
            checkpoint("periodic")
            t_save = now
    bar.close()
    checkpoint(reason)
    elapsed = time.monotonic() - t_start
    print(f"stopped ({reason}) at step {step}; {elapsed / 60:.1f} min this run", flush=True)
    run = {"reason": reason, "step": step, "images_seen": images_seen, "steps_this_run": step - step0,
           "images_this_run": images_seen - images0, "seconds": round(elapsed, 1),
           "images_per_s": round((images_seen - images0) / max(elapsed, 1e-9), 1), "device": str(device),
           "precision": "bf16" if use_autocast else "fp32", "batch_size": args.batch_size}
    print("TRAIN_RUN " + json.dumps(run), flush=True)  # one line for scripts (benchmarks/gpu_suite.py)


# ----------------------------------------------------------------------------- export / eval

TEST_IMAGES = 10000
HELDOUT_FILE = "test_heldout.npz"  # the held-out images alone, for a machine without test.npz (the GPU suite's)


def heldout_indices(n_images: int = HELDOUT_IMAGES, seed: int = HELDOUT_SEED) -> torch.Tensor:
    """Indices into the CIFAR-10 test set of the held-out images (the first ``n_images`` of a seeded shuffle)."""
    return torch.randperm(TEST_IMAGES, generator=torch.Generator().manual_seed(seed))[:n_images]


def load_heldout_chw(idx: torch.Tensor) -> torch.Tensor:
    """uint8 ``[len(idx), 3, 32, 32]``: test images ``idx``, from ``test.npz`` or else from ``test_heldout.npz``
    beside it (arrays ``indices`` and ``images``, written by ``write_heldout``) when that holds them all."""
    from tgpq.eval.cifar10 import default_cifar_root

    root = default_cifar_root()
    if not (root / "test.npz").is_file() and (root / HELDOUT_FILE).is_file():
        with np.load(root / HELDOUT_FILE, allow_pickle=False) as f:
            where = {int(i): j for j, i in enumerate(f["indices"])}
            missing = [int(i) for i in idx if int(i) not in where]
            if missing:
                raise ValueError(f"{root / HELDOUT_FILE} lacks test images {missing[:5]}...: write it with more images")
            imgs = f["images"][[where[int(i)] for i in idx]]
        return torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2)))
    return load_split_chw("test")[idx]


def write_heldout(path, n_images: int = HELDOUT_IMAGES, seed: int = HELDOUT_SEED) -> None:
    """Write the held-out test images (``indices``, ``images`` uint8 HWC) for ``heldout_loss`` elsewhere."""
    imgs, _ = load_cifar10("test")
    idx = heldout_indices(n_images, seed).numpy()
    np.savez(path, indices=idx.astype(np.int64), images=imgs[idx])


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, n_images: int = HELDOUT_IMAGES, seed: int = HELDOUT_SEED,
                 batch_size: int = 250) -> float:
    """Mean epsilon-MSE of ``model`` (fp32) on the first ``n_images`` of a seeded shuffle of the
    CIFAR-10 test set, with timesteps and noise drawn from the same seed (identical every call)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(TEST_IMAGES, generator=gen)[:n_images]  # = heldout_indices(n_images, seed)
    test = load_heldout_chw(idx)
    t_all = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n_images,), generator=gen)
    noise_all = torch.randn((n_images, 3, 32, 32), generator=gen)
    acp = alphas_cumprod()
    model = model.float().eval()
    total = 0.0
    for i in range(0, n_images, batch_size):
        x0 = to_model_range(test[i:i + batch_size])
        t, noise = t_all[i:i + batch_size], noise_all[i:i + batch_size]
        pred = model(noised(x0, t, noise, acp), t).sample
        total += F.mse_loss(pred, noise, reduction="sum").item()
    return total / (n_images * 3 * 32 * 32)


def export(args) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    ckpt_file = Path(args.ckpt) / "state.pt"
    if not ckpt_file.is_file():
        raise FileNotFoundError(f"{ckpt_file}: no checkpoint to export")
    state = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    config = state["config"]
    model = build_unet(config)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state["ema"].items()})
    n_params = sum(p.numel() for p in model.parameters())

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": "benchmarks/train_reference.py",
                                           "step": str(state["step"]), "images_seen": str(state["images_seen"])})
    os.replace(tmp, out)
    cfg_out = out.with_suffix(".json")
    cfg_out.write_text(json.dumps({**config, "_parameter_count": n_params}, indent=2) + "\n")

    # held-out loss of the weights as shipped (fp16 -> fp32), exactly what users load
    shipped = load_reference_model(out)
    loss = heldout_loss(shipped, args.heldout_images)
    a = state["args"]
    cmd = (f"python benchmarks/train_reference.py --ckpt {a['ckpt']} --batch-size {a['batch_size']} --lr {a['lr']} "
           f"--warmup {a['warmup']} --ema-decay {a['ema_decay']} --precision {a['precision']} --threads {a['threads']}")
    precision = a["precision"]
    if precision == "auto":
        precision = resolve_precision("auto", torch.device(a.get("device", "cpu")))
    precision = "bf16 autocast" if precision == "bf16" else "fp32"
    if a.get("device", "cpu") == "cpu":
        hardware = f"a shared 2-core CPU ({torch.backends.cpu.get_cpu_capability()}), niced, {a['threads']} threads"
    else:
        hardware = f"device {a['device']}"
    note = f"\n{args.note}\n" if args.note else ""
    md = f"""# tgpq reference model: CIFAR-10 DDPM UNet (small)

Trained by `benchmarks/train_reference.py` on the 50,000 CIFAR-10 training images, from scratch,
on {hardware} ({precision}). Weights are the EMA weights, stored as float16.
{note}
| | |
|---|---|
| architecture | `diffusers.UNet2DModel`, block_out_channels {config['block_out_channels']}, layers_per_block {config['layers_per_block']}, {', '.join(config['down_block_types'])} / mid block with attention / {', '.join(config['up_block_types'])}, single-head attention (attention_head_dim None), GroupNorm groups {config['norm_num_groups']} |
| parameters | {n_params:,} |
| objective | epsilon prediction, MSE, uniform t in [0, 1000) |
| noise schedule | linear betas 1e-4 .. 0.02, 1000 steps (`DDPMScheduler` defaults) |
| data | CIFAR-10 train, inputs in [-1, 1], random horizontal flips |
| optimiser (latest run) | AdamW lr {a['lr']} (linear warmup {a['warmup']} steps), weight decay {a['weight_decay']}, grad clip {a['grad_clip']}, batch {a['batch_size']} |
| EMA decay | {a['ema_decay']} (effective min(decay, (1+step)/(10+step))) |
| steps / images seen | {state['step']:,} / {state['images_seen']:,} ({state['images_seen'] / 50000:.1f} epochs) |
| held-out loss | {loss:.5f} (eps-MSE, fp32, {args.heldout_images} CIFAR-10 test images, seed {HELDOUT_SEED}: fixed images, timesteps and noise) |
| checkpoint saved | {state.get('saved_at', '?')} |
| exported | {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} |

Training command (resumes from `{a['ckpt']}/state.pt` when present; a later session without the
checkpoint continues from these weights with `--init-from src/tgpq/assets/reference_unet.safetensors`):

```
nice -n 15 {cmd} --max-minutes 600
```

Export / sample:

```
python benchmarks/train_reference.py --export --ckpt {a['ckpt']}
python benchmarks/train_reference.py --sample-grid docs/reference_samples.png
```

Sampling: `DDIMScheduler(num_train_timesteps=1000)` (defaults) with `tgpq.load_reference_model()`.
"""
    out.with_suffix(".md").write_text(md)
    print(f"exported step {state['step']} ({state['images_seen']} images) -> {out} "
          f"({out.stat().st_size / 1e6:.2f} MB), held-out loss {loss:.5f}", flush=True)
    print("HELDOUT " + json.dumps({"file": str(out), "heldout_loss": loss, "images": args.heldout_images,
                                   "step": state["step"], "images_seen": state["images_seen"]}), flush=True)


def evaluate(args) -> None:
    """``--eval FILE``: held-out loss of exported weights (one JSON line, for scripts)."""
    torch.set_num_threads(args.threads)
    loss = heldout_loss(load_reference_model(args.eval), args.heldout_images)
    print("HELDOUT " + json.dumps({"file": args.eval, "heldout_loss": loss, "images": args.heldout_images}),
          flush=True)


@torch.no_grad()
def sample_grid(args) -> None:
    from diffusers import DDIMScheduler
    from PIL import Image
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    model = load_reference_model(args.out)
    sch = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    sch.set_timesteps(args.sample_steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((64, 3, 32, 32), generator=gen)
    for t in tqdm(sch.timesteps, desc="DDIM"):
        eps = model(x, t).sample
        x = sch.step(eps, t, x, eta=0.0).prev_sample
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pad, s = 2, 32
    grid = np.full((8 * (s + pad) + pad, 8 * (s + pad) + pad, 3), 255, np.uint8)
    for i in range(64):
        r, c = divmod(i, 8)
        grid[pad + r * (s + pad):pad + r * (s + pad) + s, pad + c * (s + pad):pad + c * (s + pad) + s] = img[i]
    pil = Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)
    Path(args.sample_grid).parent.mkdir(parents=True, exist_ok=True)
    pil.save(args.sample_grid)
    print(f"wrote {args.sample_grid}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="ckpt/reference", help="checkpoint folder (holds state.pt)")
    p.add_argument("--init-from", default=None, help="exported .safetensors to start from when no checkpoint exists")
    p.add_argument("--config", default=None, help="JSON of UNet2DModel kwargs (default: REFERENCE_ARCHITECTURE)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (oneDNN), else fp32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=600.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop at this step count (0 = unbounded)")
    p.add_argument("--steps", type=int, default=0, help="at most this many steps in this run (0 = unbounded)")
    p.add_argument("--stop-at", type=float, default=0.0, metavar="UNIX_TIME",
                   help="also stop (and checkpoint) at this wall-clock time, data loading included (the GPU suite's "
                        "deadline); 0 = none")
    p.add_argument("--save-every-min", type=float, default=10.0)
    p.add_argument("--log-every-min", type=float, default=2.0)
    p.add_argument("--export", action="store_true", help="export EMA weights of --ckpt to --out")
    p.add_argument("--sample-grid", default=None, metavar="PNG", help="sample an 8x8 DDIM grid from --out")
    p.add_argument("--sample-steps", type=int, default=50, help="--sample-grid: DDIM steps")
    p.add_argument("--note", default="", help="--export: a paragraph added to the model card")
    p.add_argument("--heldout-images", type=int, default=HELDOUT_IMAGES,
                   help=f"--export / --eval: held-out test images (default {HELDOUT_IMAGES}; the GPU suite uses fewer)")
    p.add_argument("--eval", default=None, metavar="SAFETENSORS", help="print the held-out loss of exported weights")
    p.add_argument("--out", default=str(REPO / "src" / "tgpq" / "assets" / "reference_unet.safetensors"))
    args = p.parse_args(argv)
    if args.export:
        export(args)
    elif args.eval:
        evaluate(args)
    elif args.sample_grid:
        sample_grid(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
