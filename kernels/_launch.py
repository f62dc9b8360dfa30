"""Launch plumbing shared by the Triton launchers: input checks and CPU interpretation.

Every public launcher validates its inputs here *before* any launch, so bad input raises a
``TypeError``/``ValueError`` naming the problem instead of a device fault.

CPU tensors run the very same kernel source through Triton's interpreter
(``triton.runtime.interpreter.InterpretedFunction``), built lazily from the kernel's Python
function; this is how the numerics are tested on machines without a GPU (slow: small shapes
only). No environment variable is needed for that, and ``TRITON_INTERPRET=1`` also works.
"""
from __future__ import annotations

import functools

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1


def raw_python_fn(kernel):
    """The undecorated Python function under jit / autotune / heuristics wrappers."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


@functools.lru_cache(maxsize=None)
def interpreted(py_fn):
    """An interpreter-backed kernel object for a raw kernel function (cached per function)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(py_fn)


def packed_k(k: int, bits: int) -> int:
    """Number of int8 columns of the packed weight for a reduction length ``k``."""
    return k if bits == 8 else (k + 1) // 2


def check_bits(bits) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} is not supported: use 4 or 8")
    return int(bits)


def check_common(x, w_packed, w_scale, a_scale, group_index, bias, *, bits: int, k: int, what: str,
                 devices=("cuda", "cpu")):
    """Checks shared by qlinear and qconv2d. Returns N (output channels).

    ``x`` floating fp16/bf16; ``w_packed`` int8 [N, packed_k(k, bits)] row-major contiguous;
    ``w_scale`` float32 [N] contiguous; ``a_scale`` float32 1-D non-empty contiguous;
    ``group_index`` int32/int64 with one element; ``bias`` None or floating [N] contiguous;
    all on x's device, whose type is one of ``devices`` (the precompile functions also take "meta").
    """
    check_bits(bits)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{what}: x must be float16 or bfloat16, got {x.dtype}")
    dev = x.device
    if dev.type not in devices:
        raise ValueError(f"{what}: x is on {dev}; only CUDA (or CPU through the Triton interpreter) is supported")
    for name, t in (("w_packed", w_packed), ("w_scale", w_scale), ("a_scale", a_scale),
                    ("group_index", group_index), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != dev:
            raise ValueError(f"{what}: {name} is on {t.device} but x is on {dev}")
    if w_packed.dtype != torch.int8:
        raise TypeError(f"{what}: w_packed must be int8 (bits={bits} packed), got {w_packed.dtype}")
    if w_packed.dim() != 2 or not w_packed.is_contiguous():
        raise ValueError(f"{what}: w_packed must be a contiguous 2-D [N, K'] tensor, got shape "
                         f"{tuple(w_packed.shape)} (contiguous={w_packed.is_contiguous()})")
    if k < 1:
        raise ValueError(f"{what}: reduction length k={k} must be >= 1")
    kp = packed_k(k, bits)
    if w_packed.shape[1] != kp:
        raise ValueError(f"{what}: w_packed has {w_packed.shape[1]} columns but k={k} with bits={bits} "
                         f"needs {kp}")
    n = w_packed.shape[0]
    if n < 1:
        raise ValueError(f"{what}: w_packed has no output channels")
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1 or w_scale.numel() != n \
            or not w_scale.is_contiguous():
        raise ValueError(f"{what}: w_scale must be a contiguous float32 [N={n}] tensor, got "
                         f"{w_scale.dtype} {tuple(w_scale.shape)}")
    if a_scale.dtype != torch.float32 or a_scale.dim() != 1 or a_scale.numel() < 1 \
            or not a_scale.is_contiguous():
        raise ValueError(f"{what}: a_scale must be a non-empty contiguous 1-D float32 table [num_groups], "
                         f"got {a_scale.dtype} {tuple(a_scale.shape)}")
    if group_index.dtype not in INDEX_DTYPES or group_index.numel() != 1:
        raise ValueError(f"{what}: group_index must be an int32/int64 tensor with one element, got "
                         f"{group_index.dtype} {tuple(group_index.shape)}")
    if bias is not None:
        if not bias.is_floating_point() or bias.dim() != 1 or bias.numel() != n or not bias.is_contiguous():
            raise ValueError(f"{what}: bias must be a contiguous floating [N={n}] tensor, got "
                             f"{bias.dtype} {tuple(bias.shape)}")
    return n
