"""CPU benchmark of the tgpq ``cpu`` backend against fp32 / bf16 eager, oneDNN int8, PT2E int8 and OpenVINO.

    python benchmarks/bench_cpu.py                 # the DDPM CIFAR-10 UNet (35.7M, random weights)
    python benchmarks/bench_cpu.py --model sd15    # one SD-1.5 UNet forward (batch 2, 64x64 latents, 77 tokens)
    python benchmarks/bench_cpu.py --quick         # a seconds-long smoke run (CI)

* Ceilings (``cpu_layers.ceilings``), measured here on all threads: the fp32 FMA instruction's throughput,
  the serving microkernels' int8 multiply-accumulate instruction and, on an AMX CPU, AMX's tile dot product
  (the ceiling of the rows oneDNN served); every per-layer rate is printed as a share of the ceiling it is
  held to (a row above 100 % would mean the ceiling is not one: it is flagged).
* Layer level: every distinct Conv2d / Linear shape of the UNet at batch 16 and 64: fp32 eager, tgpq W8A8 and
  W4A8 (float input -> one quantize pass -> implicit GEMM; and the GEMM alone on a u8 input), oneDNN int8
  (``torch.ops.onednn``, plain uint8, zero point 128) with its max error against the exact integer result;
  GMAC/s and which kernel served (tgpq's microkernel for the ISA, or oneDNN where the backend chose it).
* Memory passes: the fused GroupNorm+SiLU+quantize and the quantize pass against a float copy of the same
  tensor (GB/s, % of the copy's bandwidth).
* End to end: one forward at batch 1, 16, 64 and a 50-step DDIM loop at batch 16 for fp32 eager, bf16
  channels_last, tgpq W8A8 / W4A8 (eager, fused), and the peers when installed (``pip install .[bench]``):
  PT2E int8 (X86InductorQuantizer + torch.compile) and OpenVINO fp32 / int8 (NNCF). Round robin in one
  process, medians; skipped peers are listed with the reason. The profile of one tgpq W8A8 forward follows.
* ``--model sd15``: fp32 eager, tgpq W8A8 / W4A8, OpenVINO fp32 and int8 (hybrid, as optimum-intel) on one
  SD-1.5 UNet forward, with weight bytes and peak memory beside the times.
* Output: ``benchmarks/results/<stem>.{json,md,png}`` (``--stem``, one per machine class; default
  ``bench_cpu[_sd15]``); CPU model, flags, threads, load average.

Pause every other process on the machine first: a concurrent job moves the ratios by 20 % or more.
tgpq is calibrated here with a round-to-nearest recipe (``tgpq.calibration.rtn``): speed does not depend
on the calibration method.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # tgpq itself is the installed package (README: install)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark's own modules beside it

from cpu_layers import bench_layers, ceilings, memory_passes, pct_of_ceiling, round_robin  # noqa: E402
from cpu_peers import SD15_TEXT, SD15_UNET_CONFIG, openvino_hybrid, openvino_models, pt2e_model  # noqa: E402
from cpu_report import write_report  # noqa: E402

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
# ------------------------------------------------------------------------------------------ peers
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


def profile_tgpq(contenders: dict, batch: int, sample_size: int, rows: int = 18) -> dict:
    """torch.profiler table of one tgpq W8A8 forward, and its ``aten::copy_`` calls (layout conversions)."""
    x = torch.randn(batch, 3, sample_size, sample_size)
    t = torch.tensor([500] * batch)
    f = contenders["tgpq_w8a8"]
    with torch.inference_mode():
        f(x, t)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            f(x, t)
    avg = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in avg.values())
    copies = avg.get("aten::copy_")
    return {"table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows),
            "copy_calls": copies.count if copies else 0,
            "copy_pct": 100 * copies.self_cpu_time_total / total if copies else 0.0}


# ------------------------------------------------------------------------------------------ report
def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor ``model`` holds once it has served: its state (``tgpq.weight_bytes``) plus the
    cpu backend's caches (repacked microkernel weights, oneDNN's prepacked weights, fused q/k/v)."""
    seen, total = set(), 0
    for m in model.modules():
        for t in (*m._parameters.values(), *m._buffers.values(), *vars(m).values()):
            if not isinstance(t, torch.Tensor):
                continue
            key = ("opaque", id(t)) if t.is_mkldnn else (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def sd15_contenders(unet, batch: int, peers: bool, skipped: dict) -> tuple[dict, dict, tuple]:
    """SD-1.5: fp32 eager, tgpq W8A8 / W4A8 (in place of copies of the float model: one more copy of a
    3.4 GB model each), OpenVINO fp32 and int8 hybrid; their weight bytes; the example inputs."""
    import copy

    import tgpq
    from tgpq.calibration.rtn import rtn_quant_state
    from tgpq.recipe import QuantConfig

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 64, 64, generator=gen)
    text = torch.randn(batch, *SD15_TEXT, generator=gen)
    t = torch.tensor(500)
    out = {"fp32_eager": lambda: unet(x, t, encoder_hidden_states=text).sample}
    nbytes = {"fp32_eager": tgpq.weight_bytes(unet)}
    for bits in (8, 4):
        qs = rtn_quant_state(unet, QuantConfig(weight_bits=bits, method="rtn"),
                             lambda k, tt: (torch.randn(batch, 4, 64, 64, generator=gen),
                                            {"encoder_hidden_states": torch.randn(batch, *SD15_TEXT, generator=gen)}),
                             weight_scale="absmax")
        q = tgpq.convert(copy.deepcopy(unet), qs, backend="cpu", inplace=True)
        out[f"tgpq_w{bits}a8"] = (lambda q=q: q(x.contiguous(memory_format=torch.channels_last), t,
                                                encoder_hidden_states=text).sample)
        nbytes[f"tgpq_w{bits}a8"] = tgpq.weight_bytes(q)
        nbytes[f"tgpq_w{bits}a8 held"] = (lambda q=q: held_bytes(q))  # read once it has served
    if not peers:
        skipped["peers"] = "--no-peers"
        return out, nbytes, (x, t, text)
    example = (x, t.expand(batch), text)
    calibration = [(torch.randn_like(x), torch.full((batch,), tt), torch.randn_like(text)) for tt in (900, 500, 100)]
    # OpenVINO int8 hybrid (the peer that matters for int8 serving) only: converting the fp32 OpenVINO model
    # beside the other contenders peaked above the 24 GiB of the benchmark machine (OOM-killed in either order)
    skipped["openvino_fp32"] = "left out for SD-1.5: its conversion beside the other contenders needs > 24 GiB"
    for name, build in (("openvino_int8_hybrid", lambda: openvino_hybrid(unet, example, calibration)),):
        try:
            cm = build()
            out[name] = (lambda cm=cm: torch.from_numpy(cm((x.numpy(), t.expand(batch).numpy(), text.numpy()))[0]))
        except Exception as e:  # noqa: BLE001 - a peer failing must not stop the benchmark
            skipped[name] = f"{type(e).__name__}: {str(e)[:300]}"
        gc.collect()
    return out, nbytes, (x, t, text)


