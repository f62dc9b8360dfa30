"""``save_pretrained`` / ``from_pretrained``: quantized UNets and pipelines as diffusers-style folders.

A quantized UNet folder::

    config.json                          the diffusers UNet config (``_class_name``, ``_diffusers_version``,
                                         every constructor argument) plus ``quantization_config``:
                                           quant_method   "tgpq"
                                           format/version "tgpq-quantized-unet" / 2 (the weights file's format)
                                           weights        "diffusion_pytorch_model.safetensors"
                                           weights_sha256 the digest stored in (and checked against) that file
                                           quant_config   the QuantConfig (a dict)
                                           tgpq_version   the tgpq that wrote it
    diffusion_pytorch_model.safetensors  exactly a ``tgpq.save`` file (packed weights, scales, router table;
                                         its header carries the UNet config and its own sha256)

A pipeline folder is what ``DiffusionPipeline.save_pretrained`` writes (``model_index.json`` and one
subfolder per component, each saved by its own library) with ``unet/`` a quantized UNet folder as above.
Plain diffusers refuses to load such a UNet (``quant_method "tgpq"`` is not one of its quantizers);
``tgpq.from_pretrained`` rebuilds it without unpickling anything: the UNet from safetensors and JSON (built
on the meta device), the other components through diffusers with ``use_safetensors=True``.

Refused with one ``ValueError`` line naming the file: a folder without ``quantization_config`` (plain
diffusers), another ``quant_method``, an unknown format version, a weights file that fails its checksum, a
``config.json`` whose UNet config, QuantConfig or digest differ from the weights file's, a weights name
that is not a plain file name, and a ``model_index.json`` naming classes outside diffusers / transformers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..recipe import QuantConfig
from .pipeline import is_pipeline
from .serialization import FORMAT, READABLE_VERSIONS, VERSION, _json_value, _read, build_quantized, save, \
    write_atomically

QUANT_METHOD = "tgpq"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
PIPELINE_INDEX = "model_index.json"
#: Libraries whose classes a pipeline folder may name (nothing else is imported or instantiated).
PIPELINE_LIBRARIES = ("diffusers", "transformers")


def _tgpq_version() -> str:
    try:
        from importlib.metadata import version

        return version("tgpq")
    except Exception:  # not installed as a distribution (e.g. a source tree on sys.path)
        return "unknown"


def check_output_folder(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` (one line) when ``folder`` cannot be written as an output folder: call before long
    work. It may exist (files of the same names are replaced) or be created in a writable parent."""
    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder}: exists and is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{folder}: the output folder is not writable")
        return
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise ValueError(f"{parent}: no such folder for the output folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{parent}: not writable, cannot create the output folder")


def _is_converted(model) -> bool:
    return isinstance(model, torch.nn.Module) and getattr(model, "tgpq_router", None) is not None


def _unet_config_json(model) -> dict:
    """The diffusers config of ``model`` as ``ModelMixin.save_config`` writes it (``_class_name`` included)."""
    if hasattr(model, "to_json_string"):
        cfg = json.loads(model.to_json_string())
    else:
        cfg = {"_class_name": type(model).__name__, **dict(getattr(model, "config", {}) or {})}
    cfg.pop("quantization_config", None)
    return json.loads(json.dumps(cfg, default=_json_value))


