#!/usr/bin/env python3
"""Kernel microbenchmarks (GPU): fused W8A8 / W4A8 Triton GEMM and conv vs torch baselines.

    python benchmarks/bench_kernels.py --out benchmarks/results      # the full grid, on a CUDA machine
    python benchmarks/bench_kernels.py --suite --json F --md F --deadline-s 60   # the GPU suite's shapes
    python benchmarks/bench_kernels.py --tiny --json F --md F        # no GPU: the interpreter on tiny shapes
    python benchmarks/bench_kernels.py --precompile --world 8 --rank 0   # compile ahead (see below)
    python benchmarks/bench_kernels.py --dry-run                      # list the shapes (any machine)

Shapes. Full grid: GEMM M in {16, 256, 4096, 16384} x N = K in {1024, 4096}; conv: the distinct
quantized Conv2d layers of the DDPM CIFAR-10 UNet (``UNET_QLAYERS``: block_out_channels (128, 256, 256,
256), 32x32 input, each with the input size it sees, the stride-2 downsamplers on their explicitly
padded 33x33 / 17x17 / 9x9 inputs) at batch 64 and 256. ``--suite``: the shapes that decide the issue's
targets, in priority order: GEMM 4096^3 (W8A8 >= 1.6x fp16), GEMM M=16 N=K=4096 (weight-bandwidth-bound:
W4A8 vs W8A8), then every 3x3 conv of the UNet at batch 256, largest first (int8 >= 1.3x cuDNN fp16
channels_last). Results are written after every shape, so a run cut short (``--deadline-s``) keeps what
it measured; shapes not started are listed under ``meta.skipped``.

Per shape and variant: the median of ``triton.testing.do_bench`` over a rotating set of input
buffers (together larger than the L2 cache, so no run reads a cache-warm copy), TOPS =
2*M*N*K / time (the conv's implicit-GEMM M = B*Ho*Wo, K = kh*kw*Cin), and the ratio to the
device's int8 peak *measured* at the start (``torch._int_mm`` on 8192^3; the fp16 peak likewise
with ``torch.matmul``). Variants:

* ``ours_w8a8`` / ``ours_w4a8``: kernels.qlinear / kernels.qconv2d (activation quantization fused).
* ``ours_w8a8_tl_dot`` / ``ours_w8a8_gluon`` (GEMM, sm_90, K % 64 == 0): the two W8A8 paths forced
  (``ours_w8a8`` is ``qlinear``'s default, the ``tl.dot`` kernel; the triton backend serves W8A8 with
  the Gluon kernel on sm_90). The Gluon kernel keeps one int8 wgmma in flight, the tl.dot one cannot
  (issue 9); this pair settles which is faster.
* ``torch_fp16``: cuBLAS ``x @ w.T + b`` / cuDNN ``F.conv2d`` on channels_last fp16.
* ``int_mm_sep`` (GEMM only): quantize pass + ``torch._int_mm`` + dequantize pass (what an int8
  library without fusion does). torch has no int8 conv on CUDA, so convs have no such row.
  ``int_mm_cudaquant``: the same with the quantize pass done by the csrc/cuda op
  ``torch.ops.tgpq.quantize_act`` (one fused pass), when the extension was built with CUDA.

Every ``ours`` result is also checked on the device against the int32 reference (quantize,
``torch._int_mm`` or an fp64 conv, dequantize): ``max_rel_err`` in the JSON.
Writes ``kernels-<device>-<date>.json`` and ``.md`` under ``--out`` (or ``--json`` / ``--md``).

``--tiny`` (any machine, CUDA or not): the same code on one small GEMM and one small conv; on a CPU the
kernels run through Triton's interpreter and times are one ``time.perf_counter`` run, meaningless as
speed (the GPU suite's rehearsal uses it to check the step end to end).

``--precompile``: compile, without launching, every kernel specialization the GPU suite will launch
(this benchmark's suite shapes, the DDPM UNet's layers at the sampling benchmark's batches and the GPU
tests' shapes; ``precompile_items``), filling Triton's on-disk cache so that later processes only load.
``--world W --rank R`` splits the work exactly: every process walks the same list, and a Triton
``jit_cache_hook`` lets a compile through only when the hash of Triton's own specialization key falls
to this rank. ``--count`` compiles nothing and prints how many distinct compiles the list needs.
Without a GPU, ``--fake-target sm_90`` puts a stand-in driver in place so the same path compiles for
sm_90 here (tests and the rehearsal use it; ``--max-compiles`` bounds the work).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEMM_M = (16, 256, 4096, 16384)
GEMM_NK = (1024, 4096)
BATCHES = (64, 256)
# The quantized layers of the DDPM CIFAR-10 UNet (diffusers UNet2DModel, block_out_channels (128, 256, 256,
# 256), layers_per_block 2, DownBlock2D/AttnDownBlock2D/DownBlock2D/DownBlock2D, downsample_padding 0,
# 32x32x3 input; conv_in, conv_out and the time embedding stay in float), each distinct geometry once with
# the input it sees per image: ("conv", Cin, Cout, kernel, stride, padding, H, W) and
# ("linear", in_features, out_features, rows per image). tests/test_gpu_suite.py checks this list
# against a converted model.
UNET_QLAYERS = (
    ("conv", 128, 128, 3, 1, 1, 32, 32), ("conv", 128, 128, 3, 2, 0, 33, 33), ("conv", 128, 256, 1, 1, 0, 16, 16),
    ("conv", 128, 256, 3, 1, 1, 16, 16), ("conv", 256, 128, 1, 1, 0, 32, 32), ("conv", 256, 128, 3, 1, 1, 32, 32),
    ("conv", 256, 256, 3, 1, 1, 16, 16), ("conv", 256, 256, 3, 1, 1, 32, 32), ("conv", 256, 256, 3, 1, 1, 4, 4),
    ("conv", 256, 256, 3, 1, 1, 8, 8), ("conv", 256, 256, 3, 2, 0, 17, 17), ("conv", 256, 256, 3, 2, 0, 9, 9),
    ("conv", 384, 128, 1, 1, 0, 32, 32), ("conv", 384, 128, 3, 1, 1, 32, 32), ("conv", 384, 256, 1, 1, 0, 16, 16),
    ("conv", 384, 256, 3, 1, 1, 16, 16), ("conv", 512, 256, 1, 1, 0, 16, 16), ("conv", 512, 256, 1, 1, 0, 4, 4),
    ("conv", 512, 256, 1, 1, 0, 8, 8), ("conv", 512, 256, 3, 1, 1, 16, 16), ("conv", 512, 256, 3, 1, 1, 4, 4),
    ("conv", 512, 256, 3, 1, 1, 8, 8),
    ("linear", 256, 256, 16), ("linear", 256, 256, 256), ("linear", 512, 128, 1), ("linear", 512, 256, 1),
)
UNET_CONVS = tuple(layer[1:] for layer in UNET_QLAYERS if layer[0] == "conv")  # (Cin, Cout, k, s, p, H, W)
SUITE_GEMMS = ((4096, 4096, 4096), (16, 4096, 4096))
SUITE_BATCH = 256
TINY_GEMMS = ((33, 48, 96), )
TINY_CONVS = ((1, 16, 24, 3, 1, 1, 5, 5), )  # (B, Cin, Cout, k, stride, pad, H, W): K = 144, odd M = 25
# What else the GPU suite launches, for --precompile: the sampling benchmark's batches, the batch of
# tests/test_gpu_backends.py, and the shapes of the GPU tests in tests/test_triton_kernels.py (a shape
# missing here is compiled when its test runs, only slower).
SAMPLING_BATCHES = (256, 64)
BACKEND_TEST_BATCH = 4
TEST_GEMMS = ((1, 1024, 1024), (333, 770, 1000), (4096, 4096, 4096))  # x fp16 and bf16, W8A8 and W4A8
TEST_CONVS = ((8, 128, 32, 32, 128, 3, 1, 1), (8, 256, 16, 16, 256, 3, 2, 1), (8, 384, 16, 16, 256, 1, 1, 0),
              (4, 3, 32, 32, 128, 3, 1, 1))  # (B, Cin, H, W, Cout, k, stride, pad), fp16, W8A8 and W4A8
DEVICE = "cuda"  # the benchmark device: "cpu" with --tiny on a machine without CUDA
ROTATE_BYTES = 256 << 20  # rotating input sets span at least this much (> 50 MB H100 L2)


def gemm_shapes():
    return [(m, nk, nk) for nk in GEMM_NK for m in GEMM_M]


def conv_shapes():
    return [(b, *c) for b in BATCHES for c in UNET_CONVS]


def conv_flops(b, cin, cout, k, s, p, h, w):
    return 2 * b * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1) * cout * k * k * cin


def suite_conv_shapes():
    """Every 3x3 conv of the UNet at batch 256, the most work first."""
    return sorted(((SUITE_BATCH, *c) for c in UNET_CONVS if c[2] == 3), key=lambda s: -conv_flops(*s))


def _kernels():
    try:
        import kernels as K
    except ImportError:
        import tgpq.kernels as K
    return K


def pack_int4(w):
    """int8 [N, K] in [-8, 7] -> [N, ceil(K/2)] (low nibble = even k), on w's device."""
    import torch
    n, k = w.shape
    if k % 2:
        w = torch.cat([w, torch.zeros(n, 1, dtype=torch.int8, device=w.device)], 1)
    return ((w[:, 0::2] & 0xF) | (w[:, 1::2] << 4)).to(torch.int8).contiguous()


