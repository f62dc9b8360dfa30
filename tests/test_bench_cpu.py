"""``benchmarks/bench_cpu.py --quick``: the CPU benchmark's smoke run (seconds) writes a complete report."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tgpq.backends import library as ops

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"

pytestmark = pytest.mark.skipif(not ops.has_extension(), reason="tgpq C++ extension not built")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("bench_cpu")
    threads = torch.get_num_threads()
    try:
        res = mod.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return res, out / "quick"


def test_quick_writes_json_markdown_png(quick):
    res, out = quick
    assert {p.name for p in out.iterdir()} >= {"bench_cpu.json", "bench_cpu.md", "bench_cpu.png"}
    saved = json.loads((out / "bench_cpu.json").read_text())
    assert saved["config"] == "quick" and saved["ceilings"]["isa"] in ("avx512vnni", "avx2", "scalar")
    md = (out / "bench_cpu.md").read_text()
    assert "End to end" in md and "tgpq_w8a8" in md and "Where tgpq W8A8 spends its time" in md


def test_quick_covers_every_layer_shape_and_the_contenders(quick):
    res, _ = quick
    kinds = {r["shape"][0] for r in res["layers"]}
    assert kinds == {"conv", "linear"}
    assert sum(r["count"] for r in res["layers"]) >= 20  # every quantized Conv2d/Linear of the small UNet
    for r in res["layers"]:
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values()), r
    (e2e,) = res["end_to_end"]
    for name in ("fp32_eager", "tgpq_w8a8", "tgpq_w4a8", "tgpq_w8a8_unfused"):
        assert math.isfinite(e2e["ms"][name]) and e2e["ms"][name] > 0
    err = e2e["rel_rmse_vs_fp32"]
    # min/max-calibrated random-weight UNet: W8A8 within a few percent of fp32, W4A8 looser
    assert err["tgpq_w8a8"] < 0.15 and err["tgpq_w4a8"] < 0.5
    # the fused CPU path computes what the unfused one does up to GroupNorm ulps
    assert abs(err["tgpq_w8a8"] - err["tgpq_w8a8_unfused"]) < 0.01
    assert res["sampling"]["steps"] == 2 and "tgpq_w8a8" in res["sampling"]["seconds"]


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from /proc/cpuinfo")
def test_amx_ceiling_is_measured_exactly_where_the_cpu_has_amx(quick):
    """The AMX tile dot product's peak (the ceiling of oneDNN's rows on an AMX CPU) is 0 without AMX and a
    real rate with it, so that no oneDNN row on an AMX machine is held to vpdpbusd's lower ceiling."""
    res, _ = quick
    amx = res["ceilings"]["int8_amx"]
    if {"amx_tile", "amx_int8"} <= _cpu_flags():
        assert math.isfinite(amx) and amx > 0
        over = [(r["shape"], k) for r in res["layers"] for k, v in r["pct_of_ceiling"].items() if v > 100]
        assert not over, over
    else:
        assert amx == 0.0
