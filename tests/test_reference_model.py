"""The shipped CIFAR-10 reference UNet: loads, predicts noise, beats random init; bad files fail clearly."""
from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tgpq.unet.loading import (DEFAULT_WEIGHTS, build_unet, load_reference_model,
                                  reference_model_config)

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="reference weights not exported yet")


@pytest.fixture(scope="module")
def model():
    return load_reference_model()


def _documented_parameter_count() -> int:
    md = DEFAULT_WEIGHTS.with_suffix(".md").read_text()
    m = re.search(r"\|\s*parameters\s*\|\s*([\d,]+)\s*\|", md)
    assert m, "reference_unet.md does not state the parameter count"
    return int(m.group(1).replace(",", ""))


def test_loads_in_eval_fp32_with_documented_parameter_count(model):
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == _documented_parameter_count()
    raw = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert raw["_parameter_count"] == n
    cfg = reference_model_config()
    assert cfg["sample_size"] == 32 and cfg["in_channels"] == 3 and cfg["out_channels"] == 3
    assert not any(k.startswith("_") for k in cfg)


def test_noise_prediction_shape_and_finite(model):
    gen = torch.Generator().manual_seed(int(np.random.randint(1 << 30)))
    x = torch.randn((3, 3, 32, 32), generator=gen)
    for t in (0, 500, 999):
        eps = model(x, torch.full((3,), t)).sample
        assert eps.shape == x.shape and eps.dtype == torch.float32
        assert torch.isfinite(eps).all()
    # batched distinct timesteps go through too
    eps = model(x, torch.tensor([3, 400, 871])).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()


@torch.no_grad()
def _eps_loss(m, x0, t, noise):
    from diffusers import DDPMScheduler

    acp = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    xt = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
    return F.mse_loss(m(xt, t).sample, noise).item()


def test_heldout_loss_clearly_below_random_init(model):
    from tgpq.eval.cifar10 import load_cifar10

    imgs, _ = load_cifar10("test")
    rng = np.random.default_rng()
    idx = rng.choice(len(imgs), 64, replace=False)
    x0 = torch.from_numpy(imgs[idx].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    # t in [50, 950): away from the extremes, where even a trivial predictor has a fixed loss
    t = torch.randint(50, 950, (64,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    trained = _eps_loss(model, x0, t, noise)
    torch.manual_seed(int(rng.integers(1 << 30)))
    random_init = _eps_loss(build_unet(reference_model_config()).eval(), x0, t, noise)
    # A random-init UNet predicts roughly independent of the noise (loss >= ~1, the noise
    # variance); a trained one has to recover a large part of it. Half is a wide margin: even
    # the 40-minute export is far below it; 64 images x 3072 values keep the estimate's
    # standard error a few percent.
    assert trained < 0.5 * random_init, (trained, random_init)
    assert trained < 0.5, trained


def _copy_pair(tmp_path, name="ref.safetensors"):
    dst = tmp_path / name
    shutil.copyfile(DEFAULT_WEIGHTS, dst)
    shutil.copyfile(DEFAULT_WEIGHTS.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def test_missing_file_raises_with_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_reference_model(tmp_path / "nothere.safetensors")
    w = _copy_pair(tmp_path)
    w.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ref\.json"):
        load_reference_model(w)


def test_truncated_file_raises_with_name(tmp_path):
    w = _copy_pair(tmp_path, "trunc.safetensors")
    data = w.read_bytes()
    cut = int(np.random.randint(len(data) // 4, len(data) - 1))
    w.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"trunc\.safetensors"):
        load_reference_model(w)


def test_tampered_header_raises_with_name(tmp_path):
    w = _copy_pair(tmp_path, "tampered.safetensors")
    data = bytearray(w.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    # grow one tensor's byte range past the end of the file: header and payload disagree
    key = sorted(k for k in header if k != "__metadata__")[int(np.random.randint(0, len(header) - 1))]
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 4096]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    w.write_bytes(struct.pack("<Q", len(new)) + new + bytes(data[8 + hlen:]))
    with pytest.raises(ValueError, match=r"tampered\.safetensors"):
        load_reference_model(w)
    # garbage header JSON
    bad = bytearray(data)
    bad[8:8 + 16] = b"{not json at all"
    w.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"tampered\.safetensors"):
        load_reference_model(w)


def test_weights_not_matching_config_raise_with_name(tmp_path):
    w = _copy_pair(tmp_path, "mismatch.safetensors")
    cfg = json.loads(w.with_suffix(".json").read_text())
    wider = dict(cfg, block_out_channels=[c * 2 for c in cfg["block_out_channels"]])
    w.with_suffix(".json").write_text(json.dumps(wider))
    with pytest.raises(ValueError, match=r"mismatch\.safetensors.*shape"):
        load_reference_model(w)
    deeper = dict(cfg, layers_per_block=cfg["layers_per_block"] + 1)
    w.with_suffix(".json").write_text(json.dumps(deeper))
    with pytest.raises(ValueError, match=r"mismatch\.safetensors.*missing keys"):
        load_reference_model(w)
    w.with_suffix(".json").write_text(json.dumps(dict(cfg, no_such_argument=3)))
    with pytest.raises(ValueError, match=r"mismatch\.json"):
        load_reference_model(w)
