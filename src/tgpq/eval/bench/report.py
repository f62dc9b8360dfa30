"""Reporting of the sampling benchmark: device names, ratios against the baseline, markdown, charts, files."""
from __future__ import annotations

import json
import platform
import re
import subprocess
from pathlib import Path

import torch

from .variants import GPU_NOTE

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{cpu} ({n} thread{'s' if n > 1 else ''})"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"



# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

def add_ratios(results: list[dict], baseline: str) -> None:
    """speedup / memory ratios against the baseline variant at the same model and batch."""
    base = {(r["model"], r["batch"]): r for r in results if r["variant"] == baseline and r["status"] == "ok"}
    for r in results:
        b = base.get((r["model"], r["batch"]))
        if r["status"] != "ok" or b is None:
            continue
        r["speedup_vs_baseline"] = b["sampling_s"] / r["sampling_s"]
        r["weight_mem_vs_baseline"] = r["weight_bytes"] / b["weight_bytes"]
        if r.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
            r["peak_mem_vs_baseline"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]
        if r.get("device_model_bytes") and b.get("device_model_bytes"):
            r["device_model_vs_baseline"] = r["device_model_bytes"] / b["device_model_bytes"]


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def markdown_report(doc: dict) -> str:
    lines = [f"# Sampling benchmark: {doc['device']}", "",
             f"{doc['date']}, torch {doc['torch']}, triton {doc['triton']}, commit {doc['git_commit']}, "
             f"DDIM {doc['steps']} steps, baseline `{doc['baseline']}`.", "", f"`{doc['command']}`", ""]
    if doc["mode"] == "cpu":
        lines += [f"**{GPU_NOTE}**", ""]
    for name, why in doc.get("skipped_models", {}).items():
        lines.append(f"- model `{name}` skipped: {why}")
    for model in dict.fromkeys(r["model"] for r in doc["results"]):
        info = doc["models"].get(model, {})
        lines += ["", f"## {model}: {info.get('description', '')} ({info.get('params', 0) / 1e6:.1f}M parameters)", "",
                  "| batch | variant | ms / image | images / s | speedup | peak MiB | weight MiB | weight x "
                  "| on-device model MiB | note |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in (r for r in doc["results"] if r["model"] == model):
            if r["status"] != "ok":
                lines.append(f"| {r['batch']} | {r['variant']} | - | - | - | - | - | - | - | {r['status']}: "
                             f"{r.get('error', '')[:80].replace('|', '/')} |")
                continue
            sp = r.get("speedup_vs_baseline")
            wx = r.get("weight_mem_vs_baseline")
            note = f"extrapolated from {r['steps_timed']} steps" if r["extrapolated"] else f"median of {r['repeats']}"
            lines.append(f"| {r['batch']} | {r['variant']} | {r['s_per_image'] * 1e3:.2f} | {r['images_per_s']:.1f} | "
                         f"{'-' if sp is None else f'{sp:.2f}x'} | {_mib(r.get('peak_mem_bytes'))} | "
                         f"{_mib(r['weight_bytes'])} | {'-' if wx is None else f'{1 / wx:.2f}x smaller'} | "
                         f"{_mib(r.get('device_model_bytes'))} | {note} |")
    for prof in doc.get("profiles", []):
        lines += ["", f"## Where the time goes: {prof['model']} {prof['variant']} batch {prof['batch']}, "
                      f"{prof['steps']} steps ({prof['sorted_by']})", "", "| % | self us | calls | kernel / op |",
                  "| ---: | ---: | ---: | --- |"]
        for k in prof["top"][:12]:
            lines.append(f"| {k['pct']:.1f} | {k['self_time_us']:.0f} | {k['calls']} | `{k['name'][:90]}` |")
    return "\n".join(lines) + "\n"


def plot_report(doc: dict, path: Path) -> None:
    """Per model: speedup vs the baseline (left) and peak / weight memory (right), grouped by batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(14, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        rs = [r for r in ok if r["model"] == model]
        batches = sorted({r["batch"] for r in rs})
        variants = list(dict.fromkeys(r["variant"] for r in rs))
        width = 0.8 / max(len(variants), 1)
        for vi, v in enumerate(variants):
            by_b = {r["batch"]: r for r in rs if r["variant"] == v}
            xs = [bi + vi * width for bi in range(len(batches))]
            sp = [by_b[b].get("speedup_vs_baseline", 0) if b in by_b else 0 for b in batches]
            axes[row][0].bar(xs, sp, width, label=v)
            mem = [(by_b[b].get("peak_mem_bytes") or by_b[b]["weight_bytes"]) / 2**20 if b in by_b else 0
                   for b in batches]
            axes[row][1].bar(xs, mem, width, label=v)
            if doc["mode"] == "gpu":  # weights as a dark inner bar inside the peak bar
                wts = [by_b[b]["weight_bytes"] / 2**20 if b in by_b else 0 for b in batches]
                axes[row][1].bar(xs, wts, width * 0.45, color="k", alpha=0.45,
                                 label="weights" if vi == 0 else None)
        for ax, title in ((axes[row][0], f"{model}: speedup vs {doc['baseline']}"),
                          (axes[row][1], f"{model}: {'peak (bar) / weight (inner) ' if doc['mode'] == 'gpu' else 'weight '}"
                                         f"memory (MiB)")):
            ax.set_xticks([bi + 0.4 - width / 2 for bi in range(len(batches))], [f"batch {b}" for b in batches])
            ax.set_title(title, fontsize=10)
        axes[row][0].axhline(1.0, color="k", lw=0.8)
        axes[row][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"DDIM {doc['steps']}-step sampling on {doc['device']}" +
                 (" (CPU mode: GPU numbers need a GPU)" if doc["mode"] == "cpu" else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], 
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def write_outputs(doc: dict, out_dir: Path, stem: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{stem}{suffix}" for k, suffix in
             (("json", ".json"), ("md", ".md"), ("png", ".png"), ("profile", "-profile.txt"))}
    profiles = doc.get("profiles", [])
    serial = dict(doc, profiles=[{k: v for k, v in p.items() if k != "table"} for p in profiles])
    paths["json"].write_text(json.dumps(serial, indent=1, default=str))
    paths["md"].write_text(markdown_report(doc))
    if profiles:
        paths["profile"].write_text("\n\n".join(
            f"== {p['model']} {p['variant']} batch {p['batch']} ({p['steps']} steps) ==\n{p['table']}" for p in profiles))
    return paths


