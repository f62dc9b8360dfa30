"""Loading float UNets from local paths (never from a hub), and the CIFAR-10 DDPM UNet shipped with
tgpq (trained by ``benchmarks/train_reference.py``).

The model keeps the conventions of the published DDPM CIFAR-10 checkpoint: epsilon
prediction, linear beta schedule 1e-4..0.02 over 1000 steps, inputs in [-1, 1], so a default
``DDIMScheduler(num_train_timesteps=1000)`` samples it. Its layout is the DDPM CIFAR-10 layout
scaled down to fit CPU training (see ``tgpq/assets/reference_unet.md``).

Files (in ``tgpq/assets/``):

* ``reference_unet.safetensors``: EMA weights, float16, keys = ``UNet2DModel.state_dict()`` keys.
* ``reference_unet.json``: the ``UNet2DModel`` constructor arguments (``UNet2DModel.from_config``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_WEIGHTS = ASSETS_DIR / "reference_unet.safetensors"

#: The architecture trained by ``benchmarks/train_reference.py`` (``UNet2DModel`` kwargs).
#: DDPM CIFAR-10 (128, 256, 256, 256 channels, 2 res blocks, attention at 16x16) scaled down
#: to three levels 32x32 / 16x16 (attention) / 8x8 plus the attention mid block.
REFERENCE_ARCHITECTURE: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,  # one head spanning all channels, as in DDPM
    "norm_num_groups": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "dropout": 0.0,
}


def build_unet(config: dict[str, Any]):
    """Return a randomly initialised ``diffusers.UNet2DModel`` built from ``config`` kwargs."""
    from diffusers import UNet2DModel

    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of UNet2DModel arguments, got {type(config).__name__}")
    return UNet2DModel(**config)


def _config_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def read_json_object(path: Path, missing: str = "no such file", what: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path``; a one-line error naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {what}")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    cfg = read_json_object(path, "reference model config file not found", "a JSON object of UNet2DModel arguments")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def reference_model_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``UNet2DModel`` kwargs of the shipped model (or of the JSON next to ``path``).

    ``path`` is the safetensors file; its config is the same name with ``.json``.
    Keys starting with ``_`` (metadata such as ``_parameter_count``) are dropped.
    """
    weights = Path(path) if path is not None else DEFAULT_WEIGHTS
    return _read_config(_config_path(weights))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference model weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({msg})") from None


def load_reference_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32):
    """Load the shipped CIFAR-10 UNet as a ``UNet2DModel`` in eval mode on ``device``/``dtype``.

    ``path`` defaults to ``tgpq/assets/reference_unet.safetensors``; the config is read from the
    ``.json`` file of the same name. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` (naming the file) for a corrupt file or weights that do not match the config
    (missing/unexpected keys, wrong shapes).

    Call it as ``model(x_t, t).sample`` with ``x_t`` float ``[B, 3, 32, 32]`` in [-1, 1]-scale and
    ``t`` int timesteps in [0, 1000); it returns the predicted noise, same shape as ``x_t``.
    """
    weights = Path(path) if path is not None else DEFAULT_WEIGHTS
    cfg_path = _config_path(weights)
    state = _read_weights(weights)
    cfg = _read_config(cfg_path)
    try:
        model = build_unet(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: config does not build a UNet2DModel ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match config {cfg_path.name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{weights}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                             f"config {cfg_path.name} expects {tuple(v.shape)}")
        if not state[k].is_floating_point():
            raise ValueError(f"{weights}: tensor {k!r} has dtype {state[k].dtype}, expected floating point")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    model = model.to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval()


def load_unet(spec: str, device: str = "cpu"):
    """``"reference"`` -> the shipped CIFAR-10 UNet; a folder -> a diffusers UNet saved with
    ``save_pretrained`` (``config.json`` + weights; ``UNet2DModel`` or ``UNet2DConditionModel``).
    """
    if spec == "reference":
        return load_reference_model(device=device)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such model folder (use 'reference' for the shipped model)")
    cfg_file = path / "config.json" if path.is_dir() else None
    if cfg_file is None or not cfg_file.is_file():
        raise FileNotFoundError(f"{spec}: not a diffusers model folder (no config.json)")
    import diffusers

    with open(cfg_file) as f:
        cls_name = json.load(f).get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.startswith("UNet2D"):
        raise ValueError(f"{spec}: model class {cls_name!r} is not a supported UNet")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cls.from_pretrained(path, local_files_only=True).to(device).eval()


__all__ = ["REFERENCE_ARCHITECTURE", "build_unet", "load_reference_model", "load_unet", "reference_model_config"]
