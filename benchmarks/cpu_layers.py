"""Per-layer part of the CPU benchmark: the DDPM UNet's layer shapes, each layer timed against fp32, oneDNN
int8 and tgpq, the ceilings those rates are held to, and the memory-bound passes against copy bandwidth."""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# column of the per-layer table -> the ceiling it is held to (``ceilings``)
CEILING_OF = {"fp32": "fp32_fma", "tgpq_w8a8": "int8_w8", "tgpq_w8a8_gemm": "int8_w8", "tgpq_w4a8": "int8_w4",
              "tgpq_w4a8_gemm": "int8_w4"}


def ceiling_of(column: str, served_by: str, ceil: dict) -> str | None:
    """The ceiling a column of a layer row is held to: the fp32 FMA's for fp32; for tgpq's columns the serving
    microkernels' instruction, or, where oneDNN served (part of) the layer on a CPU with AMX, the AMX tile
    unit's (oneDNN's int8 kernels run on it there, far above vpdpbusd)."""
    c = CEILING_OF.get(column)
    if c and c != "fp32_fma" and "onednn" in served_by and ceil.get("int8_amx"):
        return "int8_amx"
    return c


def pct_of_ceiling(row: dict, ceil: dict) -> dict:
    """``{column: % of its ceiling}`` for a layer row of ``bench_layers``."""
    out = {}
    for k, v in row["gmacs"].items():
        served = row["served_by"].get(k.split("_")[1], "") if k.startswith("tgpq_") else ""
        c = ceiling_of(k, served, ceil)
        if c and ceil.get(c):
            out[k] = 100 * v / ceil[c]
    return out


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


def best_time(fn, calls: int) -> float:
    """Fastest of ``calls`` calls (after one warm-up), in seconds: a ceiling's estimate, which noise only lowers."""
    with torch.inference_mode():
        fn()
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def ceilings(seconds: float = 0.3, tries: int = 5, previous: dict | None = None) -> dict:
    """GMAC/s on all threads (``torch.get_num_threads()``) for the serving ISA, the best of ``tries`` runs
    (and of ``previous``: measure before and after the layers): ceilings, by construction above any layer,
    ``fp32_fma`` (the FMA instruction's throughput: no fp32 conv computing every MAC exceeds it) and
    ``int8_w8`` / ``int8_w4`` (the serving microkernels' multiply-accumulate instructions alone), ``int8_amx``
    (AMX's tile dot product, 0 without AMX: oneDNN's ceiling there); and, for
    reference, the serving microkernels on L2-resident operands (``kernel_w8`` / ``kernel_w4``) and torch's
    fp32 ``mm`` 1024^3 (``torch_mm``)."""
    from tgpq.backends import cpu as cb

    isa, th = cb.ISA_IDS[cb.current_isa()], torch.get_num_threads()
    a = torch.randn(1024, 1024)
    probes = {"fp32_fma": lambda: torch.ops.tgpq.cpu_fp32_peak(isa, seconds, th),
              "int8_w8": lambda: torch.ops.tgpq.cpu_int8_instruction_peak(isa, 8, seconds, th),
              "int8_w4": lambda: torch.ops.tgpq.cpu_int8_instruction_peak(isa, 4, seconds, th),
              "kernel_w8": lambda: torch.ops.tgpq.cpu_ukernel_peak(isa, 8, seconds, th),
              "kernel_w4": lambda: torch.ops.tgpq.cpu_ukernel_peak(isa, 4, seconds, th),
              "int8_amx": lambda: torch.ops.tgpq.cpu_amx_int8_peak(seconds, th),
              "torch_mm": lambda: 1024 ** 3 / round_robin({"mm": lambda: a @ a}, 3)["mm"] / 1e9}
    best = {k: (previous or {}).get(k, 0.0) for k in probes}
    for _ in range(tries):
        for k, f in probes.items():
            best[k] = max(best[k], f())
    if cb.current_isa() == "avx512vnni":  # W8 and W4 serve on the same instruction (vpdpbusd): one ceiling
        best["int8_w8"] = best["int8_w4"] = max(best["int8_w8"], best["int8_w4"])
    return {"isa": cb.current_isa(), "threads": th, **best}