class Rotating:
    """Calls fn(*inputs[i]) with i cycling over copies, so the timed runs do not hit L2 (one copy pair on
    the CPU, where nothing is cached that way worth the memory)."""

    def __init__(self, make, nbytes):
        n = max(2, min(64, math.ceil(ROTATE_BYTES / max(1, nbytes)))) if DEVICE == "cuda" else 2
        self.sets = [make() for _ in range(n)]
        self.i = 0

    def __call__(self, fn):
        def run():
            self.i = (self.i + 1) % len(self.sets)
            return fn(*self.sets[self.i])
        return run


def bench(fn):
    """Median ms: ``triton.testing.do_bench`` on CUDA; elsewhere (the interpreter: a code-path check, its times
    are no speeds) one ``perf_counter`` run."""
    if DEVICE == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_peaks():
    import torch
    if DEVICE != "cuda":
        return {"int8_tops": None, "fp16_tflops": None, "n": 0, "note": "no CUDA device: no peaks"}
    n = 8192
    a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda").T.contiguous().T
    t8 = bench(lambda: torch._int_mm(a8, b8))
    a16 = torch.randn(n, n, dtype=torch.float16, device="cuda")
    b16 = torch.randn(n, n, dtype=torch.float16, device="cuda")
    t16 = bench(lambda: a16 @ b16)
    flops = 2 * n**3
    return {"int8_tops": flops / t8 / 1e9, "fp16_tflops": flops / t16 / 1e9, "n": n}


