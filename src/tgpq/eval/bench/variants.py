"""Variants of the sampling benchmark: each builds a callable ``denoise(x, t) -> eps`` over a fixed batch."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ... import unet as tgpq_unet
from ...recipe import QuantConfig
from .models import ModelSpec, quick_rtn_qstate, unet_kwargs

GPU_VARIANTS = ("fp16-eager", "fp16-compile", "fp16-cudagraph", "tgpq-w8a8", "tgpq-w4a8", "tgpq-w8a8-cudagraph",
                "tgpq-w4a8-cudagraph", "tgpq-w8a8-compile", "torchao-int8dq-compile")
CPU_VARIANTS = ("fp32-eager", "tgpq-w8a8-cpu", "tgpq-w4a8-cpu", "tgpq-w8a8-reference")
BASELINE = {"gpu": "fp16-eager", "cpu": "fp32-eager"}
COMPILE_RESERVE_S = 150.0  # a torch.compile cell is not started with less time left (SD 1.5 compiles ~1-2 min)
PROFILE_VARIANT = {"gpu": "tgpq-w8a8", "cpu": "tgpq-w8a8-cpu"}
GPU_NOTE = ("CPU mode: no CUDA device here. These numbers describe this CPU only; the GPU numbers "
            "(fp16 / torch.compile / Triton W8A8 and W4A8 / torchao) need a GPU: run this script on one.")


# --------------------------------------------------------------------------------------------------
# Variants: each builds a callable  denoise(x, t) -> eps  over a fixed batch
# --------------------------------------------------------------------------------------------------

class Denoiser:
    """``denoise(x, t)`` -> predicted noise for one batch; holds the model and the text embeddings."""

    def __init__(self, model, text):
        self.model, self.text = model, text

    def __call__(self, x, t):
        return self.model(x, t, **unet_kwargs(self.text)).sample


class GraphedDenoiser:
    """The UNet call captured in one CUDA graph for a fixed input shape; replays copy into static buffers."""

    def __init__(self, model, x, t, text):
        self.x, self.t = x.clone(), t.clone()
        self.text = text
        kw = unet_kwargs(text)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton autotuning, cuBLAS handles) outside capture
            for _ in range(3):
                model(self.x, self.t, **kw)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model(self.x, self.t, **kw).sample

    def __call__(self, x, t):
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out


@dataclass
class Variant:
    """How to turn the float model into the thing that is timed."""

    name: str
    dtype: torch.dtype
    bits: int | None = None  # tgpq weight bits, None for float / torchao
    backend: str = "auto"
    compile: bool = False
    cudagraph: bool = False
    torchao: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def needs_gpu(self) -> bool:
        return (self.dtype == torch.float16 or self.compile or self.cudagraph or self.torchao
                or (self.bits is not None and self.backend == "auto"))


def parse_variant(name: str) -> Variant:
    if name == "fp32-eager":
        return Variant(name, torch.float32)
    if name.startswith("fp16-"):
        mode = name.split("-", 1)[1]
        if mode not in ("eager", "compile", "cudagraph"):
            raise ValueError(f"unknown variant {name!r}")
        return Variant(name, torch.float16, compile=mode == "compile", cudagraph=mode == "cudagraph")
    m = re.fullmatch(r"tgpq-w([48])a8(?:-(cpu|reference|compile|cudagraph))?", name)
    if m:
        mode = m.group(2)
        if mode in ("cpu", "reference"):
            return Variant(name, torch.float32, bits=int(m.group(1)), backend=mode)
        return Variant(name, torch.float16, bits=int(m.group(1)), compile=mode == "compile",
                       cudagraph=mode == "cudagraph")
    if name in ("torchao-int8dq", "torchao-int8dq-compile"):
        return Variant(name, torch.float16, torchao=True, compile=name.endswith("-compile"))
    raise ValueError(f"unknown variant {name!r}: choose from {GPU_VARIANTS + CPU_VARIANTS + ('torchao-int8dq',)}")


def torchao_available() -> str | None:
    """None when torchao's int8 dynamic-activation config imports, else why not."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except Exception as e:  # torchao raises several types on a torch it was not built for
        return f"torchao not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def prepare_model(float_model: torch.nn.Module, spec: ModelSpec, variant: Variant, device) -> torch.nn.Module:
    """The model of ``variant`` on ``device`` (a new object; ``float_model``, the float32 master copy kept
    on the CPU so that it never counts in the device's peak memory, is left as is)."""
    import copy

    model = copy.deepcopy(float_model).to(device=device, dtype=variant.dtype)
    if variant.bits is not None:
        cfg = QuantConfig(weight_bits=variant.bits, act_bits=8, method="rtn")
        qstate = quick_rtn_qstate(model, spec, cfg)
        model = tgpq_unet.convert(model, qstate, backend=variant.backend, inplace=True)
    if variant.torchao:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model.eval()


def make_denoiser(model, variant: Variant, x, t, text):
    if variant.compile:
        return Denoiser(torch.compile(model, dynamic=False), text)
    if variant.cudagraph:
        return GraphedDenoiser(model, x, t, text)
    return Denoiser(model, text)


