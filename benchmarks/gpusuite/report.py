"""The suite's results for people: the issue's targets from what was measured, summary.md, the console's
last lines."""
from __future__ import annotations

import json

TARGETS = {  # issue 18
    "gemm_w8a8_4096": ("W8A8 GEMM 4096^3 vs fp16 (cuBLAS)", 1.6),
    "conv3x3_b256": ("int8 3x3 conv vs cuDNN fp16 channels_last, batch 256 (time-weighted over the UNet's 3x3 convs)", 1.3),
    "e2e_vs_eager": ("end-to-end W8A8 vs fp16 eager, DDPM CIFAR-10, batch 256", 1.3),
    "e2e_vs_compile": ("end-to-end W8A8 vs fp16 + torch.compile, batch 256", 1.15),
}
# (name, share of the budget after FINAL_RESERVE_S, least seconds worth starting with); train takes the rest


def kernel_rows(doc):
    """Per shape: each variant's ms and its speed-up over torch_fp16."""
    out = {}
    for r in doc.get("rows", []):
        key = r["kind"] + " " + ",".join(f"{k}={v}" for k, v in r["shape"].items())
        out.setdefault(key, {})[r["variant"]] = r.get("ms") if "error" not in r else None
        if "max_rel_err" in r:
            out[key][r["variant"] + ":err"] = r["max_rel_err"]
    return out



def evaluate_targets(steps, cpu_mode):
    """The issue's four targets from what was measured (``None`` where it was not)."""
    if cpu_mode:
        return {k: dict(what=w, target=t, value=None, met=None, note="no GPU: not measured") for k, (w, t) in TARGETS.items()}
    res = {}
    table = steps.get("kernels", {}).get("table", {}) or {}
    g = table.get("gemm M=4096,N=4096,K=4096", {})
    best = min((g[v] for v in ("ours_w8a8", "ours_w8a8_tl_dot", "ours_w8a8_gluon") if g.get(v)), default=None)
    val = g["torch_fp16"] / best if best and g.get("torch_fp16") else None
    paths = {v: round(g["torch_fp16"] / g[v], 3) for v in ("ours_w8a8_tl_dot", "ours_w8a8_gluon") if g.get(v) and g.get("torch_fp16")}
    res["gemm_w8a8_4096"] = dict(value=val, detail=paths)
    conv = [(t["torch_fp16"], t["ours_w8a8"], k) for k, t in table.items()
            if k.startswith("conv") and ",k=3," in k and "B=256" in k and t.get("torch_fp16") and t.get("ours_w8a8")]
    res["conv3x3_b256"] = dict(value=sum(c[0] for c in conv) / sum(c[1] for c in conv) if conv else None,
                               detail=dict(shapes=len(conv), per_shape_min=min((c[0] / c[1] for c in conv), default=None),
                                           per_shape_max=max((c[0] / c[1] for c in conv), default=None)))
    cells = {(c["batch"], c["variant"]): c for c in steps.get("sampling", {}).get("cells", []) or []
             if c.get("status") == "ok" and c.get("model") == "ddpm-cifar10"}
    w8 = [c for (b, v), c in cells.items() if b == 256 and v.startswith("tgpq-w8a8")]
    bw = min(w8, key=lambda c: c["s_per_image"]) if w8 else None
    eager, comp = cells.get((256, "fp16-eager")), cells.get((256, "fp16-compile"))
    res["e2e_vs_eager"] = dict(value=eager["s_per_image"] / bw["s_per_image"] if bw and eager else None,
                               detail=dict(best_w8a8_variant=bw["variant"] if bw else None))
    res["e2e_vs_compile"] = dict(value=comp["s_per_image"] / bw["s_per_image"] if bw and comp else None,
                                 detail=dict(best_w8a8_variant=bw["variant"] if bw else None))
    for k, (w, t) in TARGETS.items():
        v = res[k]["value"]
        res[k].update(what=w, target=t, met=None if v is None else v >= t)
    return res


