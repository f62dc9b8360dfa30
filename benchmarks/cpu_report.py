"""bench_cpu's report: the JSON, the markdown tables (ceilings, layers, memory passes, end to end, sampling,
profile) and the chart, written from the result dict ``bench_cpu.main`` builds."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(v) -> str:
    return "-" if v is None else (f"**{v:.0f}%**" if v > 100 else f"{v:.0f}%")


def write_report(res: dict, out_dir: Path, stem: str = "bench_cpu") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    L = [f"# CPU benchmark (tgpq cpu backend): {res['config']}", "", f"System: `{json.dumps(res['system'])}`", ""]
    c = res.get("ceilings")
    if c:
        L += [f"Ceilings on {c['threads']} threads, serving ISA **{c['isa']}** (GMAC/s, best of repeated runs before, "
              f"beside and after the layers; on VNNI W8 and W4 share vpdpbusd's): fp32 FMA instruction "
              f"{c['fp32_fma']:.0f}; the int8 kernels' multiply-accumulate instructions W8 {c['int8_w8']:.0f} "
              f"({c['int8_w8'] / c['fp32_fma']:.2f}x fp32), W4 {c['int8_w4']:.0f} ({c['int8_w4'] / c['fp32_fma']:.2f}x fp32). For reference: the microkernels on L2-resident operands "
              f"W8 {c['kernel_w8']:.0f}, W4 {c['kernel_w4']:.0f}; torch fp32 mm 1024^3 {c['torch_mm']:.0f}. fp32 convs "
              f"may exceed the FMA ceiling only by skipping MACs (Winograd)."
              + (f" AMX tile dot product (tdpbusd) {c['int8_amx']:.0f} ({c['int8_amx'] / c['fp32_fma']:.1f}x fp32): the "
                 f"ceiling of every row oneDNN served (its int8 kernels run on AMX here)." if c.get("int8_amx") else ""),
              ""]
    if res.get("layers"):
        L += ["## Per layer (median ms; speedup over fp32 eager; GMAC/s; % of the ceiling each column is held to)", "",
              "| batch | layer (kind,cin,cout,k,s,p,H,W) | n | fp32 ms | fp32 % FMA | tgpq W8A8 | W8 GEMM only | "
              "tgpq W4A8 | oneDNN int8 | oneDNN rel err | W8 GMAC/s | W8 % ceil | W4 % ceil | served by (W8, W4) |",
              "|" + "---|" * 15]
        over = []
        for r in res["layers"]:
            s_, g, p = r["speedup_vs_fp32"], r["gmacs"], r.get("pct_of_ceiling", {})
            oe = r["onednn_rel_err"]
            w8 = p.get("tgpq_w8a8_gemm", p.get("tgpq_w8a8"))
            w4 = p.get("tgpq_w4a8_gemm", p.get("tgpq_w4a8"))
            over += [f"{tuple(r['shape'])} b={r['batch']} {k}" for k, v in p.items() if v > 100]
            sv = r.get("served_by", {})
            L.append(f"| {r['batch']} | {tuple(r['shape'])} | {r['count']} | {r['ms']['fp32']:.2f} | {_pct(p.get('fp32'))} | "
                     f"{s_['tgpq_w8a8']:.2f}x | {s_.get('tgpq_w8a8_gemm', float('nan')):.2f}x | {s_['tgpq_w4a8']:.2f}x | "
                     f"{s_.get('onednn_int8', float('nan')):.2f}x | {'n/a' if oe is None else f'{oe:.1e}'} | "
                     f"{g['tgpq_w8a8']:.0f} | {_pct(w8)} | {_pct(w4)} | {sv.get('w8a8', '-')}, {sv.get('w4a8', '-')} |")
        L += ["", f"Rows above their ceiling: {', '.join(over) if over else 'none'}.", ""]
    if res.get("memory_passes"):
        L += ["## Memory-bound passes (GB/s: 4 B read + 1 B written per element, medians; copy: 4 + 4, the best of "
              "many calls)", "",
              "| input [B,C,H,W] | groups | GN+SiLU+quantize ms | GB/s | % of copy | quantize ms | GB/s | % of copy | "
              "copy GB/s |", "|" + "---|" * 9]
        for r in res["memory_passes"]:
            m, g, pc = r["ms"], r["gb_s"], r["pct_of_copy"]
            L.append(f"| {r['shape']} | {r['groups']} | {m['gn_silu_quantize']:.3f} | {g['gn_silu_quantize']:.1f} | "
                     f"{pc['gn_silu_quantize']:.0f}% | {m['quantize']:.3f} | {g['quantize']:.1f} | {pc['quantize']:.0f}% | "
                     f"{g['copy']:.1f} |")
        L.append("")
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
        pr = res["profile"]
        L += ["## Where tgpq W8A8 spends its time (torch.profiler, one forward)", "",
              f"`aten::copy_` (layout conversions): {pr['copy_calls']} calls, {pr['copy_pct']:.1f} % of the forward.", "",
              "```", pr["table"], "```", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(L))
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
        fig.savefig(out_dir / f"{stem}.png", dpi=110)
    except ImportError as e:
        print(f"no chart: {e}", file=sys.stderr)
