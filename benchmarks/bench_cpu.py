"""CPU benchmark of the tgpq ``cpu`` backend against fp32 / bf16 eager, oneDNN int8, PT2E int8 and OpenVINO.

One command:  ``python benchmarks/bench_cpu.py``   (``--quick``: a seconds-long smoke run for CI)

* Layer level: every distinct Conv2d / Linear shape of the DDPM CIFAR-10 UNet (published layout, random
  weights) at batch 16 and 64: fp32 eager (NCHW, what the float model runs), tgpq W8A8 and W4A8 (float
  input -> one quantize pass -> implicit GEMM; and the GEMM alone on a u8 input), oneDNN int8
  (``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise`` on plain uint8, zero point 128) with
  its max error against the exact integer result. GMAC/s and the ratio to the measured int8 peak of
  the microkernel that serves (a cache-resident GEMM).
* End to end: one forward at batch 1, 16, 64 and a DDIM sampling loop at batch 16 for fp32 eager,
  bf16 channels_last, tgpq W8A8 / W4A8 (eager, ``fuse_for_cpu``), and the peers when installed
  (``pip install .[bench]``): PT2E int8 (X86InductorQuantizer + torch.compile) and OpenVINO fp32 / int8
  (NNCF). Round robin in one process, medians; skipped peers are listed with the reason.
* Output: ``benchmarks/results/bench_cpu.json``, ``bench_cpu.md`` and ``bench_cpu.png``; CPU model,
  flags, threads and load average recorded.

tgpq is calibrated here with a local round-to-nearest recipe (MSE weight scales, activation scales
from a min/max pass at a few timesteps): speed does not depend on the calibration method.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]  # tgpq itself is the installed package (README: install)

DDPM_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256), attention_head_dim=None, norm_eps=1e-6,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
QUICK_CONFIG = dict(DDPM_CONFIG, sample_size=16, layers_per_block=1, block_out_channels=(32, 64, 64, 64))


# ---------------------------------------------------------------------------------------------- system
def system_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache"):
                info[k.strip()] = v.strip()
            if k.strip() == "Flags":
                info["simd_flags"] = sorted(f for f in v.split() if f.startswith(("avx", "amx", "fma", "f16c")))
    except (OSError, subprocess.SubprocessError) as e:
        info["lscpu_error"] = str(e)
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    from tgpq.backends import cpu as cb

    info["tgpq_isa"] = cb.current_isa()
    info["tgpq_isas_supported"] = cb.supported_isas()
    return info


def native_bf16(info: dict) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), from ``system_info``'s flags."""
    return bool({"avx512_bf16", "amx_bf16"} & set(info.get("simd_flags", [])))


