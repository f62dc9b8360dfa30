"""FID and Inception Score from a user-supplied local FID-Inception weights file (never downloaded).

The network is the FID variant of Inception-v3 (the TensorFlow 2015-12-05 graph as ported by
pytorch-fid), rebuilt here in plain torch with torchvision's module names so that the state
dict of ``pt_inception-2015-12-05-6726825d.pth`` loads key for key: BasicConv2d = conv (no bias)
+ BatchNorm(eps=1e-3) + ReLU; Inception blocks A/B/C/D/E with the FID patches (average pools
that exclude padding; max pool in the branch pool of the last block); ``fc`` maps the 2048-d
pool features to 1008 logits (used for the Inception Score).

Images are uint8 NHWC or float NCHW in [-1, 1] of any size; they are bilinearly resized to
299x299 (``align_corners=False``) as pytorch-fid does (which resizes [0, 1] images and then maps
them to [-1, 1]; bilinear resizing commutes with that affine map).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .classifier import to_model_input
from .frechet import feature_stats, frechet_distance

FEATURE_DIM = 2048
NUM_LOGITS = 1008


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_no_pad(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool="avg"``: FID's Mixed_7b (average pool excluding padding); ``"max"``: Mixed_7c."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool_no_pad(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """FID-Inception-v3. ``forward``: float ``[B, 3, H, W]`` in [-1, 1] (H, W >= 75, normally 299) ->
    ``(features [B, 2048], logits [B, 1008])``."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        features = x.mean(dim=(2, 3))
        return features, self.fc(features)


def _is_batch_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


_CACHE: dict[tuple[str, str], FIDInceptionV3] = {}


def load_fid_inception(weights_path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build the FID-Inception network and load ``weights_path`` (pytorch-fid's .pth layout), eval mode.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (one line, naming the file)
    for a file that is not a state dict of this network (missing/unexpected keys, wrong shapes).
    ``num_batches_tracked`` buffers are optional. Cached per resolved path and device.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Inception weights file not found (tgpq never downloads it; "
                                "pass the local pt_inception-2015-12-05-6726825d.pth)")
    key = (str(path.resolve()), str(torch.device(device)))
    if key in _CACHE:
        return _CACHE[key]
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"{path}: not a readable torch state dict ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    model = FIDInceptionV3()
    expected = {k: v for k, v in model.state_dict().items() if not _is_batch_counter(k)}
    given = {k: v for k, v in state.items() if not _is_batch_counter(k)}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match the FID-Inception network "
                         f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    bad = [k for k in expected if tuple(given[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{path}: tensor shapes do not match the FID-Inception network, e.g. {bad[0]}: "
                         f"{tuple(given[bad[0]].shape)} vs expected {tuple(expected[bad[0]].shape)}")
    model.load_state_dict({k: v.float() for k, v in given.items()}, strict=False)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _CACHE[key] = model
    return model


@torch.no_grad()
def inception_outputs(images, weights_path: str | Path, batch_size: int = 50, resize_to: int = 299,
                      device: str | torch.device = "cpu", progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pool features [N, 2048], logits [N, 1008])`` float32 on the CPU.

    ``images``: uint8 NHWC or float NCHW in [-1, 1]. ``resize_to`` is 299 for standard FID/IS; a
    smaller size (>= 75) is only for quick tests.
    """
    if resize_to < 75:
        raise ValueError(f"resize_to={resize_to}: FID-Inception needs inputs of at least 75x75")
    model = load_fid_inception(weights_path, device)
    x = to_model_input(images)
    feats, logits = [], []
    starts = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="inception")
    for i in starts:
        xb = x[i:i + batch_size].to(device)
        if xb.shape[-2:] != (resize_to, resize_to):
            xb = F.interpolate(xb, size=(resize_to, resize_to), mode="bilinear", align_corners=False)
        f, lg = model(xb)
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    if not feats:
        raise ValueError("images is empty")
    return torch.cat(feats), torch.cat(logits)


def inception_fid(images, reference, weights_path: str | Path, batch_size: int = 50, resize_to: int = 299,
                  device: str | torch.device = "cpu", progress: bool = False, method: str = "sqrtm") -> float:
    """FID of ``images`` against ``reference``: an image batch, or precomputed ``(mu [2048], sigma [2048, 2048])``.

    ``method`` is passed to ``frechet_distance`` (``"sqrtm"``: pytorch-fid's recipe; ``"eigh"``: faster).
    """
    kw = dict(weights_path=weights_path, batch_size=batch_size, resize_to=resize_to, device=device, progress=progress)
    mu, sigma = feature_stats(inception_outputs(images, **kw)[0])
    if isinstance(reference, tuple) and len(reference) == 2:
        mu_ref, sigma_ref = reference
    else:
        mu_ref, sigma_ref = feature_stats(inception_outputs(reference, **kw)[0])
    return frechet_distance(mu, sigma, mu_ref, sigma_ref, method=method)


def inception_score_from_logits(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` equal chunks: ``(mean, std)``.

    ``logits``: ``[N, C]`` (all 1008 classes of the FID-Inception ``fc``, softmax over all of them).
    """
    lg = torch.as_tensor(logits).to(torch.float64)
    if lg.ndim != 2 or lg.shape[0] < splits:
        raise ValueError(f"logits must be [N, C] with N >= splits={splits}, got shape {tuple(lg.shape)}")
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for chunk in torch.tensor_split(logp, splits):
        log_py = torch.logsumexp(chunk, dim=0) - np.log(chunk.shape[0])  # log of the marginal p(y)
        kl = (chunk.exp() * (chunk - log_py[None])).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(images, weights_path: str | Path, splits: int = 10, batch_size: int = 50, resize_to: int = 299,
                    device: str | torch.device = "cpu", progress: bool = False) -> tuple[float, float]:
    """Inception Score ``(mean, std over splits)`` of ``images`` with the FID-Inception network."""
    logits = inception_outputs(images, weights_path, batch_size=batch_size, resize_to=resize_to, device=device,
                               progress=progress)[1]
    return inception_score_from_logits(logits, splits)