def _fmt(v, nd=2):
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def summary_markdown(doc):
    su, env = doc["suite"], doc.get("env", {})
    lines = [f"# GPU suite: {env.get('device', 'no GPU')} ({su['started'][:10]})", "",
             f"`{su['command']}` - commit {su['git_commit']}, mode {su['mode']}, budget {su['budget_s']:.0f} s, "
             f"{'finished' if su['final'] else 'in progress'} at {su['elapsed_s']:.0f} s. torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, python {env.get('python')}, "
             f"{env.get('cpus')} CPUs.", "", "## Targets (issue 18)", "",
             "| target | measured | needed | met |", "| --- | ---: | ---: | --- |"]
    for t in doc["targets"].values():
        met = "-" if t["met"] is None else "yes" if t["met"] else "**no**"
        lines.append(f"| {t['what']} | {_fmt(t['value'])}{'x' if t['value'] else ''} | {t['target']}x | {met} |")
    lines += ["", "## Steps", "", "| step | status | seconds | deadline (s from start) | note |",
              "| --- | --- | ---: | ---: | --- |"]
    for p in doc["plan"]:
        st = doc["steps"].get(p["name"], {})
        note = " ".join((st.get("reason") or "").split())[-160:].replace("|", "/")  # the end: the error, not the command
        lines.append(f"| {p['name']} | {st.get('status')} | {_fmt(st.get('seconds'), 1)} | {p['deadline_s']:.0f} | {note} |")
    ins = doc["steps"].get("install", {})
    if ins.get("build"):
        b, pc = ins["build"], ins.get("precompile", {})
        lines += ["", f"Install: wheels {_fmt((ins.get('wheels') or {}).get('seconds'), 1)} s; extension (CPU part) "
                  f"{_fmt(b.get('seconds'), 1)} s ({b.get('what') or b.get('reason')}); precompile "
                  f"{pc.get('compiled')} of {pc.get('distinct_compiles')} kernels for {pc.get('target')} on "
                  f"{pc.get('workers')} processes in {_fmt(pc.get('seconds'), 1)} s; CUDA part: "
                  f"{(doc['steps'].get('correctness', {}).get('cuda_build') or ins.get('cuda_build') or {}).get('status')}."]
    cor = doc["steps"].get("correctness", {}).get("tests")
    if cor:
        lines += ["", f"## Correctness: {json.dumps(cor['counts'])}", ""]
        lines += [f"- FAILED `{f['test']}`: {f['message'][-300:].strip().splitlines()[-1] if f['message'].strip() else ''}"
                  for f in cor["failures"][:20]]
        lines += [f"- skipped ({n}): {r}" for r, n in list(cor["skip_reasons"].items())[:8]]
    table = doc["steps"].get("kernels", {}).get("table")
    if table:
        lines += ["", "## Kernels (ms; speed-up over torch fp16)", "",
                  "| shape | fp16 | W8A8 | W8A8 tl.dot | W8A8 Gluon | W4A8 | int_mm (separate quantize) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for shape, t in table.items():
            f16 = t.get("torch_fp16")

            def cell(v):
                ms = t.get(v)
                return "-" if not ms else f"{ms:.4f}" + (f" ({f16 / ms:.2f}x)" if f16 else "")
            lines.append(f"| {shape} | {cell('torch_fp16')} | {cell('ours_w8a8')} | {cell('ours_w8a8_tl_dot')} | "
                         f"{cell('ours_w8a8_gluon')} | {cell('ours_w4a8')} | {cell('int_mm_sep')} |")
    samp = doc["steps"].get("sampling", {})
    if samp.get("cells"):
        lines += ["", f"## Sampling ({samp.get('steps')} DDIM steps)", "",
                  "| model | batch | variant | status | ms / image | images / s | speed-up | peak MiB |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
        for c in samp["cells"]:
            spi = c.get("s_per_image")
            lines.append(f"| {c['model']} | {c['batch']} | {c['variant']} | {c['status']} | "
                         f"{_fmt(spi * 1e3 if spi else None)} | {_fmt(c.get('images_per_s'), 1)} | "
                         f"{_fmt(c.get('speedup_vs_baseline'))} | "
                         f"{_fmt(c['peak_mem_bytes'] / 2**20 if c.get('peak_mem_bytes') else None, 0)} |")
        for p in samp.get("profiles", []):
            lines += ["", f"Where the time goes: {p['variant']} batch {p['batch']} (top kernels by device time)", "",
                      "| % | self us | calls | kernel |", "| ---: | ---: | ---: | --- |"]
            lines += [f"| {k['pct']:.1f} | {k['self_time_us']:.0f} | {k['calls']} | `{k['name'][:80]}` |" for k in p["top"]]
    tr = doc["steps"].get("train", {})
    if tr.get("train") or tr.get("heldout"):
        t, h, hb = tr.get("train") or {}, tr.get("heldout") or {}, tr.get("heldout_committed") or {}
        lines += ["", "## Training", "", f"{t.get('steps_this_run')} steps, {t.get('images_this_run')} images in "
                  f"{t.get('seconds')} s ({t.get('images_per_s')} images/s, {t.get('precision')}, batch "
                  f"{t.get('batch_size')}); now step {t.get('step')}, {t.get('images_seen')} images seen. Held-out "
                  f"loss ({h.get('images')} test images): {_fmt(h.get('heldout_loss'), 5)}, committed weights "
                  f"{_fmt(hb.get('heldout_loss'), 5)}. Weights: `{(tr.get('weights') or {}).get('file')}`."]
    return "\n".join(lines) + "\n"


def compact_result(doc):
    """A few lines for the end of the console output: every step's status and the targets."""
    lines = ["RESULT " + " | ".join(f"{p['name']} {doc['steps'].get(p['name'], {}).get('status')} "
                                    f"{_fmt(doc['steps'].get(p['name'], {}).get('seconds'), 0)} s" for p in doc["plan"])]
    for k, t in doc["targets"].items():
        lines.append(f"TARGET {k}: {_fmt(t['value'])}x (needs {t['target']}x) met={t['met']}")
    return "\n".join(lines)


