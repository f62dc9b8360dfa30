"""CIFAR-10 from the project's shared assets (local files only, never downloaded)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def default_cifar_root() -> Path:
    """``$TGPQ_CIFAR10`` if set, else the first ``shared/assets/cifar10`` found beside the current folder,
    the checkout or one of their parents (the project's layout: ``../shared`` next to the repository)."""
    env = os.environ.get("TGPQ_CIFAR10")
    if env:
        return Path(env)
    cwd = Path.cwd().resolve()
    for base in (cwd, *cwd.parents, *Path(__file__).resolve().parents):
        cand = base / "shared" / "assets" / "cifar10"
        if cand.is_dir():
            return cand
    return cwd.parent / "shared" / "assets" / "cifar10"


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 ``[N, 32, 32, 3]`` RGB (HWC) and uint8 ``[N]``.

    ``split`` is ``"train"`` (50000 images, decoded from JPEG bytes) or ``"test"`` (10000).
    Both files are ordered by class: shuffle before taking subsets.
    """
    root = Path(root) if root is not None else default_cifar_root()
    if split == "train":
        path = root / "train_jpeg.npz"
    elif split == "test":
        path = root / "test.npz"
    else:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR-10 file not found (set TGPQ_CIFAR10 to its folder)")
    with np.load(path, allow_pickle=False) as f:
        if split == "test":
            return f["images"], f["labels"]
        from PIL import Image

        data, offsets, labels = f["data"], f["offsets"], f["labels"]
        out = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
        for i in range(len(labels)):
            img = Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
            out[i] = np.asarray(img)
        return out, labels
