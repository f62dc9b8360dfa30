"""``save`` / ``load`` of a converted model: one safetensors file, nothing unpickled.

File layout: the converted model's full ``state_dict`` (float parameters of the layers kept in
float, packed integer weights, scales, the router's table) as safetensors tensors, plus a JSON
document in the header metadata under the key ``"tgpq"`` with:
  * ``format``/``version``: ``"tgpq-quantized-unet"`` / 2;
  * ``quant_config``: the ``QuantConfig``;
  * ``unet_class`` and ``unet_config``: the diffusers class name and its config;
  * ``layers``: per quantized layer its kind and geometry, enough to rebuild it empty;
  * ``sha256``: a digest of everything that determines the computation, checked on load: all tensor
    bytes (names, dtypes, shapes, data) and, since version 2, the rest of this JSON document in
    canonical form. Version-1 files (tensors only) still load.

Files are written atomically (a temporary file in the same folder, fsync, rename) with the usual
permissions (``0666`` less the umask).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from ..nn import QConv2d, QLinear, QSplitConv2d, TimestepRouter
from ..recipe import QuantConfig
from .convert import _parent_and_attr, choose_kernels, install_router, quantized_layers, set_backend

FORMAT = "tgpq-quantized-unet"
VERSION = 2
READABLE_VERSIONS = (1, 2)


def _json_value(o):
    """``json.dumps`` fallback for config values: paths as strings, other iterables as lists."""
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    try:
        return list(o)
    except TypeError:
        return str(o)


def _canonical(meta: dict) -> bytes:
    """The metadata without its digest, as canonical JSON bytes (sorted keys, no spaces)."""
    return json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"),
                      default=_json_value).encode()


def _digest(tensors: dict[str, torch.Tensor], meta: dict | None = None) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes) and, when given, of the metadata (``_canonical``)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if meta is not None:
        h.update(b"|metadata|" + _canonical(meta))
    return h.hexdigest()


def check_output_path(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` (one line) when ``path`` cannot be written: call before long work."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder for the output file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{folder}: the output folder is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{path}: the output file exists and is not writable")


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``: a temporary file in the same folder, fsync, rename (usual permissions)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _layer_spec(m) -> dict:
    if isinstance(m, QLinear):
        return {"kind": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if isinstance(m, QSplitConv2d):
        return {"kind": "split_conv2d", "parts": [_layer_spec(p) for p in m.parts]}
    return {"kind": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel_size": m.kernel_size,
            "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "bias": m.bias is not None}


def _build_layer(spec: dict, bits: int, groups: int):
    kind = spec.get("kind")
    if kind == "linear":
        return QLinear(spec["in"], spec["out"], bits, groups, spec["bias"])
    if kind == "conv2d":
        return QConv2d(spec["in"], spec["out"], spec["kernel_size"], spec["stride"], spec["padding"],
                       spec["dilation"], bits, groups, spec["bias"])
    if kind == "split_conv2d":
        return QSplitConv2d([_build_layer(p, bits, groups) for p in spec["parts"]])
    raise ValueError(f"unknown layer kind {kind!r}")


def save(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Write a converted model (from ``tgpq.convert``) to ``path`` (safetensors); returns the JSON document
    written in its header (``sha256`` included)."""
    if getattr(model, "tgpq_router", None) is None:
        raise ValueError("save expects a model converted with tgpq.convert")
    cfg: QuantConfig = model.tgpq_config
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "quant_config": cfg.to_dict(),
        "unet_class": type(model).__name__,
        "unet_config": dict(getattr(model, "config", {}) or {}),
        "layers": {name: _layer_spec(m) for name, m in quantized_layers(model).items()},
    }
    meta = json.loads(json.dumps(meta, default=_json_value))  # what load will parse: digest that
    meta["sha256"] = _digest(tensors, meta)
    write_atomically(path, save_tensors(tensors, metadata={"tgpq": json.dumps(meta)}))
    return meta


def _read(path: str) -> tuple[dict, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("tgpq")
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if raw is None:
        raise ValueError(f"{path}: not a tgpq file (no 'tgpq' metadata in the header)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt tgpq metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        fmt, ver = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
        raise ValueError(f"{path}: unsupported format {fmt!r} version {ver!r}")
    covered = meta if meta["version"] >= 2 else None  # version 1 digested the tensors only
    if _digest(tensors, covered) != meta.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged")
    return meta, tensors


def load(path: str | os.PathLike, unet_config: dict | None = None, backend: str = "auto",
         device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a converted model from ``path``.

    ``unet_config`` (a diffusers config dict) overrides the one stored in the file; it must describe
    the same architecture, else loading fails with the mismatching tensors named.
    """
    path = os.fspath(path)
    meta, tensors = _read(path)
    return build_quantized(meta, tensors, path, unet_config, backend, device)


def build_quantized(meta: dict, tensors: dict, path: str, unet_config: dict | None = None, backend: str = "auto",
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """The converted model described by a checked file's ``meta`` and ``tensors`` (from ``_read``); errors name
    ``path``. The model is built on the meta device and takes the file's tensors (floating ones in the file's
    dtype, others cast to the dtypes the config builds), so loading never allocates the float weights of the
    quantized layers."""
    cfg = QuantConfig.from_dict(meta["quant_config"])
    import diffusers

    cls_name = meta.get("unet_class", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"{path}: unknown model class {cls_name!r}")
    config = dict(unet_config) if unet_config is not None else meta.get("unet_config")
    if not config:
        raise ValueError(f"{path}: no UNet config stored; pass unet_config")
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):  # no storage: every tensor comes from the file
        try:
            model = cls.from_config(config)
        except Exception as e:  # diffusers raises several types for bad configs
            raise ValueError(f"{path}: cannot build {cls_name} from the config ({e})") from None
        for name, spec in meta["layers"].items():
            try:
                parent, attr = _parent_and_attr(model, name)
            except ValueError:
                raise ValueError(f"{path}: layer {name!r} does not exist in the given UNet config") from None
            setattr(parent, attr, _build_layer(spec, cfg.weight_bits, cfg.num_groups))
    table = tensors.get("tgpq_router.timestep_to_group")
    if table is None:
        raise ValueError(f"{path}: missing tensor 'tgpq_router.timestep_to_group'")
    install_router(model, TimestepRouter(table, cfg.num_groups))
    model.tgpq_config = cfg
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: does not match the UNet config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    # floating tensors keep the file's dtype (a bfloat16 UNet's float layers stay bfloat16), others the model's
    model.load_state_dict({k: v if v.is_floating_point() and own[k].is_floating_point() else v.to(own[k].dtype)
                           for k, v in tensors.items()}, strict=True, assign=True)
    for m in model.modules():
        if isinstance(m, (QLinear, QConv2d)):  # their one tensor outside the state dict
            m._own_group_index = torch.zeros(1, dtype=torch.int64)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (none in diffusers' UNets today): never leave it unset
        raise ValueError(f"{path}: {cls_name} holds tensors that the file cannot set: {left[:5]}")
    set_backend(model, backend)
    model = model.to(device).eval()
    choose_kernels(model, backend)
    return model