def run_sd15(a) -> dict:
    """One SD-1.5 UNet forward per contender, round robin; peak memory of each forward beside the times."""
    from diffusers import UNet2DConditionModel

    from tgpq.eval import measure

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    res = {"system": system_info(), "config": "sd15", "skipped": {}, "batch": a.sd15_batch}
    res["ceilings"] = ceilings()
    fns, nbytes, _ = sd15_contenders(unet, a.sd15_batch, not a.no_peers, res["skipped"])
    tm = round_robin(fns, a.repeats)
    ref = None
    rows = {}
    with torch.inference_mode():
        for k, f in fns.items():
            y, _, peak = measure(f)
            ref = y.double() if ref is None else ref
            err = float((y.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
            # OpenVINO allocates through its own allocator, which malloc's counters do not see
            held = nbytes.get(f"{k} held")
            rows[k] = {"ms": tm[k] * 1e3, "speedup_vs_fp32": tm["fp32_eager"] / tm[k], "rel_rmse_vs_fp32": err,
                       "weight_bytes": nbytes.get(k), "held_bytes": held() if held else nbytes.get(k),
                       "peak_bytes_during_forward": None if k.startswith("openvino") else peak}
    res["end_to_end"] = [{"batch": a.sd15_batch, "ms": {k: v["ms"] for k, v in rows.items()},
                          "speedup_vs_fp32": {k: v["speedup_vs_fp32"] for k, v in rows.items()},
                          "rel_rmse_vs_fp32": {k: v["rel_rmse_vs_fp32"] for k, v in rows.items()}}]
    res["sd15"] = rows
    stem = a.stem or "bench_cpu_sd15"
    write_report(res, a.out, stem)
    L = [(a.out / f"{stem}.md").read_text(), "## Weights and memory", "",
         "| model | weight MiB (state) | MiB held serving (state + kernel caches) | peak MiB malloc'd during a forward |",
         "|---|---|---|---|"]
    for k, v in rows.items():
        wb, hb = ("-" if v[c] is None else f"{v[c] / 2**20:.0f}" for c in ("weight_bytes", "held_bytes"))
        pk = v["peak_bytes_during_forward"]
        L.append(f"| {k} | {wb} | {hb} | {'- (own allocator)' if pk is None else f'{pk / 2**20:.0f}'} |")
    (a.out / f"{stem}.md").write_text("\n".join(L) + "\n")
    print((a.out / f"{stem}.md").read_text())
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["ddpm", "sd15"], default="ddpm")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (small UNet, 1 repeat, no peers)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-batches", type=int, nargs="*", default=[16, 64])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--sampling-steps", type=int, default=50, help="0 skips the sampling loop")
    p.add_argument("--sd15-batch", type=int, default=2, help="UNet batch of --model sd15 (2: one image with CFG)")
    p.add_argument("--no-peers", action="store_true", help="skip PT2E and OpenVINO")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--stem", default=None, help="file name stem of the results (default bench_cpu / bench_cpu_sd15; "
                   "one per machine class, e.g. bench_cpu_xeon_avx512vnni)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model == "sd15":
        return run_sd15(a)
    from diffusers import UNet2DModel

    cfg = QUICK_CONFIG if a.quick else DDPM_CONFIG
    if a.quick:
        a.repeats, a.layer_batches, a.batches, a.sampling_steps, a.no_peers = 1, [2], [2], 2, True
        a.out = a.out / "quick"
    size = cfg["sample_size"]
    torch.manual_seed(0)
    unet = UNet2DModel(**cfg).eval()
    res = {"system": system_info(), "config": "quick" if a.quick else "ddpm_cifar10", "skipped": {}}
    res["ceilings"] = ceilings(0.1 if a.quick else 0.3, 1 if a.quick else 5)
    res["layers"] = [] if a.skip_layers else bench_layers(unet, a.layer_batches, a.repeats, size, res["ceilings"])
    if res["layers"]:  # the best of before and after; the shares follow
        res["ceilings"] = ceilings(0.1 if a.quick else 0.3, 1 if a.quick else 5, res["ceilings"])
        for r in res["layers"]:
            r["pct_of_ceiling"] = pct_of_ceiling(r, res["ceilings"])
    res["memory_passes"] = memory_passes(unet, 2 if a.quick else 16, size, max(3, a.repeats))
    res["end_to_end"] = []
    stem = a.stem or "bench_cpu"
    write_report(res, a.out, stem)  # partial results survive an interrupted run
    contenders = build_contenders(unet, size, max(a.batches), not a.no_peers, res["skipped"])
    if a.no_peers:
        res["skipped"]["peers"] = "--no-peers / --quick"
    res["end_to_end"] = bench_end_to_end(unet, contenders, a.batches, a.repeats, size)
    write_report(res, a.out, stem)
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
    write_report(res, a.out, stem)
    print((a.out / f"{stem}.md").read_text())
    return res


if __name__ == "__main__":
    main()
