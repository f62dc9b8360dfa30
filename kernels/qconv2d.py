"""Fused W8A8 / W4A8 implicit-GEMM conv2d over NHWC (channels_last) activations.

GEMM view: ``M = B * Ho * Wo`` output pixels, ``N = Cout``, ``K = KH * KW * Cin`` ordered
``(kh, kw, cin)``: the weight is ``w.permute(0, 2, 3, 1).reshape(N, K)`` then int8 / int4
packed exactly as for ``qlinear`` (see kernels/qgemm.py). The A tile is gathered straight from
the NHWC input (no im2col buffer), zero outside the padded image, and quantized in registers:
``q(v) = clamp(round_half_even(float32(v) * (1 / a_scale[g])), -127, 127)``. Padding contributes
exact zeros (q(0) = 0). Epilogue: ``y = float32(acc) * (a_scale[g] * w_scale[n]) + bias[n]``,
stored channels_last in x's dtype. An output pixel whose receptive field holds a NaN is NaN in every
channel, as in float: found and applied exactly as in kernels/qgemm.py (a row of the implicit GEMM is
one output pixel's receptive field; padding loads as zeros, never NaN).

Two A-address modes (constexpr ``CIN_ALIGNED``): when ``Cin % BLOCK_K == 0`` a K tile lies in
one filter tap (kh, kw), so the tap and its padding mask are scalars per tile and the channel
run is contiguous; otherwise every K column is decomposed into (kh, kw, cin) (e.g. the RGB stem).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from ._launch import INT32_MAX, check_common, interpreted, raw_python_fn
from .qgemm import BF16_NAN_BITS, NAN_ALL, NAN_RUN, ROUND_MAGIC, _elementwise_max, _max_nan


# index-only integers are not specialized (see qgemm.py): H, W, HO, WO and M change with the layer and the
# batch without changing the code
@triton.jit(do_not_specialize=["H", "W", "HO", "WO", "M", "NUM_GROUPS", "M_BUCKET"])
def qconv2d_kernel(
    x_ptr, w_ptr, y_ptr, w_scale_ptr, a_scale_ptr, group_ptr, bias_ptr,
    H, W, CIN, HO, WO, M, N, K, KP, NUM_GROUPS, M_BUCKET,
    stride_xb, stride_xh, stride_xw, stride_wn,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, CIN_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M pixels, BLOCK_N channels] tile of y (NHWC, row stride N).

    x strides are in elements with unit channel stride (channels_last). No @triton.jit library
    helpers are used, so the interpreter can run this function directly (see kernels/_launch.py).
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

    g = tl.load(group_ptr).to(tl.int32)
    g = tl.minimum(tl.maximum(g, 0), NUM_GROUPS - 1)
    a_s = tl.load(a_scale_ptr + g)
    inv = tl.math.div_rn(tl.full((), 1.0, tl.float32), a_s)

    # output pixel -> top-left input corner of its receptive field
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # wrapped rows are never stored
    ow = offs_m % WO
    oh = (offs_m // WO) % HO
    ob = offs_m // (WO * HO)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_row = ob * stride_xb + ih0 * stride_xh + iw0 * stride_xw  # may point outside: masked

    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    if BITS == 8:
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]
    else:
        offs_kp = tl.arange(0, BLOCK_K // 2)
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_kp[None, :]

    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    # NaN rows: each thread folds its own K runs of every A tile into per-run partials (see the module docstring)
    FP16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    nan_part = tl.full((BLOCK_M, BLOCK_K // NAN_RUN), 0, tl.float16 if FP16 else tl.int16)
    for kt in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k0 = kt * BLOCK_K
        if CIN_ALIGNED:
            tap = k0 // CIN
            r = tap // KW
            s = tap % KW
            c0 = k0 - tap * CIN
            ih = ih0 + r * DH
            iw = iw0 + s * DW
            row_ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_ptrs = x_ptr + (x_row + (r * DH) * stride_xh + (s * DW) * stride_xw + c0)[:, None] + offs_k[None, :]
            xa = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            kk = k0 + offs_k
            c = kk % CIN
            tap = kk // CIN
            r = tap // KW
            s = tap % KW
            ih = ih0[:, None] + (r * DH)[None, :]
            iw = iw0[:, None] + (s * DW)[None, :]
            ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (kk < K)[None, :]
            x_ptrs = x_ptr + x_row[:, None] + ((r * DH) * stride_xh + (s * DW) * stride_xw + c)[None, :]
            xa = tl.load(x_ptrs, mask=ok, other=0.0)
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
                b = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0)
        else:
            if EVEN_K:
                wp = tl.load(w_ptrs)
            else:
                wp = tl.load(w_ptrs, mask=offs_kp[None, :] < KP - kt * (BLOCK_K // 2), other=0)
            lo = (wp << 4) >> 4
            hi = wp >> 4
            b = tl.trans(tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)))
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
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
    y_ptrs = y_ptr + offs_ym[:, None] * N + offs_yn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_ym[:, None] < M) & n_ok[None, :])


GROUP_M = 8
_KEY = ["M_BUCKET", "N", "K", "CIN", "BITS", "HAS_BIAS", "KH", "KW", "SH", "SW"]
_HEUR = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
         "CIN_ALIGNED": lambda a: a["CIN"] % a["BLOCK_K"] == 0}

qconv2d_sm90 = triton.autotune(configs=configs.to_triton(configs.CONV_SM90, GROUP_M=GROUP_M), key=_KEY,
                             do_bench=configs.autotune_bench())(
    triton.heuristics(_HEUR)(qconv2d_kernel))
qconv2d_sm80 = triton.autotune(configs=configs.to_triton(configs.CONV_SM80, GROUP_M=GROUP_M), key=_KEY,
                             do_bench=configs.autotune_bench())(
    triton.heuristics(_HEUR)(qconv2d_kernel))


def _pair(v, name):
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(t) for t in v)
    if len(v) != 2:
        raise ValueError(f"qconv2d: {name} must be an int or a pair, got {v!r}")
    return v


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _launch_args(x, w_packed, w_scale, a_scale, group_index, bias, bits, in_channels, kernel_size, stride, padding,
                 dilation, devices=("cuda", "cpu")):
    """Validate ``qconv2d``'s inputs; return ``(y, args, consts)``: ``y`` allocated (channels_last), ``args``
    the kernel's positional arguments (None when there is nothing to launch) and its geometry constexprs."""
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"qconv2d: bad geometry kernel={kh, kw} stride={sh, sw} padding={ph, pw} dilation={dh, dw}")
    if in_channels < 1:
        raise ValueError(f"qconv2d: in_channels={in_channels} must be >= 1")
    k = kh * kw * in_channels
    n = check_common(x, w_packed, w_scale, a_scale, group_index, bias, bits=bits, k=k, what="qconv2d",
                     devices=devices)
    if x.dim() != 4:
        raise ValueError(f"qconv2d: x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(f"qconv2d: x has {c} channels but the layer expects in_channels={in_channels}")
    if not x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) != 1:
        raise ValueError("qconv2d: x must be channels_last (x.contiguous(memory_format=torch.channels_last))")
    ho, wo = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(f"qconv2d: input {h}x{w} is too small for kernel {kh}x{kw} with padding {ph, pw}")
    y = torch.empty((b, n, ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    m = b * ho * wo
    consts = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, BITS=bits, HAS_BIAS=bias is not None)
    if m == 0:
        return y, None, consts
    if max(x.numel(), y.numel(), w_packed.numel()) > INT32_MAX:
        raise ValueError("qconv2d: tensors with more than 2**31 - 1 elements are not supported (int32 offsets)")
    bias_arg = bias if bias is not None else w_scale  # never read when HAS_BIAS is False
    args = (x, w_packed, y, w_scale, a_scale, group_index, bias_arg,
            h, w, c, ho, wo, m, n, k, w_packed.shape[1], a_scale.numel(), configs.m_bucket(m),
            x.stride(0), x.stride(2), x.stride(3), w_packed.stride(0))
    return y, args, consts


def qconv2d(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits: int, in_channels: int,
            kernel_size, stride, padding, dilation=(1, 1)):
    """Quantized conv2d (groups=1) on int8 tensor cores; see the module docstring for the math.

    x: [B, Cin, H, W] float16/bfloat16 in channels_last memory format. w_packed: int8
    [Cout, KH*KW*Cin] (bits=8) or [Cout, ceil(KH*KW*Cin/2)] (bits=4), K ordered (kh, kw, cin).
    w_scale float32 [Cout]; a_scale float32 [num_groups]; group_index int32/int64 with one
    element (clamped on the device to [0, num_groups)); bias None or floating [Cout].
    Returns y [B, Cout, Ho, Wo] in x's dtype, channels_last. An output pixel whose receptive field holds
    a NaN is NaN in every channel (as in float). CPU tensors run through Triton's interpreter (tests only).
    """
    y, args, geo = _launch_args(x, w_packed, w_scale, a_scale, group_index, bias, bits, in_channels, kernel_size,
                                stride, padding, dilation)
    if args is None:
        return y
    n, c = y.shape[1], x.shape[1]
    m, k = y.numel() // n, geo["KH"] * geo["KW"] * c
    if x.device.type == "cpu":
        bm, bn, bk, _, _ = configs.INTERPRETER
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        interpreted(raw_python_fn(qconv2d_kernel))[grid](
            *args, **geo, EVEN_K=k % bk == 0, CIN_ALIGNED=c % bk == 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M)
    else:
        kern = qconv2d_sm90 if configs.family(torch.cuda.get_device_capability(x.device)) == "sm90" else qconv2d_sm80
        with torch.cuda.device(x.device):
            kern[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](*args, **geo)
    return y


def precompile_qconv2d(x, w_packed, w_scale, a_scale, group_index, bias=None, *, bits: int, in_channels: int,
                       kernel_size, stride, padding, dilation=(1, 1), capability=(9, 0)):
    """Compile, without launching, every autotune config of the kernel ``qconv2d`` would launch for these
    arguments on a device of compute ``capability`` (see ``kernels.qgemm.precompile_qlinear``; tensors may
    be on the meta device)."""
    _, args, geo = _launch_args(x, w_packed, w_scale, a_scale, group_index, bias, bits, in_channels, kernel_size,
                                stride, padding, dilation, devices=("cuda", "cpu", "meta"))
    if args is not None:
        kern = qconv2d_sm90 if configs.family(capability) == "sm90" else qconv2d_sm80
        kern.warmup(*args, **geo, grid=(1, ))