def quant_torch(x, a_s):
    import torch
    return torch.clamp(torch.round(x.float() * torch.reciprocal(a_s)), -127, 127).to(torch.int8)


def _timed_row(kind, shape, name, fn, flops, peaks):
    t = bench(fn)
    peak = peaks.get("int8_tops")
    return dict(kind=kind, shape=shape, variant=name, ms=t, tops=flops / t / 1e9,
                frac_int8_peak=flops / t / 1e9 / peak if peak else None)


def run_gemm(K, m, n, k, peaks):
    import torch
    dev = DEVICE
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
    w4 = torch.randint(-7, 8, (n, k), dtype=torch.int8, device=dev)
    w4p = pack_int4(w4)
    ws = torch.rand(n, device=dev) * 0.01 + 1e-3
    a_scale = torch.rand(8, device=dev) * 0.05 + 0.01
    gi = torch.tensor([3], device=dev)
    bias = torch.randn(n, device=dev)
    w16 = (w8.float() * ws[:, None]).half()
    w8t = w8.T  # [K, N] column-major view, the layout torch._int_mm wants for its second operand
    rot = Rotating(lambda: (torch.randn(m, k, device=dev).half(),), m * k * 2)
    rows = []
    flops = 2 * m * n * k
    shape = dict(M=m, N=n, K=k)

    def add(name, fn, err=None, error=None):
        if error:
            r = dict(kind="gemm", shape=shape, variant=name, error=error)
        else:
            r = _timed_row("gemm", shape, name, rot(fn), flops, peaks)
        if err is not None:
            r["max_rel_err"] = err
        rows.append(r)

    if dev == "cuda":  # cuBLAS fp16; the CPU has no fast fp16 GEMM worth a row
        add("torch_fp16", lambda x: torch.addmm(bias.half(), x, w16.T))
    a_s = a_scale[3]

    def int_mm_sep(x):
        y = torch._int_mm(quant_torch(x, a_s), w8t)
        return (y.float() * (a_s * ws) + bias).half()
    x0 = rot.sets[0][0]
    cuda_quant = getattr(getattr(torch.ops, "tgpq", None), "quantize_act", None) if dev == "cuda" else None
    if cuda_quant is not None and m > 16:  # the csrc/cuda fused quantize op, when the extension is built
        def int_mm_cudaquant(x):
            y = torch._int_mm(cuda_quant(x, a_scale, gi), w8t)
            return (y.float() * (a_s * ws) + bias).half()
        try:
            add("int_mm_cudaquant", int_mm_cudaquant)
        except (RuntimeError, NotImplementedError) as e:
            add("int_mm_cudaquant", None, error=str(e).splitlines()[0][:200])
    try:
        ref = int_mm_sep(x0).float()
        add("int_mm_sep", int_mm_sep)
    except RuntimeError as e:  # torch._int_mm needs M > 16 and multiples of 8
        ref = ((quant_torch(x0, a_s).double() @ w8.double().T) * (a_s * ws).double() + bias.double()).float()
        add("int_mm_sep", None, error=str(e).splitlines()[0][:200])
    y = K.qlinear(x0, w8, ws, a_scale, gi, bias, bits=8, k=k).float()
    err8 = float(((y - ref).abs() / (ref.abs() + 1e-3)).max())
    add("ours_w8a8", lambda x: K.qlinear(x, w8, ws, a_scale, gi, bias, bits=8, k=k), err8)
    if dev == "cuda" and torch.cuda.get_device_capability()[0] == 9 and k % 64 == 0:  # both W8A8 paths
        for path in ("tl_dot", "gluon"):
            try:
                yp = K.qlinear(x0, w8, ws, a_scale, gi, bias, bits=8, k=k, path=path).float()
            except Exception as e:  # noqa: BLE001 - e.g. a triton whose Gluon API differs
                add(f"ours_w8a8_{path}", None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:150]}")
                continue
            errp = float(((yp - ref).abs() / (ref.abs() + 1e-3)).max())
            add(f"ours_w8a8_{path}", lambda x, p=path: K.qlinear(x, w8, ws, a_scale, gi, bias, bits=8, k=k, path=p),
                errp)
    ref4 = ((quant_torch(x0, a_s).double() @ w4.double().T) * (a_s * ws).double() + bias.double()).float()
    y4 = K.qlinear(x0, w4p, ws, a_scale, gi, bias, bits=4, k=k).float()
    err4 = float(((y4 - ref4).abs() / (ref4.abs() + 1e-3)).max())
    add("ours_w4a8", lambda x: K.qlinear(x, w4p, ws, a_scale, gi, bias, bits=4, k=k), err4)
    return rows


