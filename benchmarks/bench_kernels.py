#!/usr/bin/env python3
"""Kernel microbenchmarks (GPU only): fused W8A8 / W4A8 Triton GEMM and conv vs torch baselines.

    python benchmarks/bench_kernels.py --out benchmarks/results     # on a CUDA machine
    python benchmarks/bench_kernels.py --dry-run                     # list the shapes (any machine)

GEMM shapes: M in {16, 256, 4096, 16384} x N = K in {1024, 4096}. Conv shapes: every distinct
Conv2d of the DDPM CIFAR-10 UNet (block_out_channels (128, 256, 256, 256), 32x32 input; listed in
UNET_CONVS, taken from a forward hook on diffusers' UNet2DModel) at batch 64 and 256.

Per shape and variant: the median of ``triton.testing.do_bench`` over a rotating set of input
buffers (together larger than the L2 cache, so no run reads a cache-warm copy), TOPS =
2*M*N*K / time (the conv's implicit-GEMM M = B*Ho*Wo, K = kh*kw*Cin), and the ratio to the
device's int8 peak *measured* at the start (``torch._int_mm`` on 8192^3; the fp16 peak likewise
with ``torch.matmul``). Variants:

* ``ours_w8a8`` / ``ours_w4a8``: kernels.qlinear / kernels.qconv2d (activation quantization fused).
* ``ours_w8a8_tl_dot`` / ``ours_w8a8_gluon`` (GEMM, sm_90, K % 64 == 0): the two W8A8 paths forced
  (``ours_w8a8`` is whichever ``qlinear`` picks by default: Gluon there). The Gluon kernel keeps
  one int8 wgmma in flight, the tl.dot one cannot (issue 9); this pair settles which is faster.
* ``torch_fp16``: cuBLAS ``x @ w.T + b`` / cuDNN ``F.conv2d`` on channels_last fp16.
* ``int_mm_sep`` (GEMM only): quantize pass + ``torch._int_mm`` + dequantize pass (what an int8
  library without fusion does). torch has no int8 conv on CUDA, so convs have no such row.
  ``int_mm_cudaquant``: the same with the quantize pass done by the csrc/cuda op
  ``torch.ops.tgpq.quantize_act`` (one fused pass), when the extension was built with CUDA.

Every ``ours`` result is also checked on the device against the int32 reference (quantize,
``torch._int_mm`` or an fp64 conv, dequantize): ``max_rel_err`` in the JSON.
Writes ``kernels-<device>-<date>.json`` and ``.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEMM_M = (16, 256, 4096, 16384)
GEMM_NK = (1024, 4096)
BATCHES = (64, 256)
# (Cin, Cout, kernel, stride, padding, H, W): distinct Conv2d layers of the DDPM CIFAR-10 UNet
# (diffusers UNet2DModel, block_out_channels (128, 256, 256, 256), layers_per_block 2,
# DownBlock2D/AttnDownBlock2D/DownBlock2D/DownBlock2D, 32x32x3 input); H, W are input sizes.
UNET_CONVS = (
    (3, 128, 3, 1, 1, 32, 32), (128, 3, 3, 1, 1, 32, 32), (128, 128, 3, 1, 1, 32, 32),
    (128, 128, 3, 2, 1, 32, 32), (128, 256, 1, 1, 0, 16, 16), (128, 256, 3, 1, 1, 16, 16),
    (256, 128, 1, 1, 0, 32, 32), (256, 128, 3, 1, 1, 32, 32), (256, 256, 3, 1, 1, 4, 4),
    (256, 256, 3, 1, 1, 8, 8), (256, 256, 3, 1, 1, 16, 16), (256, 256, 3, 1, 1, 32, 32),
    (256, 256, 3, 2, 1, 8, 8), (256, 256, 3, 2, 1, 16, 16), (384, 128, 1, 1, 0, 32, 32),
    (384, 128, 3, 1, 1, 32, 32), (384, 256, 1, 1, 0, 16, 16), (384, 256, 3, 1, 1, 16, 16),
    (512, 256, 1, 1, 0, 4, 4), (512, 256, 1, 1, 0, 8, 8), (512, 256, 1, 1, 0, 16, 16),
    (512, 256, 3, 1, 1, 4, 4), (512, 256, 3, 1, 1, 8, 8), (512, 256, 3, 1, 1, 16, 16),
)
DEVICE = "cuda"  # the benchmark device (module-level so a CPU smoke run can override it)
ROTATE_BYTES = 256 << 20  # rotating input sets span at least this much (> 50 MB H100 L2)


def gemm_shapes():
    return [(m, nk, nk) for nk in GEMM_NK for m in GEMM_M]


def conv_shapes():
    return [(b, *c) for b in BATCHES for c in UNET_CONVS]


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
    """Calls fn(*inputs[i]) with i cycling over copies, so the timed runs do not hit L2."""

    def __init__(self, make, nbytes):
        self.sets = [make() for _ in range(max(2, min(64, math.ceil(ROTATE_BYTES / max(1, nbytes)))))]
        self.i = 0

    def __call__(self, fn):
        def run():
            self.i = (self.i + 1) % len(self.sets)
            return fn(*self.sets[self.i])
        return run


def bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def measure_peaks():
    import torch
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

    def add(name, fn, err=None, error=None):
        r = dict(kind="gemm", shape=dict(M=m, N=n, K=k), variant=name)
        if error:
            r["error"] = error
        else:
            t = bench(rot(fn))
            r.update(ms=t, tops=flops / t / 1e9, frac_int8_peak=flops / t / 1e9 / peaks["int8_tops"])
        if err is not None:
            r["max_rel_err"] = err
        rows.append(r)

    add("torch_fp16", lambda x: torch.addmm(bias.half(), x, w16.T))
    a_s = a_scale[3]

    def int_mm_sep(x):
        y = torch._int_mm(quant_torch(x, a_s), w8t)
        return (y.float() * (a_s * ws) + bias).half()
    x0 = rot.sets[0][0]
    cuda_quant = getattr(getattr(torch.ops, "tgpq", None), "quantize_act", None)
    if cuda_quant is not None and m > 16:  # the csrc/cuda fused quantize op, when the extension is built
        def int_mm_cudaquant(x):
            y = torch._int_mm(cuda_quant(x, a_scale, gi), w8t)
            return (y.float() * (a_s * ws) + bias).half()
        try:
            add("int_mm_cudaquant", int_mm_cudaquant)
        except RuntimeError as e:
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
    if torch.cuda.get_device_capability()[0] == 9 and k % 64 == 0:  # both W8A8 paths, side by side
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
    ho, wo = K.conv_out_size(h, ks, st, pad, 1), K.conv_out_size(w, ks, st, pad, 1)
    flops = 2 * b * ho * wo * cout * kdim
    geo = dict(in_channels=cin, kernel_size=ks, stride=st, padding=pad)
    rows = []

    def add(name, fn, err=None):
        t = bench(rot(fn))
        r = dict(kind="conv", shape=dict(B=b, Cin=cin, Cout=cout, k=ks, stride=st, pad=pad, H=h, W=w),
                 variant=name, ms=t, tops=flops / t / 1e9, frac_int8_peak=flops / t / 1e9 / peaks["int8_tops"])
        if err is not None:
            r["max_rel_err"] = err
        rows.append(r)

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
    out = [f"# Kernel benchmark: {meta['device']} ({meta['date']})", "",
           f"torch {meta['torch']}, triton {meta['triton']}. Measured peaks: int8 "
           f"{meta['peaks']['int8_tops']:.0f} TOPS (torch._int_mm 8192^3), fp16 {meta['peaks']['fp16_tflops']:.0f} "
           "TFLOPS (torch.matmul 8192^3). Times: median of do_bench over rotating inputs.", "",
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
        out.append(f"| {r['kind']} | {shape} | {r['variant']} | {r['ms']:.4f} | {r['tops']:.1f} | "
                   f"{100 * r['frac_int8_peak']:.1f}% | {sp} | {err} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--dry-run", action="store_true", help="list the shapes and exit")
    ap.add_argument("--only", choices=("gemm", "conv"), help="run one family only")
    ap.add_argument("--max-shapes", type=int, default=0, help="cap per family (0 = all), for quick runs")
    a = ap.parse_args(argv)
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
        print("bench_kernels.py needs a CUDA GPU (none found); nothing measured. Use --dry-run to list shapes.")
        return 0
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from tqdm import tqdm
    K = _kernels()
    try:
        import tgpq._C  # noqa: F401 - registers torch.ops.tgpq.* (the CUDA quantize op when built with CUDA)
    except ImportError:
        pass
    torch.backends.cudnn.benchmark = True
    dev_name = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    peaks = measure_peaks()
    meta = dict(device=dev_name, date=date, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, host=platform.node(), peaks=peaks)
    print(f"{dev_name}: measured int8 {peaks['int8_tops']:.0f} TOPS, fp16 {peaks['fp16_tflops']:.0f} TFLOPS")
    rows = []
    for s in tqdm(gs, desc="gemm"):
        rows += run_gemm(K, *s, peaks)
    for s in tqdm(cs, desc="conv"):
        rows += run_conv(K, *s, peaks)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"kernels-{dev_name.replace(' ', '_')}-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = to_markdown(rows, meta)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print("wrote", stem + ".json", stem + ".md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