def _save_unet_folder(model, folder: str | os.PathLike) -> None:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    meta = save(model, os.path.join(folder, WEIGHTS_NAME))  # atomic, format 2, sha256 over tensors and header
    cfg = _unet_config_json(model)
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "version": VERSION,
        "weights": WEIGHTS_NAME,
        "weights_sha256": meta["sha256"],
        "quant_config": meta["quant_config"],
        "tgpq_version": _tgpq_version(),
    }
    write_atomically(os.path.join(folder, CONFIG_NAME), (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())


def save_pretrained(model, folder: str | os.PathLike) -> None:
    """Write a quantized UNet (from ``tgpq.convert`` / ``tgpq.quantize``) or a diffusers pipeline holding one to
    ``folder`` (module docstring). Files already there under the same names are replaced; each file of the
    UNet is written atomically, its ``config.json`` last."""
    check_output_folder(folder)
    if is_pipeline(model):
        unet = model.unet
        if not _is_converted(unet):
            raise ValueError("save_pretrained expects a pipeline whose UNet is quantized (tgpq.quantize); a float "
                             "pipeline saves with pipe.save_pretrained")
        # diffusers saves every component (and model_index.json) its way; the UNet's save method, looked up on
        # the instance, is ours for the duration of the call
        unet.save_pretrained = lambda save_directory, **_: _save_unet_folder(unet, save_directory)
        try:
            model.save_pretrained(os.fspath(folder), safe_serialization=True)
        finally:
            del unet.save_pretrained
        return
    if not _is_converted(model):
        raise ValueError(f"save_pretrained expects a UNet converted by tgpq (tgpq.convert / tgpq.quantize) or a "
                         f"pipeline holding one, got {type(model).__name__}")
    _save_unet_folder(model, folder)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _public(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "quantization_config"}


def _first_difference(a: dict, b: dict) -> str:
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<missing>") != b.get(k, "<missing>"):
            return f"{k!r} is {a.get(k, '<missing>')!r} here, {b.get(k, '<missing>')!r} in the weights file"
    return ""


def _load_unet_folder(folder: Path, backend: str, device) -> torch.nn.Module:
    cfg_path = folder / CONFIG_NAME
    cfg = _read_json(cfg_path)
    qc = cfg.get("quantization_config")
    if qc is None:
        raise ValueError(f"{cfg_path}: no quantization_config: a plain diffusers model, not a tgpq-quantized one "
                         f"(load it with diffusers, or quantize it with tgpq.quantize)")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(f"{cfg_path}: quantized with {method!r}, not by tgpq")
    if qc.get("format") != FORMAT or qc.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{cfg_path}: unsupported tgpq format {qc.get('format')!r} version {qc.get('version')!r}")
    name = qc.get("weights")
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"{cfg_path}: quantization_config.weights={name!r} is not a file name in the folder")
    weights = folder / name
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file (named by {cfg_path})")
    meta, tensors = _read(str(weights))  # checks the file's own sha256 over tensors and header
    if qc.get("weights_sha256") != meta.get("sha256"):
        raise ValueError(f"{cfg_path}: does not belong to {weights.name} (its weights_sha256 differs from the "
                         f"file's digest)")
    if qc.get("quant_config") != meta.get("quant_config"):
        diff = _first_difference(qc.get("quant_config") or {}, meta.get("quant_config") or {})
        raise ValueError(f"{cfg_path}: quantization_config.quant_config does not match {weights.name}: {diff}")
    try:
        QuantConfig.from_dict(meta["quant_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{weights}: invalid QuantConfig ({e})") from None
    if cfg.get("_class_name") != meta.get("unet_class"):
        raise ValueError(f"{cfg_path}: _class_name {cfg.get('_class_name')!r} does not match {weights.name} "
                         f"({meta.get('unet_class')!r})")
    mine, theirs = _public(cfg), _public(meta.get("unet_config") or {})
    if mine != theirs:
        raise ValueError(f"{cfg_path}: the UNet config does not match {weights.name}: {_first_difference(mine, theirs)}")
    return build_quantized(meta, tensors, str(weights), None, backend, device)


def check_pipeline_index(index_path: Path, index: dict) -> type:
    """The diffusers pipeline class a ``model_index.json`` names; refuses custom code and foreign libraries."""
    import diffusers

    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{index_path}: _class_name {name!r} is not a diffusers pipeline class (custom pipeline "
                         f"code is never loaded)")
    for key, value in index.items():
        if key.startswith("_") or not isinstance(value, (list, tuple)):
            continue
        if len(value) != 2 or (value[0] is not None and value[0] not in PIPELINE_LIBRARIES):
            raise ValueError(f"{index_path}: component {key!r} comes from {value!r}; only {PIPELINE_LIBRARIES} "
                             f"components are loaded")
    if not isinstance(index.get("unet"), (list, tuple)) or index["unet"][0] is None:
        raise ValueError(f"{index_path}: the pipeline has no UNet")
    return cls


def from_pretrained(folder: str | os.PathLike, backend: str = "auto", device: str | torch.device = "cpu"):
    """Rebuild what ``save_pretrained`` wrote: a quantized UNet (``folder/config.json``) or a pipeline whose UNet
    is quantized (``folder/model_index.json``), on ``device`` with the quantized layers on ``backend``.
    Errors are one line naming the file (module docstring)."""
    folder = Path(os.fspath(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    index_path = folder / PIPELINE_INDEX
    if not index_path.is_file():
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"{folder}: not a diffusers folder (no {PIPELINE_INDEX} or {CONFIG_NAME})")
        return _load_unet_folder(folder, backend, device)
    index = _read_json(index_path)
    cls = check_pipeline_index(index_path, index)
    unet = _load_unet_folder(folder / "unet", backend, device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = cls.from_pretrained(str(folder), unet=unet, local_files_only=True, use_safetensors=True)
    except Exception as e:  # diffusers / transformers raise many types for a broken component
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{folder}: diffusers could not load the pipeline's other components ({msg})") from None
    return pipe.to(device)


def load_float_folder(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """A float diffusers pipeline (``model_index.json``) or UNet (``config.json``) saved the diffusers way, loaded
    from safetensors only; a folder already quantized by tgpq is refused (quantize its float original)."""
    from .loading import load_unet

    folder = Path(os.fspath(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    index_path = folder / PIPELINE_INDEX
    unet_cfg = (folder / "unet" / CONFIG_NAME) if index_path.is_file() else (folder / CONFIG_NAME)
    if not unet_cfg.is_file():
        raise ValueError(f"{folder}: not a diffusers pipeline or UNet folder (no {PIPELINE_INDEX} or {CONFIG_NAME})")
    if "quantization_config" in _read_json(unet_cfg):
        raise ValueError(f"{unet_cfg}: this model is already quantized; quantize its float original")
    if not index_path.is_file():
        return load_unet(str(folder), device=str(device))
    cls = check_pipeline_index(index_path, _read_json(index_path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        pipe = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except Exception as e:  # diffusers / transformers raise many types for a broken component
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{folder}: diffusers could not load the pipeline ({msg})") from None
    return pipe.to(device)


__all__ = ["save_pretrained", "from_pretrained", "check_output_folder", "load_float_folder", "from_pretrained", "check_output_folder", "QUANT_METHOD", "WEIGHTS_NAME"]
