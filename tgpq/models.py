"""Loading float UNets from local paths (never from a hub)."""
from __future__ import annotations

import os
from pathlib import Path


def load_unet(spec: str, device: str = "cpu"):
    """``"reference"`` -> the shipped CIFAR-10 UNet; a folder -> a diffusers UNet saved with
    ``save_pretrained`` (``config.json`` + weights; ``UNet2DModel`` or ``UNet2DConditionModel``).
    """
    if spec == "reference":
        from .reference_model import load_reference_model

        return load_reference_model(device=device)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such model folder (use 'reference' for the shipped model)")
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is None or not cfg_file.is_file():
        raise FileNotFoundError(f"{spec}: not a diffusers model folder (no config.json)")
    import json

    import diffusers

    with open(cfg_file) as f:
        cls_name = json.load(f).get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.startswith("UNet2D"):
        raise ValueError(f"{spec}: model class {cls_name!r} is not a supported UNet")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cls.from_pretrained(path, local_files_only=True).to(device).eval()