# ------------------------------------------------------------------------------------------- timing
def round_robin(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each fn, interleaved (one call of each per round)."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns.values():
                f()
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------- calibration
def rtn_qstate(unet, bits: int, timesteps=(999, 750, 500, 250, 10), batch: int = 4, sample_size: int = 32):
    """Round-to-nearest QuantState (``tgpq.calibration.rtn``): MSE weight scales, per-group activation
    scales from the abs-max of layer inputs on seeded random images."""
    from tgpq.calibration.rtn import rtn_quant_state
    from tgpq.recipe import QuantConfig

    gen = torch.Generator().manual_seed(0)
    return rtn_quant_state(unet, QuantConfig(weight_bits=bits, act_bits=8, method="rtn"),
                           lambda k, t: (torch.randn(batch, 3, sample_size, sample_size, generator=gen), {}), timesteps)


def tgpq_model(unet, bits: int, sample_size: int, fuse: bool = True):
    from tgpq.unet.convert import convert
    from tgpq.unet.cpu_fusion import fuse_for_cpu, unfuse_for_cpu

    q = convert(unet, rtn_qstate(unet, bits, sample_size=sample_size), backend="cpu")  # fuses on CPU
    if fuse:
        fuse_for_cpu(q)
    else:
        unfuse_for_cpu(q)  # the per-layer path: separate GroupNorm, SiLU, quantize, adds
    return q


# ------------------------------------------------------------------------------------------ layers
def layer_shapes(unet, batch: int, sample_size: int) -> list[dict]:
    """Distinct (type, in, out, kernel, stride, padding, input HxW) of every Conv2d / Linear."""
    seen, out, hooks = set(), [], []
    for name, m in unet.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, inp, _o, name=name):
                x = inp[0]
                if isinstance(mod, nn.Conv2d):
                    key = ("conv", mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
                           mod.padding[0], x.shape[2], x.shape[3])
                else:
                    key = ("linear", mod.in_features, mod.out_features, 1, 1, 0, x.numel() // x.shape[-1], 1)
                if key not in seen:
                    seen.add(key)
                    out.append({"key": key, "name": name, "count": 1})
                else:
                    next(d for d in out if d["key"] == key)["count"] += 1
            hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        unet(torch.randn(1, 3, sample_size, sample_size), 10)
    for h in hooks:
        h.remove()
    return out


def _layer_case(key, batch: int, gen):
    from tgpq.layout import conv_output_size
    from tgpq.nn import QConv2d, QLinear
    from tgpq.numerics import mse_weight_scale, quantize_weight
    from tgpq.recipe import LayerQState

    kind, cin, cout, k, s, p, h, w = key
    if kind == "conv":
        fl = nn.Conv2d(cin, cout, k, s, p)
        x = torch.randn(batch, cin, h, w, generator=gen)
        ho, wo = conv_output_size((h, w), (k, k), (s, s), (p, p), (1, 1))
        macs = batch * cout * cin * k * k * ho * wo
    else:
        fl = nn.Linear(cin, cout)
        x = torch.randn(h * batch, cin, generator=gen)  # h = rows per sample (1, or H*W for attention)
        macs = h * batch * cin * cout
    fl.eval()
    layers = {}
    for bits in (8, 4):
        sc = mse_weight_scale(fl.weight, bits)
        lq = LayerQState(quantize_weight(fl.weight, sc, bits), sc, torch.tensor([float(x.abs().max()) / 127]))
        layers[bits] = (QConv2d.from_float(fl, lq, bits) if kind == "conv" else QLinear.from_float(fl, lq, bits))
        layers[bits].backend = "cpu"
    return fl, x, layers, macs


def _onednn_fn(kind, fl, layer, x):
    """oneDNN int8 on plain uint8 (zero point 128) with the layer's int8 weight; returns (fn, max_err)."""
    a_s = float(layer.a_scale[0])
    w_s = layer.w_scale
    wq = layer.weight_packed.unpack()
    xq = torch.clamp(torch.round(x * (1.0 / a_s)), -127, 127)
    zps = torch.zeros(w_s.numel(), dtype=torch.int64)
    if kind == "conv":
        w4 = wq.reshape(layer.out_channels, *layer.kernel_size, layer.in_channels).permute(0, 3, 1, 2).contiguous()
        qx = (xq + 128).to(torch.uint8).contiguous(memory_format=torch.channels_last)
        st, pd, dl = list(layer.stride), list(layer.padding), list(layer.dilation)
        pw = torch.ops.onednn.qconv_prepack(w4, w_s, a_s, 128, st, pd, dl, 1, list(x.shape))

        def fn():
            return torch.ops.onednn.qconv2d_pointwise(qx, a_s, 128, pw, w_s, zps, layer.bias, st, pd, dl, 1, 1.0, 0,
                                                      torch.float32, "none", [], "")
        exact = F.conv2d(xq.double(), w4.double(), None, st, pd, dl)
        exact = exact * (a_s * w_s.double())[None, :, None, None] + layer.bias.double()[None, :, None, None]
    else:
        qx = (xq + 128).to(torch.uint8)
        pw = torch.ops.onednn.qlinear_prepack(wq, list(x.shape))

        def fn():
            return torch.ops.onednn.qlinear_pointwise(qx, a_s, 128, pw, w_s, zps, layer.bias, 1.0, 0, torch.float32,
                                                      "none", [], "")
        exact = (xq.double() @ wq.double().T) * (a_s * w_s.double()) + layer.bias.double()
    err = (fn().double() - exact).abs().max().item() / (exact.abs().max().item() + 1e-12)
    return fn, err


def bench_layers(unet, batches, repeats, sample_size) -> list[dict]:
    from tgpq.backends import cpu as cb
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = layer_shapes(unet, 1, sample_size)
    for batch in batches:
        for d in tqdm(shapes, desc=f"layers b={batch}", file=sys.stderr):
            kind = d["key"][0]
            fl, x, layers, macs = _layer_case(d["key"], batch, gen)
            fns = {"fp32": lambda: fl(x)}
            for bits, layer in layers.items():
                fns[f"tgpq_w{bits}a8"] = (lambda layer=layer: layer(x))
                if kind == "conv":
                    xq = cb.quantize_nhwc(layer, x)
                    fns[f"tgpq_w{bits}a8_gemm"] = (lambda layer=layer, xq=xq: cb.conv2d_u8(layer, xq))
            onednn_err = None
            try:
                fns["onednn_int8"], onednn_err = _onednn_fn(kind, fl, layers[8], x)
            except (RuntimeError, AttributeError) as e:
                print(f"oneDNN int8 unavailable for {d['key']}: {e}", file=sys.stderr)
            t = round_robin(fns, repeats)
            row = {"batch": batch, "shape": list(d["key"]), "example": d["name"], "count": d["count"], "macs": macs,
                   "ms": {k: v * 1e3 for k, v in t.items()},
                   "gmacs": {k: macs / v / 1e9 for k, v in t.items()},
                   "speedup_vs_fp32": {k: t["fp32"] / v for k, v in t.items()},
                   "onednn_rel_err": onednn_err}
            rows.append(row)
    return rows


def int8_peak(repeats: int) -> dict:
    """GMAC/s of the serving int8 path on one large GEMM (a 1x1 conv over u8, M=4096, K=N=256: weights
    cache-resident, no im2col) and of fp32 ``mm`` (2048^3, MKL) on this CPU: the practical ceilings."""
    from tgpq.backends import cpu as cb
    from tgpq.nn import QLinear

    layer = QLinear(256, 256, 8, 1)
    layer.w_packed.copy_(torch.randint(-127, 128, (256, 256), dtype=torch.int8))
    layer.a_scale.fill_(0.05)
    layer.backend = "cpu"
    xq = (torch.randint(-127, 128, (1, 64, 64, 256)) + 128).to(torch.uint8)  # 4096 x 256
    conv = nn.Conv2d(256, 256, 1)
    qconv = __import__("tgpq.nn", fromlist=["QConv2d"]).QConv2d(256, 256, 1, bits=8)
    qconv.w_packed.copy_(layer.w_packed)
    a = torch.randn(2048, 2048)
    fns = {"int8": lambda: cb.conv2d_u8(qconv, xq), "fp32_mm": lambda: a @ a}
    t = round_robin(fns, repeats)
    return {"isa": cb.current_isa(), "int8_gmacs": 4096 * 256 * 256 / t["int8"] / 1e9,
            "fp32_gmacs": 2048 ** 3 / t["fp32_mm"] / 1e9, "ratio": (4096 * 256 * 256 / t["int8"]) / (2048 ** 3 / t["fp32_mm"])}


# ------------------------------------------------------------------------------------------ peers
def pt2e_model(unet, example):
    """PT2E int8: X86InductorQuantizer (torch.mul excluded for the integer timestep) + torch.compile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    q = X86InductorQuantizer()
    q.set_global(get_default_x86_inductor_quantization_config())
    q.set_function_type_qconfig(torch.mul, None)
    m = torch.export.export(unet, example).module()
    m = prepare_pt2e(m, q)
    with torch.inference_mode():
        for t in (999, 500, 10):
            m(example[0], torch.full_like(example[1], t))
    m = convert_pt2e(m)
    return torch.compile(m)


def openvino_models(unet, example, int8: bool):
    import openvino as ov

    core = ov.Core()
    ovm = ov.convert_model(unet, example_input=example)
    if int8:
        import nncf

        calib = [(torch.randn_like(example[0]), torch.full_like(example[1], t)) for t in (999, 700, 400, 100, 10)]
        ovm = nncf.quantize(ovm, nncf.Dataset(calib, lambda d: (d[0].numpy(), d[1].numpy())),
                            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    compiled = core.compile_model(ovm, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return compiled


# ------------------------------------------------------------------------------------------ end to end
def build_contenders(unet, sample_size: int, batch: int, peers: bool, skipped: dict) -> dict:
    """name -> fn(x, t) returning the noise prediction (float tensor)."""
    import copy

    out = {"fp32_eager": lambda x, t: unet(x, t).sample}
    bf = copy.deepcopy(unet).to(torch.bfloat16).to(memory_format=torch.channels_last)
    out["bf16_channels_last"] = lambda x, t: bf(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
                                                t).sample
    for bits in (8, 4):
        q = tgpq_model(unet, bits, sample_size)
        out[f"tgpq_w{bits}a8"] = (lambda x, t, q=q: q(x.contiguous(memory_format=torch.channels_last), t).sample)
    qn = tgpq_model(unet, 8, sample_size, fuse=False)
    out["tgpq_w8a8_unfused"] = lambda x, t: qn(x, t).sample
    if not peers:
        return out
    example = (torch.randn(batch, 3, sample_size, sample_size), torch.tensor([500] * batch))
    # PT2E exports a graph for one batch size: one model per batch, built (calibrated and compiled)
    # at its first call, which the timing loop's warm-up call makes.
    pt2e_models = {}

    def pt2e_fn(x, t):
        b = x.shape[0]
        if b not in pt2e_models:
            ex = (torch.randn(b, 3, sample_size, sample_size), torch.tensor([500] * b))
            pt2e_models[b] = pt2e_model(copy.deepcopy(unet), ex)
        return pt2e_models[b](x, t.expand(b) if t.dim() else t.repeat(b))[0]

    try:
        with torch.inference_mode():
            pt2e_fn(*example)
        out["pt2e_int8_compile"] = pt2e_fn
    except Exception as e:  # noqa: BLE001  (a peer failing must not stop the benchmark)
        skipped["pt2e_int8_compile"] = f"{type(e).__name__}: {str(e)[:200]}"
    for int8 in (False, True):
        name = "openvino_int8" if int8 else "openvino_fp32"
        try:
            cm = openvino_models(unet, example, int8)

            def ovfn(x, t, cm=cm):
                tt = t.expand(x.shape[0]) if t.dim() else t.repeat(x.shape[0])
                return torch.from_numpy(cm((x.numpy(), tt.numpy()))[0])
            out[name] = ovfn
        except Exception as e:  # noqa: BLE001
            skipped[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def bench_end_to_end(unet, contenders: dict, batches, repeats, sample_size) -> list[dict]:
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, sample_size, sample_size, generator=torch.Generator().manual_seed(batch))
        t = torch.tensor([500] * batch)
        fns = {}
        for k, f in contenders.items():
            if k.startswith("pt2e"):  # one graph per batch size, exported at its first call
                try:
                    with torch.inference_mode():
                        f(x, t)
                except Exception as e:  # noqa: BLE001
                    print(f"{k} at batch {batch}: {type(e).__name__}", file=sys.stderr)
                    continue
            fns[k] = (lambda f=f: f(x, t))
        tm = round_robin(fns, repeats)
        with torch.inference_mode():
            ref = contenders["fp32_eager"](x, t).double()
            errs = {k: ((contenders[k](x, t).double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
                    for k in fns}
        rows.append({"batch": batch, "ms": {k: v * 1e3 for k, v in tm.items()},
                     "speedup_vs_fp32": {k: tm["fp32_eager"] / v for k, v in tm.items()},
                     "rel_rmse_vs_fp32": errs})
    return rows


def bench_sampling(contenders: dict, steps: int, batch: int, sample_size: int, names) -> dict:
    from diffusers import DDIMScheduler

    res = {}
    for k in names:
        if k not in contenders:
            continue
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps)
        x = torch.randn(batch, 3, sample_size, sample_size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.inference_mode():
                contenders[k](x, torch.tensor([int(sched.timesteps[0])] * batch))  # warm-up (PT2E: build)
                t0 = time.perf_counter()
                for t in sched.timesteps:
                    eps = contenders[k](x, torch.tensor([int(t)] * batch))
                    x = sched.step(eps.float(), t, x).prev_sample
        except Exception as e:  # noqa: BLE001  (a peer failing must not stop the benchmark)
            print(f"sampling with {k}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        res[k] = time.perf_counter() - t0
    return {"steps": steps, "batch": batch, "seconds": res,
            "speedup_vs_fp32": {k: res["fp32_eager"] / v for k, v in res.items()} if "fp32_eager" in res else {}}


def profile_tgpq(contenders: dict, batch: int, sample_size: int, rows: int = 18) -> str:
    x = torch.randn(batch, 3, sample_size, sample_size)
    t = torch.tensor([500] * batch)
    f = contenders["tgpq_w8a8"]
    with torch.inference_mode():
        f(x, t)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            f(x, t)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ------------------------------------------------------------------------------------------ report
def write_report(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_cpu.json").write_text(json.dumps(res, indent=1))
    L = ["# CPU benchmark (tgpq cpu backend)", "", f"System: `{json.dumps(res['system'])}`", ""]
    pk = res.get("peak")
    if pk:
        L += [f"Serving microkernel path: **{pk['isa']}**; int8 GEMM 4096x256x256 (1x1 conv over u8) "
              f"{pk['int8_gmacs']:.0f} GMAC/s, fp32 mm 2048^3 {pk['fp32_gmacs']:.0f} GMAC/s (ratio {pk['ratio']:.2f}).", ""]
    L += ["## Per layer (median ms; speedup over fp32 eager; GMAC/s; % of the measured int8 peak)", "",
          "| batch | layer (kind,cin,cout,k,s,p,H,W) | n | fp32 ms | tgpq W8A8 | W8 GEMM only | tgpq W4A8 | oneDNN int8 | "
          "oneDNN rel err | W8 GMAC/s | % peak |", "|" + "---|" * 12]
    for r in res["layers"]:
        s, g = r["speedup_vs_fp32"], r["gmacs"]
        pct = 100 * g.get("tgpq_w8a8_gemm", g["tgpq_w8a8"]) / pk["int8_gmacs"] if pk else float("nan")
        oe = r["onednn_rel_err"]
        L.append(f"| {r['batch']} | {tuple(r['shape'])} | {r['count']} | {r['ms']['fp32']:.2f} | {s['tgpq_w8a8']:.2f}x | "
                 f"{s.get('tgpq_w8a8_gemm', float('nan')):.2f}x | {s['tgpq_w4a8']:.2f}x | "
                 f"{s.get('onednn_int8', float('nan')):.2f}x | {'n/a' if oe is None else f'{oe:.1e}'} | "
                 f"{g['tgpq_w8a8']:.0f} | {pct:.0f}% |")
    L += ["", "## End to end (one UNet forward, median ms and speedup over fp32 eager)", ""]
    for r in res["end_to_end"]:
        L += [f"### batch {r['batch']}", "", "| model | ms | speedup | rel. RMSE vs fp32 |", "|---|---|---|---|"]
        for k, v in r["ms"].items():
            L.append(f"| {k} | {v:.1f} | {r['speedup_vs_fp32'][k]:.2f}x | {r['rel_rmse_vs_fp32'][k]:.3g} |")
        L.append("")
    if res.get("sampling"):
        sm = res["sampling"]
        L += [f"## DDIM sampling, {sm['steps']} steps, batch {sm['batch']}", "", "| model | s | speedup |", "|---|---|---|"]
        for k, v in sm["seconds"].items():
            L.append(f"| {k} | {v:.2f} | {sm['speedup_vs_fp32'].get(k, float('nan')):.2f}x |")
        L.append("")
    if res.get("skipped"):
        L += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in res["skipped"].items()] + [""]
    if res.get("profile"):
        L += ["## Where tgpq W8A8 spends its time (torch.profiler, one forward)", "", "```", res["profile"], "```", ""]
    (out_dir / "bench_cpu.md").write_text("\n".join(L))
    if not res["end_to_end"]:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = res["end_to_end"]
        fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 4), squeeze=False)
        for ax, r in zip(axes[0], rows):
            names = list(r["speedup_vs_fp32"])
            ax.barh(names, [r["speedup_vs_fp32"][k] for k in names],
                    color=["C1" if k.startswith("tgpq") else "C0" for k in names])
            ax.axvline(1.0, color="k", lw=0.5)
            ax.set_title(f"UNet forward, batch {r['batch']}")
            ax.set_xlabel("speedup over fp32 eager")
        fig.tight_layout()
        fig.savefig(out_dir / "bench_cpu.png", dpi=110)
    except ImportError as e:
        print(f"no chart: {e}", file=sys.stderr)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (small UNet, 1 repeat, no peers)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-batches", type=int, nargs="*", default=[16, 64])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--sampling-steps", type=int, default=50, help="0 skips the sampling loop")
    p.add_argument("--no-peers", action="store_true", help="skip PT2E and OpenVINO")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from diffusers import UNet2DModel

    import tgpq.backends.library  # noqa: F401

    cfg = QUICK_CONFIG if a.quick else DDPM_CONFIG
    if a.quick:
        a.repeats, a.layer_batches, a.batches, a.sampling_steps, a.no_peers = 1, [2], [2], 2, True
        a.out = a.out / "quick"
    size = cfg["sample_size"]
    torch.manual_seed(0)
    unet = UNet2DModel(**cfg).eval()
    res = {"system": system_info(), "config": "quick" if a.quick else "ddpm_cifar10", "skipped": {}}
    res["peak"] = int8_peak(max(2, a.repeats))
    res["layers"] = [] if a.skip_layers else bench_layers(unet, a.layer_batches, a.repeats, size)
    res["end_to_end"] = []
    write_report(res, a.out)  # partial results survive an interrupted run
    contenders = build_contenders(unet, size, max(a.batches), not a.no_peers, res["skipped"])
    if a.no_peers:
        res["skipped"]["peers"] = "--no-peers / --quick"
    res["end_to_end"] = bench_end_to_end(unet, contenders, a.batches, a.repeats, size)
    write_report(res, a.out)
    if a.sampling_steps:
        names = list(contenders)
        if not native_bf16(res["system"]) and not a.quick:
            names.remove("bf16_channels_last")
            res["skipped"]["bf16_channels_last (sampling)"] = (
                "no native bf16 on this CPU (no avx512_bf16 / amx_bf16 flag): bf16 is emulated and several times "
                "slower than fp32 per forward (see the end-to-end table), so it is left out of the sampling loop")
        res["sampling"] = bench_sampling(contenders, a.sampling_steps, 16 if not a.quick else 2, size, names)
    res["profile"] = profile_tgpq(contenders, a.batches[min(1, len(a.batches) - 1)], size)
    try:
        import tgpq

        ref = tgpq.load_reference_model()
        res["reference_model"] = bench_end_to_end(ref, build_contenders(ref, ref.config.sample_size, 16, False, {}),
                                                  [16] if not a.quick else [2], a.repeats, ref.config.sample_size)
    except (FileNotFoundError, ValueError) as e:
        res["skipped"]["reference_model"] = f"not available: {e}"
    try:
        res["system"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    write_report(res, a.out)
    print((a.out / "bench_cpu.md").read_text())
    return res


if __name__ == "__main__":
    main()