def run_conv(K, b, cin, cout, ks, st, pad, h, w, peaks):
    import torch
    import torch.nn.functional as F
    dev = DEVICE
    kdim = ks * ks * cin
    w8 = torch.randint(-127, 128, (cout, cin, ks, ks), dtype=torch.int8, device=dev)
    w4 = torch.randint(-7, 8, (cout, cin, ks, ks), dtype=torch.int8, device=dev)
    g8 = w8.permute(0, 2, 3, 1).reshape(cout, kdim).contiguous()
    g4p = pack_int4(w4.permute(0, 2, 3, 1).reshape(cout, kdim).contiguous())
    ws = torch.rand(cout, device=dev) * 0.01 + 1e-3
    a_scale = torch.rand(8, device=dev) * 0.05 + 0.01
    gi = torch.tensor([2], device=dev)
    a_s = a_scale[2]
    bias = torch.randn(cout, device=dev)
    w16 = (w8.float() * ws[:, None, None, None]).half().contiguous(memory_format=torch.channels_last)
    b16 = bias.half()
    make = lambda: (torch.randn(b, cin, h, w, device=dev).half().contiguous(memory_format=torch.channels_last),)  # noqa: E731
    rot = Rotating(make, b * cin * h * w * 2)
    flops = conv_flops(b, cin, cout, ks, st, pad, h, w)
    geo = dict(in_channels=cin, kernel_size=ks, stride=st, padding=pad)
    shape = dict(B=b, Cin=cin, Cout=cout, k=ks, stride=st, pad=pad, H=h, W=w)
    rows = []

    def add(name, fn, err=None):
        r = _timed_row("conv", shape, name, rot(fn), flops, peaks)
        if err is not None:
            r["max_rel_err"] = err
        rows.append(r)

    if dev == "cuda":
        add("torch_fp16", lambda x: F.conv2d(x, w16, b16, stride=st, padding=pad))
    x0 = rot.sets[0][0]
    xq = quant_torch(x0, a_s).double()
    for name, wq, wp, bits in (("ours_w8a8", w8, g8, 8), ("ours_w4a8", w4, g4p, 4)):
        ref = F.conv2d(xq * a_s.double(), wq.double() * ws.double()[:, None, None, None], bias.double(),
                       stride=st, padding=pad).float()
        y = K.qconv2d(x0, wp, ws, a_scale, gi, bias, bits=bits, **geo).float()
        err = float(((y - ref).abs() / (ref.abs() + 1e-3)).max())
        add(name, lambda x, wp=wp, bits=bits: K.qconv2d(x, wp, ws, a_scale, gi, bias, bits=bits, **geo), err)
    return rows