def served(layer) -> str:
    """Which kernel served ``layer`` (the cpu backend's choice for the shapes it has seen)."""
    from tgpq.backends import cpu as cb

    plans = sorted(set(cb.served_by(layer).values())) or ["ukernel"]
    return "+".join(f"ukernel/{cb.current_isa()}" if p == "ukernel" else p for p in plans)


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


def bench_layers(unet, batches, repeats, sample_size, ceil: dict) -> list[dict]:
    """Every distinct layer shape at each batch: fp32 eager, tgpq W8A8 / W4A8 (with and without the quantize
    pass), oneDNN int8 (with its error); GMAC/s, the kernel that served, % of the matching ceiling."""
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
            # tgpq's layers get channels_last input, as inside a converted UNet (its convs emit channels_last)
            xt = x.contiguous(memory_format=torch.channels_last) if kind == "conv" else x
            for bits, layer in layers.items():
                fns[f"tgpq_w{bits}a8"] = (lambda layer=layer: layer(xt))
                if kind == "conv":
                    xq = cb.quantize_nhwc(layer, xt)
                    fns[f"tgpq_w{bits}a8_gemm"] = (lambda layer=layer, xq=xq: cb.conv2d_u8(layer, xq))
            onednn_err = None
            try:
                fns["onednn_int8"], onednn_err = _onednn_fn(kind, fl, layers[8], x)
            except (RuntimeError, AttributeError) as e:
                print(f"oneDNN int8 unavailable for {d['key']}: {e}", file=sys.stderr)
            t = round_robin(fns, repeats)
            # the ceilings again right beside each layer (a VM's clock drifts): the best of all probes holds
            ceil.update({k: v for k, v in ceilings(0.05, 1, ceil).items() if k not in ("isa", "threads")})
            gmacs = {k: macs / v / 1e9 for k, v in t.items()}
            row = {"batch": batch, "shape": list(d["key"]), "example": d["name"], "count": d["count"], "macs": macs,
                   "ms": {k: v * 1e3 for k, v in t.items()}, "gmacs": gmacs,
                   "speedup_vs_fp32": {k: t["fp32"] / v for k, v in t.items()},
                   "onednn_rel_err": onednn_err,
                   "served_by": {f"w{bits}a8": served(layer) for bits, layer in layers.items()}}
            row["pct_of_ceiling"] = pct_of_ceiling(row, ceil)
            rows.append(row)
    return rows


def memory_passes(unet, batch: int, sample_size: int, repeats: int) -> list[dict]:
    """The fused GroupNorm+SiLU+quantize and the plain quantize pass (medians) on every distinct GroupNorm input
    of the UNet, against a float copy of the same tensor (read + write: the memory-speed reference, its best
    time of many calls)."""
    from tgpq.backends import cpu as cb
    from tgpq.nn import QConv2d

    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append((mod.num_groups, tuple(inp[0].shape))))
             for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    with torch.inference_mode():
        unet(torch.randn(batch, 3, sample_size, sample_size), 10)
    for h in hooks:
        h.remove()
    rows = []
    for groups, shape in sorted(set(s for s in shapes if len(s[1]) == 4)):  # the norms before convs
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        norm = nn.GroupNorm(groups, shape[1], eps=1e-6)
        conv = QConv2d(shape[1], 16, 1, bits=8, num_groups=1)
        conv.a_scale.fill_(0.05)
        y = torch.empty_like(x)
        t = round_robin({"gn_silu_quantize": lambda: cb.groupnorm_silu_quantize(norm, x, conv),
                         "quantize": lambda: cb.quantize_nhwc(conv, x)}, repeats)
        t["copy"] = best_time(lambda: y.copy_(x), max(9, 3 * repeats))  # a ceiling: the best of many
        n = x.numel()
        gbs = {"gn_silu_quantize": 5 * n / t["gn_silu_quantize"] / 1e9, "quantize": 5 * n / t["quantize"] / 1e9,
               "copy": 8 * n / t["copy"] / 1e9}
        rows.append({"shape": list(shape), "groups": groups, "ms": {k: v * 1e3 for k, v in t.items()}, "gb_s": gbs,
                     "pct_of_copy": {k: 100 * v / gbs["copy"] for k, v in gbs.items() if k != "copy"}})
    return rows
