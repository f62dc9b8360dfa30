#!/usr/bin/env python3
"""The GPU suite (issue 18): one command for the rare GPU machine, inside one wall-clock budget.

    benchmarks/gpu_prepare.sh                          # here, first: wheels + data into gpu_payload/
    python3 benchmarks/gpu_suite.py "$OUT"             # there: install, check, measure, train (8.5 min)
    python3 benchmarks/gpu_suite.py --rehearse OUT     # here: the same plan on the CPU, fresh venv, tiny budget
    python3 benchmarks/gpu_suite.py OUT --dry-run      # the plan and its time slices; runs nothing

A GPU is lent to this project rarely, for 15 minutes of device time in all (its start-up, every command
and every idle wait counted); one command runs at most 10 minutes and the machine has no package
registry. So the suite is a single command that can only spend its budget (``--budget-min``, default 8.5)
and spends it by priority. Each step is a subprocess (its own process group) with a deadline; the
deadlines are the cumulative shares of the budget below, so time a step leaves unused flows to the next,
and a step that overruns is stopped (SIGTERM, then SIGKILL) and the suite goes on:

    step         share  what
    install      0.20   carried wheels (pip --no-index); the C++ extension's CPU part (TGPQ_NO_CUDA=1,
                        MAX_JOBS = all cores), timed; meanwhile compile every Triton kernel the later steps
                        launch, in parallel processes (bench_kernels.py --precompile); then the extension's
                        CUDA part starts building in the background (niced, half the cores)
    correctness  0.17   pytest -m gpu: every backend vs reference on the converted DDPM UNet, every Triton
                        path (tl.dot, Gluon; W8A8, W4A8; GEMM, conv) at full size vs the int32 reference,
                        NaN propagation; then the CUDA ops, if their background build has finished
    kernels      0.14   bench_kernels.py --suite: GEMM 4096^3 and M=16, the UNet's 3x3 convs at batch 256
    sampling     0.33   bench_sampling.py: DDPM CIFAR-10 UNet, batch 256 then 64, fp16 eager / compile /
                        CUDA graphs vs tgpq W8A8 / W4A8, 20 DDIM steps, then the W8A8 profile
    train        rest   train_reference.py: the reference model from the committed weights until the
                        deadline, then its EMA weights (fp16) into OUT with a held-out loss (500 images)

The suite imports only the standard library at the top, so it starts whatever failed to install. Every
step writes its raw files under ``build/gpu_suite/`` of the checkout; after every step the suite rewrites
OUT, which never holds more than the device tool returns (8 files, 16 MiB each, two folders deep):
``summary.json`` (plan, per-step status / time / results, the issue's targets), ``summary.md`` (the same
for people), ``logs.tar.gz`` (every log and raw result) and the training step's
``reference_unet.safetensors`` / ``.json`` / ``.md``. A step cut short still leaves what it measured:
the benchmarks write their JSON after every shape / cell.

On a machine without CUDA the same plan runs with GPU-only work exercised as far as it goes: the
precompile cross-compiles for sm_90 through a stand-in driver, the correctness step records the GPU tests'
skips and runs the interpreter's NaN / tie tests, the kernel benchmark runs tiny shapes in Triton's
interpreter, the sampling benchmark its CPU variants on a tiny UNet, the training a few CPU steps.
``--rehearse`` does exactly that in a fresh virtual environment under ``build/rehearse/`` layered on an
image-like base (the GPU image's packages: torch, triton 3.6.0, numpy, pytest, safetensors, ...;
built once) that installs the project and the carried wheels with ``--no-index`` only, as the GPU
machine must, then checks that every step started, did its work (a test passed, a kernel row, a sampling
cell, a training step and its held-out loss), wrote its files and kept to its slice, and that OUT fits
the device tool's limits. Before the timed run it builds the extension's CPU part once, untimed, and
uninstalls it: a cold build takes minutes on a 2-core machine, more than the rehearsal's install slice,
so the timed install re-links from the checkout's build/ (the GPU machine builds cold, with 16 cores).
``--rehearse --ci`` is the part CI runs in about a minute (budget 2.5 min): no C++ build (the CI virtual
environment's compiled tgpq is copied instead), no compile (the precompile only counts), the tie tests
only (CI's own pytest ran the rest), two sampling variants.

Code: this file is the entry point (the command line, ``run_suite``, and the pytest plugin the correctness
step loads with ``-p gpu_suite``); the parts are in ``benchmarks/gpusuite/``: ``core`` (constants, the plan,
``Suite``: deadlines, subprocesses, OUT), ``steps`` (the five steps), ``report`` (targets, summary.md) and
``rehearse`` (the CPU rehearsal and the payload's data).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

START = time.time()  # the budget counts from here: the suite's own start-up included
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: the gpusuite package

from gpusuite.core import (DEFAULT_BUDGET_MIN, DEVICE_TIMEOUT_S, FINAL_RESERVE_S, GRACE_S,  # noqa: E402,F401
                           PAYLOAD, STEPS, WORK, Suite)
from gpusuite.rehearse import check_out, prepare_data, rehearse  # noqa: E402,F401
from gpusuite.report import compact_result, evaluate_targets, summary_markdown  # noqa: E402,F401
from gpusuite.steps import STEP_FUNCS, parse_testlog  # noqa: E402,F401

# --------------------------------------------------------------------------------------------------
# pytest plugin (``-p gpu_suite`` with benchmarks/ on PYTHONPATH): one JSON line per test outcome, as it
# happens, so a correctness step stopped at its deadline still reports every test that ran
# --------------------------------------------------------------------------------------------------

def pytest_runtest_logreport(report):
    path = os.environ.get("TGPQ_SUITE_TESTLOG")
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 2)}
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        rec["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")[:200]
    elif report.outcome == "failed":
        rec["message"] = (getattr(report, "longreprtext", "") or "")[-2000:]
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def cuda_present(python):
    """Whether ``python`` sees a CUDA device (asked in a subprocess: this script imports no torch)."""
    try:
        r = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True, timeout=120)
        return r.stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


def run_suite(a):
    out = os.path.abspath(a.outdir)
    budget = a.budget_min * 60
    if budget < 60:
        raise SystemExit("--budget-min: at least 1 minute")
    cpu_mode = a.dry_run or not cuda_present(sys.executable)
    s = Suite(out, budget, os.path.abspath(a.payload), sys.executable, cpu_mode, ci=a.ci, dry_run=a.dry_run, t0=START)
    print(f"GPU suite: budget {budget:.0f} s ({'CPU mode: no CUDA' if cpu_mode else 'GPU'}), OUT {out}, work {s.work}")
    for p in s.plan:
        print(f"  {p['name']:12s} until {p['deadline_s']:6.1f} s   (share {p['share']:.2f}, at least {p['least_s']:.0f} s)")
    if a.dry_run:
        return 0

    def on_signal(signum, _frame):
        raise SystemExit(f"suite stopped by {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    s.publish()
    try:
        for p in s.plan:
            name = p["name"]
            deadline = s.t0 + p["deadline_s"]
            left = deadline - time.time()
            if name == "kernels":  # timing from here on: no background build may compete
                b = s.stop_background("cuda_build", "stopped before the benchmarks (timing)")
                if b:
                    s.steps["install"]["cuda_build_end"] = b
            if left < p["least_s"]:
                s.steps[name] = dict(status="skipped", reason=f"{left:.0f} s left, needs at least {p['least_s']:.0f}")
                s.say(f"{name}: skipped ({left:.0f} s left)")
                s.publish()
                continue
            s.say(f"{name}: start, {left:.0f} s until its deadline")
            s.steps[name] = dict(status="running", started_s=round(s.elapsed(), 1))
            t = time.time()
            try:
                res = STEP_FUNCS[name](s, deadline)
            except Exception as e:  # noqa: BLE001 - a broken step must not lose the others
                import traceback
                res = dict(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            res.update(started_s=round(t - s.t0, 1), seconds=round(time.time() - t, 1), slice_s=round(left, 1))
            s.steps[name] = res
            s.say(f"{name}: {res['status']} in {res['seconds']:.0f} s" + (f" ({res['reason'][:200]})" if res.get("reason") else ""))
            s.publish()
    finally:
        s.stop_all()
        s.publish(final=True)
    doc = s.summary(True)
    print()
    print(summary_markdown(doc))
    print(compact_result(doc))  # last: the device tool returns the output's tail
    print(f"OUT: {sorted(os.listdir(out))}")
    return 0 if all(st.get("status") in ("ok", "skipped") for st in s.steps.values() if isinstance(st, dict)
                    and "status" in st) else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", help="where the returned files go (the device tool's $OUT)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help=f"total wall budget in minutes (default {DEFAULT_BUDGET_MIN}; --rehearse: 4, --ci: 2.5)")
    ap.add_argument("--payload", default=PAYLOAD, help="the prepared payload (wheels/, data/)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--rehearse", action="store_true", help="run the plan on this CPU in a fresh venv and check it")
    ap.add_argument("--ci", action="store_true", help="the short rehearsal CI runs (no C++ build, no compile)")
    ap.add_argument("--base-python", help="--rehearse: the python the image-like environment is made from")
    ap.add_argument("--image", help="--rehearse: an existing venv to use as the image-like base (packages added)")
    ap.add_argument("--ci-python", help="--ci: the python whose installed, compiled tgpq is copied")
    ap.add_argument("--prepare-data", action="store_true", help="(gpu_prepare.sh) write payload/data, check sizes")
    ap.add_argument("--train-images", type=int, default=0, help="--prepare-data: at most this many (0 = all that fit)")
    ap.add_argument("--margin-mib", type=float, default=1.0, help="--prepare-data: room kept under the 64 MiB")
    ap.add_argument("--cifar", help="--prepare-data: the CIFAR-10 folder (default: shared/assets/cifar10)")
    a = ap.parse_args(argv)
    if a.prepare_data:
        return prepare_data(a)
    if not a.outdir:
        ap.error("OUT is required")
    if a.budget_min is None:
        a.budget_min = (2.5 if a.ci else 4.0) if a.rehearse else DEFAULT_BUDGET_MIN
    return rehearse(a) if a.rehearse else run_suite(a)


if __name__ == "__main__":
    sys.exit(main())
