"""The sampling benchmark's CPU ``--quick`` mode: runs in seconds and writes a complete report."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sampling.py"


@pytest.fixture(scope="module")
def bench():
    import tgpq.eval.bench

    return tgpq.eval.bench


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        doc = bench.main(["--quick", "--cpu", "--out", str(out), "--models", "tiny-ddpm", "tiny-ldm",
                          "--variants", "fp32-eager", "tgpq-w8a8-cpu", "tgpq-w4a8-cpu"])
    finally:
        torch.set_num_threads(threads)  # --quick runs on one thread; restore for the other tests
    return doc, out


def test_quick_mode_writes_json_markdown_png(quick_run, capsys):
    doc, out = quick_run
    files = {p.suffix for p in out.iterdir()}
    assert {".json", ".md", ".png"} <= files
    saved = json.loads(next(out.glob("sampling-cpu-*.json")).read_text())
    for key in ("device", "torch", "triton", "git_commit", "command", "date", "steps", "results", "models",
                "baseline", "note", "profiles"):
        assert key in saved, key
    assert saved["mode"] == "cpu" and "need a GPU" in saved["note"]
    assert "--quick" in saved["command"]
    assert saved["models"]["tiny-ldm"]["text_shape"] == [7, 32]  # the conditional model got text embeddings


def test_every_cell_measured_with_positive_timings(quick_run):
    doc, _ = quick_run
    cells = {(r["model"], r["variant"], r["batch"]) for r in doc["results"]}
    assert len(cells) == 6 and len(doc["results"]) == 6
    for r in doc["results"]:
        assert r["status"] == "ok", r
        for k in ("sampling_s", "s_per_image", "images_per_s", "step_ms", "warmup_s"):
            assert r[k] > 0 and math.isfinite(r[k]), (k, r)
        assert math.isclose(r["images_per_s"] * r["s_per_image"], 1.0, rel_tol=1e-9)
        assert r["steps_timed"] >= 1 and r["weight_bytes"] > 0
        assert r["peak_mem_bytes"] is None  # no device allocator on the CPU
        assert r["speedup_vs_baseline"] > 0


def test_quantized_weights_are_smaller(quick_run):
    doc, _ = quick_run
    by = {(r["model"], r["variant"]): r for r in doc["results"]}
    for model in ("tiny-ddpm", "tiny-ldm"):
        fp = by[(model, "fp32-eager")]["weight_bytes"]
        w8 = by[(model, "tgpq-w8a8-cpu")]["weight_bytes"]
        w4 = by[(model, "tgpq-w4a8-cpu")]["weight_bytes"]
        # int8 weights vs float32: ~4x less on the quantized layers; conv_in/out, norms and the time
        # embedding stay float32, so the tiny models land near 3.4x (W8) and 5.9x (W4)
        assert fp / w8 > 2.5 and fp / w4 > 4.0 and w4 < w8
        assert by[(model, "fp32-eager")]["speedup_vs_baseline"] == 1.0


def test_profile_lists_tgpq_kernels(quick_run):
    doc, out = quick_run
    assert doc["profiles"], "no profile recorded"
    names = " ".join(k["name"] for p in doc["profiles"] for k in p["top"])
    assert "tgpq::" in names  # the quantized layers ran through the C++ ops
    assert next(out.glob("*-profile.txt")).read_text().strip()


def test_gpu_only_variant_rejected_on_cpu(bench, tmp_path):
    with pytest.raises(ValueError, match="needs a GPU"):
        bench.main(["--quick", "--cpu", "--out", str(tmp_path), "--variants", "fp16-eager"])


def test_model_configs_match_published_sizes(bench):
    """Parameter counts of the full-size configs, counted on the meta device (no memory, no time)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    with torch.device("meta"):
        ddpm = UNet2DModel(**bench.DDPM_CIFAR10_CONFIG)
        sd = UNet2DConditionModel(**bench.SD15_UNET_CONFIG)
    assert bench.param_count(ddpm) == bench.DDPM_CIFAR10_PARAMS == 35_746_307
    assert bench.param_count(sd) == bench.SD15_PARAMS == 859_520_964


def test_reachable_through_tgpq_cli(tmp_path, capsys):
    """``tgpq bench -- <args>`` runs this script with the arguments after the separator."""
    from tgpq.cli import main as cli_main

    threads = torch.get_num_threads()
    try:
        rc = cli_main(["bench", "--", "--quick", "--models", "tiny-ddpm", "--variants", "fp32-eager",
                       "--no-profile", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    saved = json.loads(next(tmp_path.glob("sampling-cpu-*.json")).read_text())
    assert [r["status"] for r in saved["results"]] == ["ok"]
    assert "need a GPU" in capsys.readouterr().out


def test_gpu_report_renders_all_statuses(bench, tmp_path):
    """The GPU-only reporting path (peak memory, OOM / error / skipped cells) on hand-made records."""
    def ok(variant, batch, seconds, weights, peak):
        return {"model": "ddpm-cifar10", "variant": variant, "batch": batch, "status": "ok", "sampling_s": seconds,
                "s_per_image": seconds / batch, "images_per_s": batch / seconds, "step_ms": seconds * 10,
                "repeats": 3, "steps_timed": 300, "extrapolated": False, "warmup_s": 1.0,
                "weight_bytes": weights, "peak_mem_bytes": peak, "device_model_bytes": weights}

    results = [ok("fp16-eager", 256, 2.0, 71_000_000, 9e9), ok("tgpq-w8a8", 256, 1.25, 37_000_000, 8e9),
               ok("fp16-eager", 16, 0.5, 71_000_000, 1e9),
               {"model": "ddpm-cifar10", "variant": "tgpq-w4a8", "batch": 256, "status": "oom", "error": "CUDA OOM"},
               {"model": "ddpm-cifar10", "variant": "tgpq-w8a8-compile", "batch": 16, "status": "skipped",
                "error": "--total-seconds 540: 12 s left"}]
    bench.add_ratios(results, "fp16-eager")
    assert results[1]["speedup_vs_baseline"] == pytest.approx(1.6)
    assert results[1]["peak_mem_vs_baseline"] == pytest.approx(8 / 9)
    assert "speedup_vs_baseline" not in results[3]
    doc = {"mode": "gpu", "device": "NVIDIA H100 80GB HBM3", "date": "2026-11-25T00:00:00+00:00", "torch": "2.11",
           "triton": "3.6", "git_commit": "abc", "steps": 100, "baseline": "fp16-eager", "command": "x",
           "models": {"ddpm-cifar10": {"description": "DDPM", "params": 35_746_307}}, "skipped_models": {},
           "results": results, "profiles": [{"model": "ddpm-cifar10", "variant": "tgpq-w8a8", "batch": 256,
                                             "steps": 2, "sorted_by": "self device time", "table": "t",
                                             "top": [{"name": "qgemm_kernel", "calls": 4, "self_time_us": 10.0,
                                                      "pct": 50.0}]}]}
    md = bench.markdown_report(doc)
    assert "1.60x" in md and "oom" in md and "skipped" in md and "qgemm_kernel" in md
    assert "need a GPU" not in md
    bench.plot_report(doc, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_script_is_the_packaged_benchmark():
    """``benchmarks/bench_sampling.py`` is a thin entry point to ``tgpq.eval.bench`` (what ``tgpq bench`` runs)."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "--variants" in r.stdout