def to_markdown(rows, meta) -> str:
    peaks = meta["peaks"]
    peak_txt = (f"Measured peaks: int8 {peaks['int8_tops']:.0f} TOPS (torch._int_mm 8192^3), fp16 "
                f"{peaks['fp16_tflops']:.0f} TFLOPS (torch.matmul 8192^3). Times: median of do_bench over "
                "rotating inputs." if peaks.get("int8_tops") else
                "No CUDA device: kernels ran in Triton's interpreter; times are not speeds.")
    out = [f"# Kernel benchmark: {meta['device']} ({meta['date']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}. {peak_txt}", "",
           "| kind | shape | variant | ms | TOPS | of int8 peak | speedup vs fp16 | max rel err |",
           "|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if r["variant"] == "torch_fp16":
            base[(r["kind"], json.dumps(r["shape"]))] = r.get("ms")
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        if "error" in r:
            out.append(f"| {r['kind']} | {shape} | {r['variant']} | n/a ({r['error'][:60]}) | | | | |")
            continue
        b = base.get((r["kind"], json.dumps(r["shape"])))
        sp = f"{b / r['ms']:.2f}x" if b else ""
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
        frac = f"{100 * r['frac_int8_peak']:.1f}%" if r.get("frac_int8_peak") else ""
        out.append(f"| {r['kind']} | {shape} | {r['variant']} | {r['ms']:.4f} | {r['tops']:.1f} | "
                   f"{frac} | {sp} | {err} |")
    if meta.get("skipped"):
        out += ["", f"Not started (deadline): {len(meta['skipped'])} shapes: "
                + ", ".join(str(s) for s in meta["skipped"])]
    return "\n".join(out) + "\n"


def write_results(rows, meta, json_path, md_path):
    """Write both files (the JSON first, through a temporary name, so a reader never sees half of it)."""
    for path, text in ((json_path, json.dumps(dict(meta=meta, rows=rows), indent=1)), (md_path, to_markdown(rows, meta))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# --precompile: compile every specialization the GPU suite will launch, spread over processes
# --------------------------------------------------------------------------------------------------

def precompile_items():
    """``(kind, kwargs)`` for ``kernels.precompile_qlinear`` / ``precompile_qconv2d`` (shapes only): the suite's
    kernel-benchmark shapes, the DDPM UNet's layers at the sampling and backend-test batches, the GPU tests'
    shapes; W8A8 and W4A8, fp16 (bf16 where the tests use it), with a float32 bias and an int64 group index as
    converted layers pass them."""
    gemms, convs = [], []  # (M, N, K, dtype, path) / (B, Cin, H, W, Cout, k, stride, pad)
    for m, n, k in (*SUITE_GEMMS, *gemm_shapes()):
        gemms.append((m, n, k, "float16"))
    for m, n, k in TEST_GEMMS:
        gemms += [(m, n, k, "float16"), (m, n, k, "bfloat16")]
    for b in (SUITE_BATCH, *SAMPLING_BATCHES, BACKEND_TEST_BATCH):
        for layer in UNET_QLAYERS:
            if layer[0] == "conv":
                _, cin, cout, ks, st, pad, h, w = layer
                convs.append((b, cin, h, w, cout, ks, st, pad))
            else:
                _, kin, nout, rows = layer
                gemms.append((b * rows, nout, kin, "float16"))
    convs += list(TEST_CONVS)
    items = []
    for m, n, k, dtype in dict.fromkeys(gemms):
        for bits in (8, 4):
            items.append(("linear", dict(M=m, N=n, K=k, dtype=dtype, bits=bits, path="tl_dot")))
        if k % 64 == 0:
            items.append(("linear", dict(M=m, N=n, K=k, dtype=dtype, bits=8, path="gluon")))
    for c in dict.fromkeys(convs):
        b, cin, h, w, cout, ks, st, pad = c
        for bits in (8, 4):
            items.append(("conv", dict(B=b, Cin=cin, H=h, W=w, Cout=cout, k=ks, stride=st, pad=pad, dtype="float16",
                                       bits=bits)))
    return items


def precompile_item(K, kind, spec, capability):
    """Compile one item for ``capability`` on meta tensors (Triton's JIT in-memory cache skips repeats)."""
    import torch
    dt = getattr(torch, spec["dtype"])
    meta = dict(device="meta")
    a_scale = torch.empty(10, dtype=torch.float32, **meta)
    gi = torch.empty(1, dtype=torch.int64, **meta)  # the router's group index
    bits = spec["bits"]
    if kind == "linear":
        n, k = spec["N"], spec["K"]
        x = torch.empty(spec["M"], k, dtype=dt, **meta)
        wp = torch.empty(n, k if bits == 8 else (k + 1) // 2, dtype=torch.int8, **meta)
        K.precompile_qlinear(x, wp, torch.empty(n, dtype=torch.float32, **meta), a_scale, gi,
                             torch.empty(n, dtype=torch.float32, **meta), bits=bits, k=k, path=spec["path"],
                             capability=capability)
    else:
        cin, cout, ks = spec["Cin"], spec["Cout"], spec["k"]
        kdim = ks * ks * cin
        x = torch.empty(spec["B"], cin, spec["H"], spec["W"], dtype=dt, **meta).contiguous(
            memory_format=torch.channels_last)
        wp = torch.empty(cout, kdim if bits == 8 else (kdim + 1) // 2, dtype=torch.int8, **meta)
        K.precompile_qconv2d(x, wp, torch.empty(cout, dtype=torch.float32, **meta), a_scale, gi,
                             torch.empty(cout, dtype=torch.float32, **meta), bits=bits, in_channels=cin,
                             kernel_size=ks, stride=spec["stride"], padding=spec["pad"], capability=capability)


class StandInDriver:
    """Triton's active driver for compiling on a machine without a GPU: it names the target and device 0,
    and nothing else (no launch ever happens through it)."""

    def __init__(self, capability):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def precompile(rank, world, count_only=False, fake_target=None, max_compiles=0):
    """Walk ``precompile_items()``; compile the specializations whose key hashes to ``rank``. Returns stats."""
    import triton
    from triton import knobs

    if fake_target:
        from triton.runtime import driver
        cc = {"sm_90": (9, 0), "sm_80": (8, 0)}[fake_target]
        driver.set_active(StandInDriver(cc))
    else:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--precompile needs a CUDA device (or --fake-target sm_90 to compile for one here)")
        cc = torch.cuda.get_device_capability()
    K = _kernels()
    seen, mine, times = set(), [], []
    state = {"t": None}

    def hook(*, key, repr, fn, **_):  # noqa: A002 - Triton's keyword names
        ident = f"{fn.name}:{key}"
        if ident in seen:
            return True  # another item already owns this specialization: skip
        seen.add(ident)
        h = int(hashlib.sha1(ident.encode()).hexdigest(), 16)
        if count_only or h % world != rank or (max_compiles and len(mine) >= max_compiles):
            return True
        mine.append(repr[:160])
        return None  # compile it

    knobs.runtime.jit_cache_hook = hook
    t0 = time.perf_counter()
    items = precompile_items()
    errors = []
    for kind, spec in items:
        n_before = len(mine)
        state["t"] = time.perf_counter()
        try:
            precompile_item(K, kind, spec, cc)
        except Exception as e:  # noqa: BLE001 - one failing specialization must not stop the others
            errors.append(f"{kind} {spec}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        if len(mine) > n_before:
            times.append(time.perf_counter() - state["t"])
    knobs.runtime.jit_cache_hook = None
    return dict(rank=rank, world=world, items=len(items), distinct_compiles=len(seen), compiled=len(mine),
                seconds=round(time.perf_counter() - t0, 1), compile_seconds=round(sum(times), 1),
                target=f"sm_{cc[0]}{cc[1]}", triton=triton.__version__, fake_target=bool(fake_target),
                errors=errors[:10], n_errors=len(errors))


def main(argv=None) -> int:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--json", help="write the results here (default: --out/kernels-<device>-<date>.json)")
    ap.add_argument("--md", help="markdown table here (default: beside the JSON)")
    ap.add_argument("--dry-run", action="store_true", help="list the shapes and exit")
    ap.add_argument("--only", choices=("gemm", "conv"), help="run one family only")
    ap.add_argument("--max-shapes", type=int, default=0, help="cap per family (0 = all), for quick runs")
    ap.add_argument("--suite", action="store_true", help="the GPU suite's shapes, in priority order")
    ap.add_argument("--tiny", action="store_true", help="one small GEMM and conv (the interpreter without CUDA)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="start no new shape after this many seconds (0 = none); written as meta.skipped")
    ap.add_argument("--precompile", action="store_true", help="compile ahead, launch nothing (see above)")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--count", action="store_true", help="--precompile: count the distinct compiles only")
    ap.add_argument("--fake-target", choices=("sm_90", "sm_80"), help="--precompile without a GPU")
    ap.add_argument("--max-compiles", type=int, default=0, help="--precompile: at most this many (0 = all)")
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if a.precompile:
        stats = precompile(a.rank, a.world, a.count, a.fake_target, a.max_compiles)
        print("PRECOMPILE " + json.dumps(stats), flush=True)
        return 1 if stats["n_errors"] else 0
    if a.tiny:
        gs, cs = list(TINY_GEMMS), list(TINY_CONVS)
    elif a.suite:
        gs, cs = list(SUITE_GEMMS), suite_conv_shapes()
    else:
        gs, cs = gemm_shapes(), conv_shapes()
    if a.max_shapes:
        gs, cs = gs[:a.max_shapes], cs[:a.max_shapes]
    if a.only == "gemm":
        cs = []
    if a.only == "conv":
        gs = []
    if a.dry_run:
        print(f"{len(gs)} GEMM shapes (M, N, K):")
        for s in gs:
            print("  gemm", s)
        print(f"{len(cs)} conv shapes (B, Cin, Cout, k, stride, pad, H, W):")
        for s in cs:
            print("  conv", s)
        return 0
    import torch
    if not torch.cuda.is_available():
        if not a.tiny:
            print("bench_kernels.py needs a CUDA GPU (none found); nothing measured. Use --dry-run to list "
                  "shapes, --tiny to run the code path in Triton's interpreter.")
            return 0
        DEVICE = "cpu"
    import triton
    K = _kernels()
    if DEVICE == "cuda":
        try:
            import tgpq._C  # noqa: F401 - registers torch.ops.tgpq.* (the CUDA quantize op when built with CUDA)
        except ImportError:
            pass
        torch.backends.cudnn.benchmark = True
    dev_name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"
    date = datetime.date.today().isoformat()
    peaks = measure_peaks()
    meta = dict(device=dev_name, date=date, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, host=platform.node(), peaks=peaks, mode="tiny" if a.tiny else
                "suite" if a.suite else "grid", skipped=[])
    if peaks.get("int8_tops"):
        print(f"{dev_name}: measured int8 {peaks['int8_tops']:.0f} TOPS, fp16 {peaks['fp16_tflops']:.0f} TFLOPS",
              flush=True)
    stem = os.path.join(a.out, f"kernels-{dev_name.split(' (')[0].replace(' ', '_')}-{date}")
    json_path = a.json or stem + ".json"
    md_path = a.md or os.path.splitext(json_path)[0] + ".md"
    rows = []
    work = [("gemm", s) for s in gs] + [("conv", s) for s in cs]
    last = 0.0
    for i, (kind, s) in enumerate(work):
        elapsed = time.monotonic() - t_start
        if a.deadline_s and elapsed + last > a.deadline_s:
            meta["skipped"] = [f"{k} {v}" for k, v in work[i:]]
            print(f"deadline: {len(work) - i} shapes not started ({elapsed:.0f} s used of {a.deadline_s:.0f})",
                  flush=True)
            break
        t0 = time.monotonic()
        rows += run_gemm(K, *s, peaks) if kind == "gemm" else run_conv(K, *s, peaks)
        last = time.monotonic() - t0
        write_results(rows, meta, json_path, md_path)
        print(f"  {kind} {s}: {last:.1f} s", flush=True)
    write_results(rows, meta, json_path, md_path)
    print(to_markdown(rows, meta))
    print("wrote", json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
