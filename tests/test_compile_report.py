"""Ahead-of-time compile gate for the Triton kernels (no GPU needed) and the GPU suite's dry run.

Every kernel variant (benchmarks/compile_check.py variants: W8A8/W4A8 GEMM in fp16/bf16, masked-K,
implicit-GEMM conv 3x3 s1/s2 and 1x1) is compiled for sm_90 and sm_80 with the launcher's
specialization hints, and each row must: compile, contain int8 tensor-core SASS (IGMMA...S8 on
sm_90, IMMA...S8 on sm_80), spill nothing, and fit the target's per-block shared memory
(227 KB sm_90, 163 KB sm_80).

Test time: one compile costs 2-5 s on a 2-core machine, the full matrix (~60 compiles) about four
minutes, too slow for CI. By default every variant is compiled on both targets with one config,
rotating the config index across variants so that every config of every autotune list is still
compiled by some variant (20 compiles, about 70 s). ``TGPQ_FULL_COMPILE_CHECK=1`` runs the full
matrix (and ``python benchmarks/compile_report.py --json ... --check`` always does).

These tests run with the installed triton (3.9 in CI). The GPU machine has triton 3.6.0, whose
Gluon API differs: ``.ci/run`` also runs the full sm_90 matrix under 3.6.0 in a side environment.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
cc = pytest.importorskip("compile_check")

FULL = os.environ.get("TGPQ_FULL_COMPILE_CHECK", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _rows():
    return tuple(cc.run(cc.plan(("sm_90", "sm_80"), subset=not FULL), progress=False))


def _ids():
    return [f"{v.name}-{c[0]}x{c[1]}x{c[2]}w{c[3]}s{c[4]}-{t}" for v, c, t, _ in cc.plan(subset=not FULL)]


@pytest.mark.parametrize("index", range(len(_ids())), ids=_ids())
def test_kernel_config_compiles_clean(index):
    row = _rows()[index]
    where = f"{row['kernel']} {row['config']} {row['target']}"
    assert row["ok"], f"{where}: {row.get('error')}"
    assert row["int8_mma"] > 0, f"{where}: no int8 tensor-core instruction in the SASS"
    ops = list(row["int8_mma_ops"])
    if row["target"] == "sm_90":
        assert row["mma_version"] == 3 and all(op.startswith("IGMMA.") for op in ops), ops
    else:
        assert row["mma_version"] == 2 and all(op.startswith("IMMA.16832.S8.S8") for op in ops), ops
    assert row["spill_bytes"] == 0 and row["local_mem_ops"] == 0, f"{where}: spills ({row['n_regs']} regs)"
    assert 0 < row["shared_bytes"] <= cc.SHARED_LIMIT[row["target"]]


def test_gluon_variant_keeps_one_wgmma_in_flight():
    """Issue 9: tl.dot with an int32 accumulator is always followed by wait(0) (Triton's WGMMA
    pipeliner only makes fp32-accumulator dots async); the hand-issued Gluon kernel waits with
    pendings = 1 inside its loop."""
    rows = [r for r in _rows() if r["kernel"].endswith("_gluon_wgmma_async")]
    if not rows:
        pytest.skip("this triton has no Gluon")
    assert {r["kernel"] for r in rows} == {"qgemm_w8a8_fp16_gluon_wgmma_async", "qgemm_w8a8_bf16_gluon_wgmma_async"}
    for r in rows:
        assert r["ok"] and r["target"] == "sm_90", r.get("error")
        assert r["wgmma_wait_pendings"] == [0, 1]  # 1 in the loop, 0 before the epilogue
        assert r["sass_wgmma_waits"] == [0, 1] and not r["wgmma_serialized"]  # ptxas kept it so
        assert r["int8_mma"] > 0 and all(op.startswith("IGMMA.") and op.endswith(".S8.S8") for op in r["int8_mma_ops"])
        assert r["spill_bytes"] == 0 and r["local_mem_ops"] == 0
        bm, bn, bk = map(int, r["config"].split("_")[0].split("x"))
        assert sorted(r["smem_buffers"]) == sorted([f"2x{bm}x{bk}xi8", f"2x{bn}x{bk}xi8"])  # two slots each
        assert r["shared_bytes"] == 2 * (bm + bn) * bk
        assert not cc.row_problems(r)


def test_gate_requires_the_gluon_overlap():
    """A Gluon row whose waits all have 0 pendings (or that ptxas serialized) fails the gate."""
    row = dict(kernel="k", family="gluon", config="c", target="sm_90", ok=True, int8_mma=2, spill_bytes=0,
               shared_bytes=32768, shared_limit=cc.SHARED_LIMIT["sm_90"], n_regs=100,
               wgmma_wait_pendings=[0, 1], sass_wgmma_waits=[0, 1], wgmma_serialized=False)
    assert cc.row_problems(row) == []
    assert cc.row_problems(dict(row, sass_wgmma_waits=[0]))
    assert cc.row_problems(dict(row, wgmma_wait_pendings=[0]))
    assert cc.row_problems(dict(row, wgmma_serialized=True))
    assert cc.row_problems(dict(row, family="gemm", wgmma_wait_pendings=[0], sass_wgmma_waits=[0])) == []


def test_compile_error_summary_names_the_failing_call():
    """A CompilationError message shows the source lines *before* the failing one, then a caret and
    the cause: the summary keeps the failing line and the cause (triton 3.6 once reported the
    Gluon kernel as failing 'at its gl.load' when the cause was a missing gl.barrier)."""
    msg = ("at 40:8:\n    for kt in range(num_k):\n        xa = gl.load(x_ptrs)\n        fence_async_shared()\n"
           "        gl.barrier()\n        ^\nAttributeError(\"module 'gl' has no attribute 'barrier'\")")
    out = cc.error_summary(RuntimeError(msg))
    assert out.startswith("RuntimeError: at 40:8:")
    assert "gl.barrier()" in out and "has no attribute 'barrier'" in out and "gl.load" not in out


def test_every_autotune_config_is_covered():
    covered = {(v.family, t, i) for v, _, t, i in cc.plan(subset=not FULL)}
    for (family, target), cfgs in cc.CONFIGS.items():
        for i in range(len(cfgs)):
            assert (family, target, i) in covered, (family, target, i)


def test_gate_catches_the_sm80_spilling_tile():
    """A 128x256 int32 tile on 4 warps collapses to 32 registers and spills ~17 KB on sm_80
    (triton 3.9), so the sm_80 lists hold no such tile and the gate would catch one."""
    v = cc.variants()["qgemm_w8a8_fp16"]
    row = cc.compile_row(v, (128, 256, 64, 4, 3), "sm_80")
    assert row["ok"]
    assert row["spill_bytes"] > 0
    assert any("spills" in p for p in cc.problems([row]))
    assert all(bm * bn <= 128 * 128 or w >= 8 for bm, bn, _, w, _ in cc.CONFIGS[("gemm", "sm_80")])
