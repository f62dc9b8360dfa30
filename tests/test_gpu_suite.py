"""The GPU suite's machinery on the CPU (benchmarks/gpu_suite.py, bench_kernels.py --precompile, the training
step's held-out subset): plan and deadlines, streaming test results, targets, OUT's limits, the payload.
The whole plan is rehearsed by ``python benchmarks/gpu_suite.py --rehearse`` (CI: ``--rehearse --ci``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_kernels as bk  # noqa: E402
import gpu_suite as gs  # noqa: E402
from gpusuite import core  # noqa: E402


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), str(out), "--dry-run"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name, _, _ in gs.STEPS:
        assert name in r.stdout
    assert "budget 510 s" in r.stdout
    assert not out.exists()


def test_plan_divides_the_budget_by_priority():
    s = gs.Suite("/nonexistent", 510.0, gs.PAYLOAD, sys.executable, cpu_mode=True, dry_run=True)
    deadlines = [p["deadline_s"] for p in s.plan]
    assert [p["name"] for p in s.plan] == ["install", "correctness", "kernels", "sampling", "train"]
    assert deadlines == sorted(deadlines) and deadlines[-1] == 510.0 - gs.FINAL_RESERVE_S
    assert abs(deadlines[0] - 0.20 * 500) < 0.1 and abs(deadlines[3] - (0.20 + 0.17 + 0.14 + 0.33) * 500) < 0.1
    tiny = gs.Suite("/nonexistent", 90.0, gs.PAYLOAD, sys.executable, cpu_mode=True, dry_run=True)
    assert all(p["least_s"] < p["share"] * 80 for p in tiny.plan[:-1])  # a tiny budget still starts every step
    assert gs.DEVICE_TIMEOUT_S >= 510 + 40  # the device call outlives the suite by start-up and margin


def test_a_step_is_stopped_at_its_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "WORK", str(tmp_path / "work"))  # Suite reads it there
    s = gs.Suite(str(tmp_path / "out"), 60.0, gs.PAYLOAD, sys.executable, cpu_mode=True)
    t = time.time()
    r = s.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
              str(tmp_path / "work" / "x.log"), deadline=time.time() + 2.0)
    assert r["timed_out"] and time.time() - t < 2.0 + gs.GRACE_S
    assert "started" in (tmp_path / "work" / "x.log").read_text()
    r = s.run([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "work" / "y.log"), time.time() + 30)
    assert r["rc"] == 3 and not r["timed_out"]


def test_pytest_plugin_streams_every_outcome(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'boom'\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA device')\n"
        "def test_skipped(): pass\n")
    log = tmp_path / "tests.jsonl"
    env = dict(os.environ, TGPQ_SUITE_TESTLOG=str(log), PYTHONPATH=os.path.join(ROOT, "benchmarks"))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_suite",
                    str(tmp_path / "test_x.py")], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    res = gs.parse_testlog(str(log))
    assert res["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert res["failures"][0]["test"].endswith("test_bad") and "boom" in res["failures"][0]["message"]
    assert res["skip_reasons"] == {"needs a CUDA device": 1}


def test_targets_from_measurements():
    table = {"gemm M=4096,N=4096,K=4096": {"torch_fp16": 1.0, "ours_w8a8": 0.7, "ours_w8a8_tl_dot": 0.7,
                                            "ours_w8a8_gluon": 0.55},
             "conv B=256,Cin=128,Cout=128,k=3,stride=1,pad=1,H=32,W=32": {"torch_fp16": 2.0, "ours_w8a8": 1.0},
             "conv B=256,Cin=256,Cout=256,k=3,stride=1,pad=1,H=8,W=8": {"torch_fp16": 0.1, "ours_w8a8": 0.2}}
    cells = [dict(model="ddpm-cifar10", batch=256, variant=v, status="ok", s_per_image=t) for v, t in
             (("fp16-eager", 1.0), ("fp16-compile", 0.8), ("tgpq-w8a8", 0.9), ("tgpq-w8a8-cudagraph", 0.7))]
    t = gs.evaluate_targets({"kernels": {"table": table}, "sampling": {"cells": cells}}, cpu_mode=False)
    assert t["gemm_w8a8_4096"]["value"] == pytest.approx(1 / 0.55) and t["gemm_w8a8_4096"]["met"]
    assert t["conv3x3_b256"]["value"] == pytest.approx(2.1 / 1.2) and t["conv3x3_b256"]["met"]
    assert t["e2e_vs_eager"]["value"] == pytest.approx(1 / 0.7) and t["e2e_vs_eager"]["met"]
    assert t["e2e_vs_compile"]["value"] == pytest.approx(0.8 / 0.7) and not t["e2e_vs_compile"]["met"]
    assert t["e2e_vs_compile"]["detail"]["best_w8a8_variant"] == "tgpq-w8a8-cudagraph"
    assert all(v["value"] is None for v in gs.evaluate_targets({}, cpu_mode=True).values())


def test_out_check_enforces_the_device_tools_limits(tmp_path):
    out = tmp_path / "out"
    (out / "a" / "b" / "c").mkdir(parents=True)
    for i in range(8):
        (out / f"f{i}.txt").write_text("x")
    (out / "a" / "b" / "c" / "deep.txt").write_text("x")
    (out / "bad name.txt").write_text("x")
    problems = gs.check_out(str(out), {"plan": [], "steps": {}, "suite": {"elapsed_s": 1, "budget_s": 60}})
    text = "\n".join(problems)
    assert "deeper than 2 folders" in text and "a name the device tool does not return" in text
    assert "10 files in OUT" in text and "summary.json missing" in text


def test_rehearsal_finds_steps_that_did_no_work():
    from gpusuite.rehearse import work_done

    done = {"correctness": {"status": "ok", "tests": {"counts": {"passed": 3, "skipped": 40}}},
            "kernels": {"status": "ok", "rows": 4}, "sampling": {"status": "ok", "cells": [{"status": "ok"}]},
            "train": {"status": "ok", "train": {"steps_this_run": 2}, "heldout": {"heldout_loss": 0.02}}}
    assert work_done(done) == []
    idle = {"correctness": {"status": "ok", "tests": {"counts": {"skipped": 40}}}, "kernels": {"status": "ok", "rows": 0},
            "sampling": {"status": "ok", "cells": [{"status": "error"}]},
            "train": {"status": "ok", "train": {"steps_this_run": 0}, "heldout": {"heldout_loss": 0.02}}}
    assert [p.split(":")[0] for p in work_done(idle)] == ["step correctness", "step kernels", "step sampling",
                                                           "step train"]


def test_unet_layer_list_is_what_a_converted_ddpm_unet_runs():
    """UNET_QLAYERS (the kernel benchmark's conv shapes and the precompile list) against the layers tgpq
    quantizes in the full-size DDPM CIFAR-10 UNet (``quantizable_layers`` with the default exclude list) and
    the inputs they see."""
    import torch

    from tgpq.calibration.blocks import quantizable_layers
    from tgpq.eval.bench.models import model_spec
    from tgpq.recipe import QuantConfig

    unet = model_spec("ddpm-cifar10").build(torch.device("meta"))  # shapes only: no memory, no arithmetic
    seen = set()

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, torch.nn.Conv2d):
            seen.add(("conv", mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0],
                      *x.shape[2:]))
        else:
            seen.add(("linear", mod.in_features, mod.out_features, x.numel() // x.shape[-1]))

    modules = dict(unet.named_modules())
    for name in quantizable_layers(unet, QuantConfig().exclude):
        modules[name].register_forward_hook(hook)
    with torch.no_grad():
        unet(torch.empty(1, 3, 32, 32, device="meta"), torch.tensor([500], device="meta"))
    assert seen == set(bk.UNET_QLAYERS)


def test_precompile_list_holds_the_gpu_tests_shapes():
    import test_triton_kernels as tk

    assert list(bk.TEST_GEMMS) == tk.GPU_GEMM_SHAPES
    assert [c[:8] for c in tk.GPU_CONV_CASES] == list(bk.TEST_CONVS) and all(c[8] == 1 for c in tk.GPU_CONV_CASES)
    from test_gpu_backends import BATCH
    assert BATCH == bk.BACKEND_TEST_BATCH


def test_precompile_counts_the_specializations_for_sm90():
    """--precompile walks every launch the suite makes without a GPU (a stand-in driver): Triton's own keys,
    no compile. The kernels' do_not_specialize keeps the count low (121 without it)."""
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_kernels.py"), "--precompile", "--count",
                        "--fake-target", "sm_90"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    stats = json.loads(r.stdout.split("PRECOMPILE ", 1)[1])
    assert r.returncode == 0 and stats["n_errors"] == 0, stats["errors"]
    assert stats["compiled"] == 0 and 30 <= stats["distinct_compiles"] <= 80, stats


def test_heldout_subset_file_gives_the_same_loss(tmp_path, monkeypatch):
    """The GPU machine has no test.npz: the carried held-out subset must give exactly the held-out loss."""
    import train_reference as tr

    from tgpq.eval.cifar10 import default_cifar_root
    from tgpq.unet import load_reference_model

    full = default_cifar_root()
    if not (full / "test.npz").is_file():
        pytest.skip("CIFAR-10 test set not present (../shared/assets/cifar10)")
    model = load_reference_model()
    monkeypatch.setenv("TGPQ_CIFAR10", str(full))
    want = tr.heldout_loss(model, 24)
    tr.write_heldout(tmp_path / tr.HELDOUT_FILE, 30)
    monkeypatch.setenv("TGPQ_CIFAR10", str(tmp_path))
    assert tr.heldout_loss(model, 24) == want
    with pytest.raises(ValueError, match="lacks test images"):
        tr.heldout_loss(model, 40)
