"""Experimental W8A8 GEMM in Gluon that keeps one int8 wgmma in flight (issue 9).

Triton's ``tl.dot`` pipeliner never makes a wgmma with an int32 accumulator "properly async"
(WGMMAPipeline.cpp, rule 2.1: accumulator must be fp32), so every int8 ``tl.dot`` on sm_90 is
followed by ``wgmma.wait_group 0``. Gluon issues the wgmma by hand:

    for each K tile (two shared-memory slots, s = kt % 2):
        load x tile (fp16/bf16 -> registers), quantize to int8, store into a_smem[s]
        load the int8 weight tile [BLOCK_N, BLOCK_K] into b_smem[s]
        fence + CTA barrier                        (stores visible to every warpgroup's wgmma)
        acc = wgmma(a_smem[s], b_smem[s]^T, acc)   (async)
        wait(num_outstanding=1)                    -> this warpgroup's wgmma of tile kt-1 retired
        CTA barrier                                -> every warpgroup's has, so slot 1-s may be
                                                      overwritten next iteration

so the global loads and the quantization of tile kt+1 overlap the wgmma of tile kt. The second
barrier is needed because the tile is shared by two warpgroups (8 warps): each writes rows of
both slots' A and B that the other one's wgmma reads, and a warpgroup's wait only covers its
own wgmma. Triton's shared-memory barrier pass would add an equivalent one by itself (3.6 before
the stores, 3.9 after the wait); it is written out so the kernel does not rest on that pass, and
so that both versions emit the same two ``BAR.SYNC`` per iteration.

Same math, layouts and NaN rows as ``qgemm.qgemm_kernel`` with bits=8 (see its docstring; each thread
folds its 16-element K run here, and the per-row flag is converted to the accumulator's layout while the
last wgmma is in flight, so the epilogue only adds it); K must be a
multiple of BLOCK_K (the launcher checks). Gluon has no interpreter, so this kernel is only
compiled here (benchmarks/compile_check.py, on triton 3.6 and 3.9); its numerics are checked on a GPU by
benchmarks/bench_kernels.py (max_rel_err) and tests/test_triton_kernels.py (GPU tests).
``kernels.qlinear(..., path="gluon")`` runs it; ``tgpq.backends.triton`` makes it the W8A8 variant on
sm_90 when K % 64 == 0 after checking it once against the tl.dot kernel (the speed verdict is the
GPU benchmark's: ``ours_w8a8_gluon`` vs ``ours_w8a8_tl_dot``); ``TGPQ_WGMMA_ASYNC=0`` turns it off.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
from triton.language import PropagateNan

from ._launch import check_common

ROUND_MAGIC = gl.constexpr(12582912.0)  # 1.5 * 2**23
NAN_ALL = gl.constexpr(PropagateNan.ALL)
# CTA-wide barrier (bar.sync 0): gl.barrier in triton 3.9, gl.thread_barrier in 3.6 (renamed in between)
_cta_barrier = getattr(gl, "barrier", None) or getattr(gl, "thread_barrier", None)
if _cta_barrier is None:  # an ImportError, so that compile_check leaves the rows out and qlinear falls back
    raise ImportError(f"triton {triton.__version__}: Gluon has neither gl.barrier nor gl.thread_barrier")


@gluon.jit
def _max_nan(a, b):
    return gl.maximum(a, b, propagate_nan=NAN_ALL)


@gluon.jit
def _max_int(a, b):
    return gl.maximum(a, b)


@gluon.jit
def qgemm_w8a8_gluon_kernel(
    x_ptr, w_ptr, y_ptr, w_scale_ptr, a_scale_ptr, group_ptr, bias_ptr,
    M, N, K, NUM_GROUPS,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
):
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    # 16 contiguous K elements per thread, BLOCK_K // 16 threads along K: a warp covers whole K rows
    # of the tile, so no element is loaded, quantized or stored twice (BLOCK_K in 16..512)
    load_l: gl.constexpr = gl.BlockedLayout([1, 16], [32 // (BLOCK_K // 16), BLOCK_K // 16], [gl.num_warps(), 1],
                                            [1, 0])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                    instr_shape=[16, BLOCK_N, 32])
    smem_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64 if BLOCK_K == 64 else 128,
                                                element_bitwidth=8, rank=2)
    a_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_M, BLOCK_K], smem_l)
    b_smem = gl.allocate_shared_memory(gl.int8, [2, BLOCK_N, BLOCK_K], smem_l)

    g = gl.load(group_ptr).to(gl.int32)
    g = gl.minimum(gl.maximum(g, 0), NUM_GROUPS - 1)
    a_s = gl.load(a_scale_ptr + g)
    inv = gl.div_rn(gl.full([], 1.0, gl.float32), a_s)

    offs_m = (pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, load_l))) % M
    offs_n = (pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, load_l))) % N
    offs_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, load_l))
    x_ptrs = x_ptr + gl.expand_dims(offs_m, 1) * stride_xm + gl.expand_dims(offs_k, 0)
    w_ptrs = w_ptr + gl.expand_dims(offs_n, 1) * stride_wn + gl.expand_dims(offs_k, 0)

    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, acc_l)
    # NaN rows as in qgemm.py, each thread folding its own 16-element K run per tile; run_l is load_l with K
    # split into (thread, run), so the reshape moves no data and the loop has no shuffles
    run_l: gl.constexpr = gl.BlockedLayout([1, 1, 16], [32 // (BLOCK_K // 16), BLOCK_K // 16, 1], [gl.num_warps(), 1, 1],
                                           [2, 1, 0])
    FP16: gl.constexpr = x_ptr.dtype.element_ty == gl.float16
    nan_part = gl.zeros([BLOCK_M, BLOCK_K // 16], gl.float16 if FP16 else gl.int16, gl.SliceLayout(2, run_l))
    num_k = K // BLOCK_K
    for kt in range(num_k):
        s = kt % 2
        xa = gl.load(x_ptrs + kt * BLOCK_K)
        b = gl.load(w_ptrs + kt * BLOCK_K)
        if FP16:
            runs = gl.convert_layout(gl.reshape(xa, [BLOCK_M, BLOCK_K // 16, 16]), run_l)
            nan_part = gl.maximum(nan_part, gl.reduce(runs, 2, _max_nan), propagate_nan=NAN_ALL)
        else:
            bits = xa.to(gl.int16, bitcast=True) & 0x7FFF
            runs = gl.convert_layout(gl.reshape(bits, [BLOCK_M, BLOCK_K // 16, 16]), run_l)
            nan_part = gl.maximum(nan_part, gl.reduce(runs, 2, _max_int))
        v = gl.minimum(gl.maximum(xa.to(gl.float32) * inv, -127.0), 127.0)
        a = ((v + ROUND_MAGIC) - ROUND_MAGIC).to(gl.int8)
        a_smem.index(s).store(a)
        b_smem.index(s).store(b)
        fence_async_shared()
        _cta_barrier()
        acc = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        _cta_barrier()  # WAR: every warpgroup has retired wgmma(kt-1), so slot 1-s may be overwritten
    # NaN or +0 per row (qgemm.py), folded and moved to the accumulator's row layout while the last wgmma is in
    # flight; added last
    if FP16:
        row_max = gl.reduce(nan_part, 1, _max_nan)
        row_has_nan = row_max != row_max
    else:
        row_has_nan = gl.reduce(nan_part, 1, _max_int) > 0x7F80
    row_nan = gl.convert_layout(gl.where(row_has_nan, float("nan"), 0.0), gl.SliceLayout(1, acc_l))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    offs_ym = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_l))
    offs_yn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_l))
    n_ok = offs_yn < N
    w_s = gl.load(w_scale_ptr + offs_yn, mask=n_ok, other=0.0)
    y = acc.to(gl.float32) * gl.expand_dims(a_s * w_s, 0)
    if HAS_BIAS:
        y = y + gl.expand_dims(gl.load(bias_ptr + offs_yn, mask=n_ok, other=0.0).to(gl.float32), 0)
    y = y + gl.expand_dims(row_nan, 1)
    y_ptrs = y_ptr + gl.expand_dims(offs_ym, 1) * stride_ym + gl.expand_dims(offs_yn, 0)
    mask = gl.expand_dims(offs_ym < M, 1) & gl.expand_dims(n_ok, 0)
    gl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


CONFIG = (128, 128, 64, 8)  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps: two warpgroups of 64 rows (127 regs; 4 warps needs 255)


def _args(x2, w_packed, y, w_scale, a_scale, group_index, bias, m, n, k, config):
    bm, bn, bk, warps = config
    return ((x2, w_packed, y, w_scale, a_scale, group_index, bias if bias is not None else w_scale,
             m, n, k, a_scale.numel(), x2.stride(0), w_packed.stride(0), y.stride(0)),
            dict(HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps))


def launch(x2, w_packed, y, w_scale, a_scale, group_index, bias, m, n, k, config=CONFIG):
    """Launch on validated tensors: x2 [m, k] contiguous, y [m, n] preallocated, k % BLOCK_K == 0."""
    args, consts = _args(x2, w_packed, y, w_scale, a_scale, group_index, bias, m, n, k, config)
    grid = (triton.cdiv(m, config[0]), triton.cdiv(n, config[1]))
    with torch.cuda.device(x2.device):
        qgemm_w8a8_gluon_kernel[grid](*args, **consts)


def warmup(x2, w_packed, y, w_scale, a_scale, group_index, bias, m, n, k, config=CONFIG):
    """Compile without launching (``kernels.qgemm.precompile_qlinear``); tensors may be on the meta device."""
    args, consts = _args(x2, w_packed, y, w_scale, a_scale, group_index, bias, m, n, k, config)
    qgemm_w8a8_gluon_kernel.warmup(*args, **consts, grid=(1, 1))


def qlinear_w8a8_gluon(x, w_packed, w_scale, a_scale, group_index, bias=None, *, k: int, config=CONFIG):
    """Same contract as ``kernels.qlinear`` with bits=8; CUDA sm_90 only, k % BLOCK_K == 0."""
    n = check_common(x, w_packed, w_scale, a_scale, group_index, bias, bits=8, k=k, what="qlinear_w8a8_gluon")
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] != 9:
        raise ValueError("qlinear_w8a8_gluon needs a Hopper (sm_90) CUDA device")
    if x.shape[-1] != k or not x.is_contiguous() or k % config[2]:
        raise ValueError(f"qlinear_w8a8_gluon: x must be contiguous [..., k] with k % {config[2]} == 0")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        launch(x2, w_packed, y, w_scale, a_scale, group_index, bias, m, n, k, config)
    return y.reshape(*x.shape[:-1], n)
