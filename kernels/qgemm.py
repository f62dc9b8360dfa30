"""Fused W8A8 / W4A8 GEMM: fp16/bf16 activations quantized in the A-load, int8 tensor cores.

``y[m, n] = float32(sum_k q(x[m, k]) * w[n, k]) * (a_scale[g] * w_scale[n]) + bias[n]``

with ``q(v) = clamp(round_half_even(float32(v) * inv), -127, 127)``, ``inv = 1 / a_scale[g]``
(correctly rounded fp32 reciprocal, computed once per program) and ``g = group_index[0]`` read
on the device (clamped to ``[0, len(a_scale) - 1]``; no host sync, CUDA-graph friendly).

Layouts
-------
* ``x``: [M, K] fp16 or bf16, row-major (leading dims are flattened by the launcher).
* ``w_packed``: int8 [N, K] row-major (bits=8), or int4 packed two per byte along K as int8
  [N, ceil(K/2)] (bits=4): byte j of row n holds element 2j in its low nibble and 2j+1 in its
  high nibble, two's-complement nibbles; odd K is padded with a 0 nibble. Unpacked to int8 in
  registers (``lo = (b << 4) >> 4``, ``hi = b >> 4``, arithmetic shifts).
* ``y``: [M, N] with x's dtype, row-major.

Rounding: ``v`` is clamped first, then rounded with the fp32 magic-number trick
``(v + 1.5 * 2**23) - 1.5 * 2**23`` (exact round-half-even for |v| < 2**22). The clamp between
the multiply and the add also keeps the compiler from contracting them into an FMA.

Non-finite activations (issue 14), as the reference backend (fake-quantize, then compute in float): a
row of x that holds a NaN gives a NaN row of y; +-inf is clamped to +-127 steps like any large value.
The quantization itself cannot carry a NaN (the clamp and the int8 cast turn it into a finite step), so
the kernel finds NaN rows beside it. Each thread folds its own 8-element K run (one 16-byte load) of
every A tile into a per-run partial ``nan_part`` [BLOCK_M, BLOCK_K // 8], with no shuffles in the loop:
fp16 by a NaN-propagating max (PTX ``max.NaN.f16x2``; +-inf never makes a NaN), bf16 by an integer max
of the bits without the sign (a NaN iff above 0x7F80: the interpreter holds bf16 as raw bits, so the CPU
tests check the very same integer code; folding bf16's fp32 values instead takes fewer instructions, 431
instead of 521 in the sm_80 W8A8 K loop, but pushed the W4A8 bf16 conv, 128x128x64 with 4 warps, to 255
registers and a spill on sm_90 under triton 3.6). Masked and padded elements load as 0 and never flag
a row. After the loop the partials are folded per row into ``row_nan`` (NaN or +0), which the epilogue
adds last, after the scale and the bias: finite outputs keep their bits (y + 0.0 == y; y is never -0.0,
the scales being positive), and an add lets the Gluon kernel convert ``row_nan`` to the accumulator's
layout while its last wgmma is in flight (a select on a converted flag there made ptxas serialize the
wgmma, triton 3.6). The quantized values of a NaN row are whatever the clamp makes of the NaN: that row
of the accumulator is never used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.standard import _elementwise_max  # tl.max's combine (the interpreter's np.max)

from . import configs
from ._launch import INT32_MAX, check_common, interpreted, raw_python_fn

ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
NAN_ALL = tl.constexpr(tl.PropagateNan.ALL)
NAN_RUN = tl.constexpr(8)  # K elements of one thread's 16-byte fp16/bf16 load: folded in its registers per tile
BF16_NAN_BITS = tl.constexpr(0x7F80)  # |bf16 bits| above this (exponent all ones, mantissa not 0) is a NaN


@triton.jit
def _max_nan(a, b):
    """NaN-propagating max (PTX max.NaN, packed f16x2): the fold that finds NaN rows; +-inf never become NaN."""
    return tl.maximum(a, b, propagate_nan=NAN_ALL)


# Integer arguments that only enter index arithmetic (never an address's alignment) are not specialized:
# Triton would otherwise compile a separate kernel for each pattern of "divisible by 16" / "equal to 1"
# among them (M = 1, a batch that changes M's divisibility, the number of groups), with the same code.
@triton.jit(do_not_specialize=["M", "NUM_GROUPS", "M_BUCKET"])
def qgemm_kernel(
    x_ptr, w_ptr, y_ptr, w_scale_ptr, a_scale_ptr, group_ptr, bias_ptr,
    M, N, K, KP, NUM_GROUPS, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] output tile; grouped program order for L2 reuse.

    Uses no @triton.jit library helpers (tl.cdiv, tl.zeros, tl.interleave) so that the launcher
    can run the same function through the interpreter without TRITON_INTERPRET set at import.

    KP is the packed row length of w (K for bits=8, ceil(K/2) for bits=4). EVEN_K: K % BLOCK_K == 0
    (K-masks dropped). M_BUCKET is only an autotune key.
    """
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # activation scale of the current timestep group, read on the device
    g = tl.load(group_ptr).to(tl.int32)
    g = tl.minimum(tl.maximum(g, 0), NUM_GROUPS - 1)
    a_s = tl.load(a_scale_ptr + g)
    inv = tl.math.div_rn(tl.full((), 1.0, tl.float32), a_s)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # wrapped rows are never stored
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    if BITS == 8:
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of [N, K]
    else:
        offs_kp = tl.arange(0, BLOCK_K // 2)
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_kp[None, :]  # packed [BLOCK_N, BLOCK_K // 2]

    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    # NaN rows: each thread folds its own K runs of every A tile into per-run partials (see the module docstring)
    FP16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    nan_part = tl.full((BLOCK_M, BLOCK_K // NAN_RUN), 0, tl.float16 if FP16 else tl.int16)
    for kt in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if EVEN_K:
            xa = tl.load(x_ptrs)
        else:
            xa = tl.load(x_ptrs, mask=offs_k[None, :] < K - kt * BLOCK_K, other=0.0)
        if FP16:
            runs = tl.reshape(xa, (BLOCK_M, BLOCK_K // NAN_RUN, NAN_RUN))
            nan_part = tl.maximum(nan_part, tl.reduce(runs, 2, _max_nan), propagate_nan=NAN_ALL)
        else:
            runs = tl.reshape(xa.to(tl.int16, bitcast=True) & 0x7FFF, (BLOCK_M, BLOCK_K // NAN_RUN, NAN_RUN))
            nan_part = tl.maximum(nan_part, tl.reduce(runs, 2, _elementwise_max))
        v = tl.minimum(tl.maximum(xa.to(tl.float32) * inv, -127.0), 127.0)
        a = ((v + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int8)
        if BITS == 8:
            if EVEN_K:
                b = tl.load(w_ptrs)
            else:
                b = tl.load(w_ptrs, mask=offs_k[:, None] < K - kt * BLOCK_K, other=0)
        else:
            if EVEN_K:
                wp = tl.load(w_ptrs)
            else:
                wp = tl.load(w_ptrs, mask=offs_kp[None, :] < KP - kt * (BLOCK_K // 2), other=0)
            lo = (wp << 4) >> 4
            hi = wp >> 4
            # interleave along K: [BLOCK_N, BLOCK_K // 2, 2] -> [BLOCK_N, BLOCK_K], k = 2j (lo), 2j + 1 (hi)
            b = tl.trans(tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)))
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        if BITS == 8:
            w_ptrs += BLOCK_K
        else:
            w_ptrs += BLOCK_K // 2

    if FP16:
        row_max = tl.reduce(nan_part, 1, _max_nan)
        row_has_nan = row_max != row_max
    else:
        row_has_nan = tl.reduce(nan_part, 1, _elementwise_max) > BF16_NAN_BITS
    row_nan = tl.where(row_has_nan, float("nan"), 0.0)
    offs_ym = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_yn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_yn < N
    w_s = tl.load(w_scale_ptr + offs_yn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * (a_s * w_s)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_yn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y + row_nan[:, None]  # last: NaN, or +0 (finite values unchanged)
    y_ptrs = y_ptr + offs_ym[:, None] * stride_ym + offs_yn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_ym[:, None] < M) & n_ok[None, :])


GROUP_M = 8
_KEY = ["M_BUCKET", "N", "K", "BITS", "HAS_BIAS"]  # tensor dtypes are added by triton.autotune
_HEUR = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}

qgemm_sm90 = triton.autotune(configs=configs.to_triton(configs.GEMM_SM90, GROUP_M=GROUP_M), key=_KEY,
                             do_bench=configs.autotune_bench())(
    triton.heuristics(_HEUR)(qgemm_kernel))
qgemm_sm80 = triton.autotune(configs=configs.to_triton(configs.GEMM_SM80, GROUP_M=GROUP_M), key=_KEY,
                             do_bench=configs.autotune_bench())(
    triton.heuristics(_HEUR)(qgemm_kernel))


def _grid(meta, m, n):
    return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _launch_args(x, w_packed, w_scale, a_scale, group_index, bias, bits, k, path, devices=("cuda", "cpu")):
    """Validate ``qlinear``'s inputs; return ``(lead, x2, y, args)``: ``y`` [m, n] allocated, ``args`` the
    kernel's positional arguments (None when there is nothing to launch, m == 0)."""
    if path not in ("tl_dot", "gluon"):
        raise ValueError(f"qlinear: path must be 'tl_dot' or 'gluon', got {path!r}")
    n = check_common(x, w_packed, w_scale, a_scale, group_index, bias, bits=bits, k=k, what="qlinear",
                     devices=devices)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"qlinear: x has shape {tuple(x.shape)}, its last dim must be k={k}")
    if not x.is_contiguous():
        raise ValueError("qlinear: x must be contiguous (call .contiguous() first)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return lead, x2, y, None
    if max(x2.numel(), y.numel(), w_packed.numel()) > INT32_MAX:
        raise ValueError("qlinear: tensors with more than 2**31 - 1 elements are not supported (int32 offsets)")
    bias_arg = bias if bias is not None else w_scale  # never read when HAS_BIAS is False
    args = (x2, w_packed, y, w_scale, a_scale, group_index, bias_arg,
            m, n, k, w_packed.shape[1], a_scale.numel(), configs.m_bucket(m),
            x2.stride(0), w_packed.stride(0), y.stride(0))
    return lead, x2, y, args


def _check_gluon(bits, k, capability):
    if bits != 8 or capability[0] != 9 or k % 64:
        raise ValueError("qlinear(path='gluon') needs bits=8, an sm_90 device and k % 64 == 0")


def qlinear(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits: int, k: int, path: str = "tl_dot"):
    """Quantized linear layer on int8 tensor cores (see the module docstring for the math).

    x: [..., K] float16/bfloat16, contiguous. w_packed: int8 [N, K] (bits=8) or [N, ceil(K/2)]
    (bits=4). w_scale: float32 [N]. a_scale: float32 [num_groups]. group_index: int32/int64, one
    element, on x's device; a value outside ``[0, num_groups)`` is clamped on the device.
    bias: None or floating [N]. Returns [..., N] in x's dtype. A NaN in a row of x makes that row of
    the output NaN (as in float); +-inf is clamped to +-127 steps like any large value.

    CUDA tensors run the autotuned kernel; CPU tensors run the same kernel through Triton's
    interpreter (slow; for tests). ``path``: ``"tl_dot"`` (default) the autotuned ``tl.dot`` kernel;
    ``"gluon"`` the W8A8 Gluon kernel that keeps one int8 wgmma in flight (kernels/qgemm_gluon.py;
    bits=8, an sm_90 device and ``k % 64 == 0``). Which one serves a model is chosen once per device
    by ``tgpq.backends.triton``, not here.
    """
    lead, x2, y, args = _launch_args(x, w_packed, w_scale, a_scale, group_index, bias, bits, k, path)
    m, n = y.shape
    if args is None:
        return y.reshape(*lead, n)
    if path == "gluon":
        if x.device.type != "cuda":
            raise ValueError("qlinear(path='gluon') needs bits=8, an sm_90 device and k % 64 == 0")
        _check_gluon(bits, k, torch.cuda.get_device_capability(x.device))
        from .qgemm_gluon import launch as launch_gluon
        launch_gluon(x2, w_packed, y, w_scale, a_scale, group_index, bias, m, n, k)
        return y.reshape(*lead, n)
    if x.device.type == "cpu":
        bm, bn, bk, _, _ = configs.INTERPRETER
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        interpreted(raw_python_fn(qgemm_kernel))[grid](
            *args, BITS=bits, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M)
    else:
        kern = qgemm_sm90 if configs.family(torch.cuda.get_device_capability(x.device)) == "sm90" else qgemm_sm80
        with torch.cuda.device(x.device):
            kern[lambda meta: _grid(meta, m, n)](*args, BITS=bits, HAS_BIAS=bias is not None)
    return y.reshape(*lead, n)


def precompile_qlinear(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits: int, k: int,
                       path: str = "tl_dot", capability=(9, 0)):
    """Compile, without launching, what ``qlinear`` would launch for these arguments on a device of compute
    ``capability``: every autotune config of the ``tl.dot`` kernel, or the Gluon kernel. Tensors may be on
    the meta device (only dtypes, shapes, strides and 16-byte alignment enter Triton's specialization, so
    no memory is needed); Triton's active driver must target that device (a GPU, or a stand-in target for
    compiling on a machine without one). Fills Triton's caches, so that a later launch only loads."""
    _, x2, y, args = _launch_args(x, w_packed, w_scale, a_scale, group_index, bias, bits, k, path,
                                  devices=("cuda", "cpu", "meta"))
    if args is None:
        return
    if path == "gluon":
        _check_gluon(bits, k, capability)
        from .qgemm_gluon import warmup as warmup_gluon
        warmup_gluon(x2, w_packed, y, w_scale, a_scale, group_index, bias, *y.shape, k)
        return
    kern = qgemm_sm90 if configs.family(capability) == "sm90" else qgemm_sm80
    kern.warmup(*args, BITS=bits, HAS_BIAS=bias is not None, grid=(1, ))
