"""Deterministic DDIM sampling with any UNet (float or converted), for demos, metrics and benchmarks."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..calibration.collect import scheduler_model_output


def initial_noise(num: int, shape: tuple[int, int, int], seed: int = 0, first: int = 0,
                  stride: int = 1) -> torch.Tensor:
    """float32 ``[num, *shape]`` Gaussian noise of images ``first + k * stride`` (``k < num``);
    image ``i``'s noise depends only on ``(seed, i)``, so a slice ``first=rank, stride=world_size``
    gets the same noise as those rows of the full set."""
    if first < 0 or stride < 1:
        raise ValueError(f"first={first} must be >= 0 and stride={stride} >= 1")
    out = torch.empty(num, *shape)
    for k in range(num):
        i = first + k * stride
        out[k] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
    return out


@torch.no_grad()
def ddim_sample(unet, num: int, steps: int = 50, seed: int = 0, batch_size: int = 64, device=None,
                dtype=torch.float32, progress: bool = True, eta: float = 0.0, first: int = 0,
                stride: int = 1) -> torch.Tensor:
    """Sample ``num`` images with DDIM (``steps`` steps). Returns float32 ``[num, C, H, W]`` in [-1, 1].

    Same seeds -> same starting noise for every model, so float and quantized samples compare
    image by image. ``first`` / ``stride`` pick the images ``first + k * stride`` of the seeded
    sequence (``initial_noise``), e.g. one data-parallel rank's share.
    """
    from diffusers import DDIMScheduler

    if num < 1 or steps < 1:
        raise ValueError("num and steps must be positive")
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (cfg.in_channels, size, size)
    device = device or next(unet.parameters()).device
    sched = DDIMScheduler(num_train_timesteps=getattr(cfg, "num_train_timesteps", None) or 1000)
    sched.set_timesteps(steps)
    noise = initial_noise(num, shape, seed, first, stride)
    out = []
    bar = tqdm(total=num * steps, desc="DDIM", unit="step", disable=not progress, leave=False)
    for start in range(0, num, batch_size):
        x = noise[start:start + batch_size].to(device=device, dtype=dtype)
        for t in sched.timesteps:
            eps = scheduler_model_output(sched, unet(x, t.to(device)).sample, x)  # learned variance: eps half
            x = sched.step(eps, t, x, eta=eta).prev_sample
            bar.update(x.shape[0])
        out.append(x.float().clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]``."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Save ``[N, C, H, W]`` images in [-1, 1] as a PNG grid (2-pixel white gaps)."""
    import numpy as np
    from PIL import Image

    imgs = to_uint8(images).numpy()
    n, h, w, c = imgs.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = imgs[i]
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)
