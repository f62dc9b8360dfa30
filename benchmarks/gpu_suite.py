#!/usr/bin/env python3
"""One command for the rare GPU machine: every GPU check and measurement, each step time-bounded.

    python benchmarks/gpu_suite.py OUTDIR [--dry-run] [--max-minutes-per-step N] [--train-minutes N]

Expected setup (no package registry there): torch 2.11 + triton 3.6 already installed, then
``pip install --no-build-isolation --no-deps .`` from the repository root (the suite runs the
in-tree sources either way: it puts the repository root first on PYTHONPATH).

Steps (each a subprocess with a timeout; stdout+stderr to OUTDIR/<step>.log):

1. ``env``: nvidia-smi, torch/triton/CUDA versions, device properties.
2. ``pytest_gpu``: the GPU tests (``-m gpu``: kernels at full size vs the int32 reference, and
   every backend vs ``reference`` on the device where other test files mark them so).
3. ``bench_kernels``: benchmarks/bench_kernels.py --out OUTDIR.
4. ``compile_report``: benchmarks/compile_report.py --json/--md into OUTDIR (checks this
   machine's triton version too).
5. ``bench_sampling``: benchmarks/bench_sampling.py --device cuda --out OUTDIR, if the script exists.
6. ``train_reference``: benchmarks/train_reference.py --device cuda --max-minutes N (resumes its
   checkpoint), if the script exists.

``--dry-run`` lists the steps (and writes OUTDIR/plan.json) without running anything; it works on
any machine. At the end OUTDIR/suite.json records each step's command, return code and duration.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

ENV_SNIPPET = (
    "import subprocess; subprocess.run(['nvidia-smi']) if __import__('shutil').which('nvidia-smi') else None; "
    "import torch, triton, platform; print('python', platform.python_version()); "
    "print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); "
    "print('cuda available', torch.cuda.is_available()); "
    "[print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i)) "
    "for i in range(torch.cuda.device_count())]"
)


def steps(outdir: str, minutes: float, train_minutes: float):
    """The suite's steps: name, argv, timeout (s), and whether the script it needs exists."""
    bench = os.path.join(ROOT, "benchmarks")
    t = int(minutes * 60)
    out = [
        dict(name="env", argv=[PY, "-c", ENV_SNIPPET], timeout_s=120),
        dict(name="pytest_gpu", argv=[PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                      f"--junitxml={os.path.join(outdir, 'pytest_gpu.xml')}", "tests"], timeout_s=t),
        dict(name="bench_kernels", argv=[PY, os.path.join(bench, "bench_kernels.py"), "--out", outdir], timeout_s=t),
        dict(name="compile_report", argv=[PY, os.path.join(bench, "compile_report.py"), "--json",
                                          os.path.join(outdir, "compile_report.json"), "--md",
                                          os.path.join(outdir, "compile_report.md")], timeout_s=t),
        dict(name="bench_sampling", argv=[PY, os.path.join(bench, "bench_sampling.py"), "--device", "cuda",
                                          "--out", outdir], timeout_s=t,
             needs=os.path.join(bench, "bench_sampling.py")),
        dict(name="train_reference", argv=[PY, os.path.join(bench, "train_reference.py"), "--device", "cuda",
                                           "--max-minutes", str(train_minutes)],
             timeout_s=int(train_minutes * 60) + 300, needs=os.path.join(bench, "train_reference.py")),
    ]
    for s in out:
        s["available"] = os.path.exists(s["needs"]) if "needs" in s else True
    return out


def run_step(step, outdir, env) -> dict:
    log_path = os.path.join(outdir, f"{step['name']}.log")
    rec = dict(name=step["name"], cmd=" ".join(map(shlex.quote, step["argv"])), timeout_s=step["timeout_s"])
    if not step["available"]:
        rec.update(status="skipped", reason=f"{os.path.relpath(step['needs'], ROOT)} does not exist")
        print(f"[skip] {step['name']}: {rec['reason']}", flush=True)
        return rec
    print(f"[run ] {step['name']} (timeout {step['timeout_s']} s): {rec['cmd']}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            p = subprocess.run(step["argv"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               timeout=step["timeout_s"])
            rec.update(status="ok" if p.returncode == 0 else "failed", returncode=p.returncode)
        except subprocess.TimeoutExpired:
            rec.update(status="timeout")
    rec["seconds"] = round(time.time() - t0, 1)
    rec["log"] = os.path.basename(log_path)
    with open(log_path) as f:
        tail = f.read()[-1500:]
    print(f"[{rec['status']}] {step['name']} in {rec['seconds']} s\n{tail}", flush=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", help="folder for every result and log (e.g. benchmarks/results/h100-<date>)")
    ap.add_argument("--dry-run", action="store_true", help="list the steps, run nothing")
    ap.add_argument("--max-minutes-per-step", type=float, default=8.0)
    ap.add_argument("--train-minutes", type=float, default=5.0, help="GPU training budget for train_reference")
    ap.add_argument("--skip", default="", help="comma-separated step names to leave out")
    a = ap.parse_args(argv)
    outdir = os.path.abspath(a.outdir)
    os.makedirs(outdir, exist_ok=True)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    plan = [s for s in steps(outdir, a.max_minutes_per_step, a.train_minutes) if s["name"] not in skip]
    with open(os.path.join(outdir, "plan.json"), "w") as f:
        json.dump(dict(steps=[{k: v for k, v in s.items()} for s in plan]), f, indent=1)
    for s in plan:
        flag = "" if s["available"] else "  (skipped: script missing)"
        print(f"{s['name']:16s} timeout {s['timeout_s']:5d} s  {' '.join(map(shlex.quote, s['argv']))}{flag}")
    if a.dry_run:
        return 0
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    records = [run_step(s, outdir, env) for s in plan]
    with open(os.path.join(outdir, "suite.json"), "w") as f:
        json.dump(dict(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), steps=records), f, indent=1)
    print("\nsummary:")
    for r in records:
        print(f"  {r['name']:16s} {r['status']:8s} {r.get('seconds', '')}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
