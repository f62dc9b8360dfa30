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
machine must, then checks that every step started, wrote its files and kept to its slice, and that OUT
fits the device tool's limits. ``--rehearse --ci`` is the part CI runs in about a minute: no C++ build
(the CI virtual environment's compiled tgpq is copied instead) and no compile.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

START = time.time()  # the budget counts from here: the suite's own start-up included
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
PAYLOAD = os.path.join(ROOT, "gpu_payload")  # benchmarks/gpu_prepare.sh fills it; ignored by git, carried
WORK = os.path.join(ROOT, "build", "gpu_suite")
DEFAULT_BUDGET_MIN = 8.5
DEVICE_TIMEOUT_S = 560  # the device call's timeout_s for the default budget: 510 s + start-up and margin
FINAL_RESERVE_S = 10.0  # kept for the last summary and archive
GRACE_S = 8.0  # SIGTERM -> SIGKILL
OUT_LIMITS = dict(files=8, file_bytes=16 << 20, total_bytes=64 << 20, depth=2)
CARRY_LIMIT = 64 << 20  # the device tool's working tree + carried paths
ARCHIVE_FILE_CAP = 4 << 20  # larger raw files are listed in the summary, not archived
TRAIN_INIT = "src/tgpq/assets/reference_unet.safetensors"
WEIGHTS_OUT = "reference_unet.safetensors"
HELDOUT_IMAGES = 500  # held-out images carried and scored there (benchmarks/train_reference.py --heldout-images)
SAMPLING_VARIANTS = ("fp16-eager", "tgpq-w8a8", "fp16-compile", "tgpq-w4a8", "tgpq-w8a8-cudagraph", "fp16-cudagraph",
                     "tgpq-w8a8-compile", "tgpq-w4a8-cudagraph")
TARGETS = {  # issue 18
    "gemm_w8a8_4096": ("W8A8 GEMM 4096^3 vs fp16 (cuBLAS)", 1.6),
    "conv3x3_b256": ("int8 3x3 conv vs cuDNN fp16 channels_last, batch 256 (time-weighted over the UNet's 3x3 convs)", 1.3),
    "e2e_vs_eager": ("end-to-end W8A8 vs fp16 eager, DDPM CIFAR-10, batch 256", 1.3),
    "e2e_vs_compile": ("end-to-end W8A8 vs fp16 + torch.compile, batch 256", 1.15),
}
# (name, share of the budget after FINAL_RESERVE_S, least seconds worth starting with); train takes the rest
STEPS = (("install", 0.20, 20.0), ("correctness", 0.17, 15.0), ("kernels", 0.14, 15.0), ("sampling", 0.33, 30.0),
         ("train", 0.16, 40.0))


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
# Running steps
# --------------------------------------------------------------------------------------------------

class Suite:
    """One run: the plan, its deadlines, the raw files under ``work`` and the published OUT."""

    def __init__(self, out, budget_s, payload, python, cpu_mode, ci=False, dry_run=False, t0=None):
        self.out, self.budget_s, self.payload, self.py = out, budget_s, payload, python
        self.cpu_mode, self.ci = cpu_mode, ci
        self.t0 = t0 or time.time()
        self.end = self.t0 + budget_s
        self.work = WORK
        self.ncpu = os.cpu_count() or 2
        self.children = {}  # pid -> what, for the signal handler
        usable = budget_s - FINAL_RESERVE_S
        scale = min(1.0, usable / (DEFAULT_BUDGET_MIN * 60 - FINAL_RESERVE_S))  # a rehearsal's tiny budget
        acc, self.plan = 0.0, []
        for name, share, least in STEPS:
            acc = usable if name == STEPS[-1][0] else acc + share * usable
            self.plan.append(dict(name=name, share=share, least_s=round(least * scale, 1), deadline_s=round(acc, 1)))
        self.steps = {p["name"]: {"status": "not started"} for p in self.plan}
        self.background = {}  # name -> (Popen, log path, started)
        self.env_info = {}
        if not dry_run:
            if os.path.isdir(self.work):
                shutil.rmtree(self.work, ignore_errors=True)
            os.makedirs(self.work, exist_ok=True)
            os.makedirs(out, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(PYTHONUNBUFFERED="1", TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_AUTOTUNING="1",
                        TRITON_CACHE_DIR=os.path.join(self.work, "triton_cache"),
                        TGPQ_CIFAR10=os.path.join(payload, "data"), MPLBACKEND="Agg",
                        PYTHONPATH=BENCH + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))

    # ---- time ----------------------------------------------------------------------------------
    def elapsed(self):
        return time.time() - self.t0

    def deadline(self, name):
        return self.t0 + next(p["deadline_s"] for p in self.plan if p["name"] == name)

    def say(self, msg):
        print(f"[{self.elapsed():6.1f} s] {msg}", flush=True)

    # ---- processes -----------------------------------------------------------------------------
    def spawn(self, argv, log, env=None, nice=0):
        os.makedirs(os.path.dirname(log), exist_ok=True)
        f = open(log, "ab")
        f.write(f"$ {' '.join(shlex.quote(a) for a in argv)}\n".encode())
        f.flush()
        pre = (lambda: os.nice(nice)) if nice else None
        p = subprocess.Popen(argv, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=pre)
        f.close()
        self.children[p.pid] = argv[:3]
        return p

    def stop(self, p, grace=GRACE_S):
        """SIGTERM the process group, then SIGKILL after ``grace`` s."""
        if p.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.children.pop(p.pid, None)
        return p.returncode

    def run(self, argv, log, deadline, env=None, nice=0):
        """Run to completion or until ``deadline`` (unix time). Returns {rc, seconds, timed_out}."""
        t = time.time()
        p = self.spawn(argv, log, env, nice)
        timed_out = False
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop(p, grace=min(GRACE_S, max(1.0, self.end - time.time())))
        self.children.pop(p.pid, None)
        return dict(rc=p.returncode, seconds=round(time.time() - t, 1), timed_out=timed_out,
                    log=os.path.relpath(log, self.work))

    def python(self, *args):
        return [self.py, *args]

    def stop_background(self, name, why):
        if name in self.background:
            p, log, t = self.background.pop(name)
            if p.poll() is None:
                self.stop(p)
                return dict(status="stopped", reason=why, seconds=round(time.time() - t, 1))
            return dict(status="ok" if p.returncode == 0 else "failed", rc=p.returncode,
                        seconds=round(time.time() - t, 1))
        return None

    def stop_all(self):
        for name in list(self.background):
            self.stop_background(name, "suite ending")
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ---- publishing OUT ------------------------------------------------------------------------
    def publish(self, final=False):
        doc = self.summary(final)
        write_atomic(os.path.join(self.out, "summary.json"), json.dumps(doc, indent=1, default=str))
        write_atomic(os.path.join(self.out, "summary.md"), summary_markdown(doc))
        tmp = os.path.join(self.out, ".logs.tar.gz.tmp")
        skipped = []
        with tarfile.open(tmp, "w:gz") as tar:
            for dirpath, dirnames, files in os.walk(self.work):
                dirnames[:] = [d for d in dirnames if d not in ("triton_cache", "ckpt", "cuda_src", "cuda_site",
                                                                "cuda_wheel")]
                for fn in sorted(files):
                    path = os.path.join(dirpath, fn)
                    if os.path.getsize(path) > ARCHIVE_FILE_CAP:
                        skipped.append(os.path.relpath(path, self.work))
                        continue
                    tar.add(path, arcname=os.path.join("gpu_suite", os.path.relpath(path, self.work)))
        os.replace(tmp, os.path.join(self.out, "logs.tar.gz"))
        if skipped:
            self.steps.setdefault("_archive", {})["left_out"] = skipped

    def summary(self, final):
        return dict(
            suite=dict(command=" ".join(shlex.quote(a) for a in sys.argv), started=time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0)), written=now_iso(), elapsed_s=round(self.elapsed(), 1),
                budget_s=self.budget_s, final=final, mode="cpu (no CUDA)" if self.cpu_mode else "gpu",
                git_commit=git_commit(), python=self.py, host_cpus=self.ncpu),
            env=self.env_info, plan=self.plan, steps=self.steps, targets=evaluate_targets(self.steps, self.cpu_mode))


def write_atomic(path, text):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def git_commit():
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or "unknown (no git)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def read_tagged_json(path, tag):
    """The JSON of every ``TAG {...}`` line of a log."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith(tag + " "):
                    try:
                        out.append(json.loads(line[len(tag) + 1:]))
                    except json.JSONDecodeError:
                        pass
    except OSError:
        pass
    return out


def log_tail(path, n=1500):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------

ENV_PROBE = r"""
import json, os, platform, shutil, subprocess, sys
info = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
        "nvcc": shutil.which("nvcc"), "nvidia_smi": shutil.which("nvidia-smi")}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:
    info["torch_error"] = repr(e)[:300]
for mod in ("triton", "numpy", "safetensors", "huggingface_hub"):  # diffusers, tgpq: the import check, after install
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = None
if info["nvcc"]:
    info["nvcc_version"] = subprocess.run([info["nvcc"], "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
if info["nvidia_smi"]:
    info["nvidia_smi_L"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
print("ENV " + json.dumps(info))
"""

IMPORT_CHECK = r"""
import json
import torch, diffusers, importlib_metadata, tgpq
from tgpq.backends import library
print("IMPORTS " + json.dumps({"tgpq": tgpq.__file__, "extension": library.has_extension(),
                               "diffusers": diffusers.__version__, "qlinear_op": hasattr(torch.ops.tgpq, "qlinear")}))
"""


def step_install(s: Suite, deadline):
    d = os.path.join(s.work, "install")
    res = {}
    probe = s.spawn(s.python("-c", ENV_PROBE), os.path.join(d, "env.log"))  # versions, device: read below

    def read_probe():
        try:
            probe.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            s.stop(probe)
        s.children.pop(probe.pid, None)
        env = read_tagged_json(os.path.join(d, "env.log"), "ENV")
        s.env_info = env[0] if env else {"error": log_tail(os.path.join(d, "env.log"), 500)}

    # 1. the carried wheels
    wheels = sorted(glob.glob(os.path.join(s.payload, "wheels", "*.whl")))
    if not wheels:
        read_probe()
        return dict(status="failed", reason=f"no wheels in {s.payload}/wheels: run benchmarks/gpu_prepare.sh first", **res)
    pip = s.python("-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check")
    r = s.run(pip + wheels, os.path.join(d, "wheels.log"), deadline)
    res["wheels"] = dict(r, files=[os.path.basename(w) for w in wheels])
    # 2. compile every Triton specialization ahead, in parallel, while the extension builds
    workers = 1 if s.cpu_mode else max(2, min(12, s.ncpu // 2))
    pre = s.python(os.path.join(BENCH, "bench_kernels.py"), "--precompile", "--world", str(workers))
    if s.cpu_mode:
        pre += ["--fake-target", "sm_90"] + (["--count"] if s.ci else ["--max-compiles", "1"])
    procs = [(s.spawn(pre + ["--rank", str(i)], os.path.join(d, f"precompile-{i}.log"), nice=5), i)
             for i in range(workers)]
    t_pre = time.time()
    # 3. the extension's CPU part (the triton backend needs no CUDA part), timed
    build_env = dict(s.env, TGPQ_NO_CUDA="1", MAX_JOBS=str(s.ncpu))
    if s.ci:
        res["build"] = dict(status="skipped", reason="--ci: tgpq copied from the CI environment (built there by "
                            "the README install); the full rehearsal builds it")
        r = s.run(s.python("-c", COPY_INSTALLED_TGPQ), os.path.join(d, "build.log"), deadline)
        res["build"].update(copy_rc=r["rc"])
    else:
        r = s.run(s.python("-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile",
                           "--disable-pip-version-check", "-v", "."), os.path.join(d, "build.log"), deadline, env=build_env)
        res["build"] = dict(r, what="pip install --no-index --no-deps --no-build-isolation . (TGPQ_NO_CUDA=1, "
                            f"MAX_JOBS={s.ncpu})")
    # 4. imports
    r = s.run(s.python("-c", IMPORT_CHECK), os.path.join(d, "imports.log"), deadline)
    imports = read_tagged_json(os.path.join(d, "imports.log"), "IMPORTS")
    res["imports"] = imports[0] if imports else {"error": log_tail(os.path.join(d, "imports.log"), 800)}
    # 5. the precompile workers: until they finish or the step's deadline
    stats = []
    for p, i in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            s.stop(p)
        s.children.pop(p.pid, None)
        stats += read_tagged_json(os.path.join(d, f"precompile-{i}.log"), "PRECOMPILE")
    res["precompile"] = dict(workers=workers, seconds=round(time.time() - t_pre, 1), finished=len(stats),
                             distinct_compiles=max((x["distinct_compiles"] for x in stats), default=None),
                             compiled=sum(x["compiled"] for x in stats), errors=sum(x["n_errors"] for x in stats),
                             target=stats[0]["target"] if stats else None)
    read_probe()
    # 6. the extension's CUDA part, in the background (a separate copy, so the installed CPU build stays)
    nvcc, tcuda = s.env_info.get("nvcc"), s.env_info.get("torch_cuda")
    if not s.cpu_mode and nvcc and tcuda and res["build"].get("rc") == 0:
        src = os.path.join(s.work, "cuda_src")
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "gpu_payload", ".git", "*.egg-info", ".venv*",
                                                                 "__pycache__"))
        cenv = dict(s.env, MAX_JOBS=str(max(1, s.ncpu // 2)))
        cenv.pop("TGPQ_NO_CUDA", None)
        p = s.spawn(s.python("-m", "pip", "wheel", "--no-index", "--no-deps", "--no-build-isolation", "-w",
                             os.path.join(s.work, "cuda_wheel"), src), os.path.join(d, "cuda_build.log"), env=cenv, nice=10)
        s.background["cuda_build"] = (p, os.path.join(d, "cuda_build.log"), time.time())
        res["cuda_build"] = dict(status="started in the background", max_jobs=max(1, s.ncpu // 2))
    else:
        res["cuda_build"] = dict(status="skipped", reason="no CUDA toolkit / CUDA torch here" if s.cpu_mode or not
                                 (nvcc and tcuda) else "the CPU build failed")
    ok = res["wheels"]["rc"] == 0 and res["imports"].get("extension") is True
    return dict(status="ok" if ok else "failed", reason=None if ok else "see wheels / build / imports", **res)


COPY_INSTALLED_TGPQ = r"""
# --ci only: copy the compiled tgpq of the environment named by TGPQ_CI_PYTHON into this one
import os, shutil, subprocess, sys, sysconfig
src, kern = subprocess.run([os.environ["TGPQ_CI_PYTHON"], "-c", "import os, tgpq, tgpq.kernels as k; "
                           "print(os.path.dirname(tgpq.__file__)); print(os.path.dirname(k.__file__))"],
                          capture_output=True, text=True, check=True).stdout.split()
dst = os.path.join(sysconfig.get_paths()["purelib"], "tgpq")
skip = shutil.ignore_patterns("__pycache__")
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=skip)
shutil.copytree(kern, os.path.join(dst, "kernels"), dirs_exist_ok=True, ignore=skip)  # an editable install maps it
print("copied", src, "and", kern, "->", dst)
"""


def parse_testlog(path):
    recs = []
    try:
        with open(path) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        pass
    counts = {}
    for r in recs:
        key = "error" if r["outcome"] == "failed" and r["when"] != "call" else r["outcome"]
        counts[key] = counts.get(key, 0) + 1
    failures = [dict(test=r["nodeid"], message=r.get("message", "")[-600:]) for r in recs if r["outcome"] == "failed"]
    reasons = {}
    for r in recs:
        if r["outcome"] == "skipped":
            reasons[r.get("reason", "?")] = reasons.get(r.get("reason", "?"), 0) + 1
    return dict(counts=counts, failures=failures, skip_reasons=reasons)


def step_correctness(s: Suite, deadline):
    d = os.path.join(s.work, "correctness")
    log = os.path.join(d, "tests.jsonl")
    env = dict(s.env, TGPQ_SUITE_TESTLOG=log)
    res = {}
    # the GPU tests, most important first: backends on the converted UNet, then every kernel path
    argv = s.python("-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "gpu_suite", "-m", "gpu",
                    "tests/test_gpu_backends.py", "tests/test_triton_kernels.py")
    if s.cpu_mode:  # the cpu-ISA test runs in the CPU test suite anyway; here only the GPU tests' skips count
        argv += ["--deselect", "tests/test_gpu_backends.py::test_cpu_backend_every_isa_matches_reference"]
    building = "cuda_build" in s.background  # the CUDA ops' test needs ~15 s at the end, if their build finishes
    res["gpu_tests"] = s.run(argv, os.path.join(d, "pytest_gpu.log"), deadline - (15.0 if building else 0.0), env=env)
    if s.cpu_mode:  # what the GPU tests cannot show here: the kernels' numerics in the interpreter
        res["interpreter_tests"] = s.run(
            s.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_suite", "tests/test_triton_kernels.py",
                     "-k", "nan or exact_ties"), os.path.join(d, "pytest_interpreter.log"), deadline, env=env)
    # the CUDA ops, if their background build is done by now
    if building:
        try:
            s.background["cuda_build"][0].wait(timeout=max(0.0, deadline - 12.0 - time.time()))
        except subprocess.TimeoutExpired:
            pass
        b = s.stop_background("cuda_build", "not finished within the correctness step")
        res["cuda_build"] = b
        wheels = glob.glob(os.path.join(s.work, "cuda_wheel", "tgpq-*.whl"))
        if b["status"] == "ok" and wheels and deadline - time.time() < 8.0:
            res["cuda_ops_tests"] = dict(status="not run", reason=f"{deadline - time.time():.0f} s left")
        elif b["status"] == "ok" and wheels:
            site = os.path.join(s.work, "cuda_site")
            s.run(s.python("-m", "pip", "install", "--no-index", "--no-deps", "--target", site, wheels[0]),
                  os.path.join(d, "cuda_install.log"), deadline)
            cenv = dict(env, PYTHONPATH=site + os.pathsep + env["PYTHONPATH"])
            res["cuda_ops_tests"] = s.run(s.python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_suite",
                                                   "-m", "gpu", "tests/test_cuda_sources.py"),
                                          os.path.join(d, "pytest_cuda_ops.log"), deadline, env=cenv)
            s.cuda_site = site
    res["tests"] = parse_testlog(log)
    c = res["tests"]["counts"]
    bad = c.get("failed", 0) + c.get("error", 0)
    timed_out = any(v.get("timed_out") for v in res.values() if isinstance(v, dict))
    status = "failed" if bad else "timeout" if timed_out else "ok"
    return dict(status=status, reason=f"{bad} failing tests" if bad else None, **res)


def step_kernels(s: Suite, deadline):
    d = os.path.join(s.work, "kernels")
    js, md = os.path.join(d, "kernels.json"), os.path.join(d, "kernels.md")
    argv = s.python(os.path.join(BENCH, "bench_kernels.py"), "--json", js, "--md", md)
    argv += ["--tiny"] if s.cpu_mode else ["--suite", "--deadline-s", str(max(5.0, deadline - time.time() - 25.0))]
    env = dict(s.env)
    if getattr(s, "cuda_site", None):  # the CUDA-built extension: the int_mm_cudaquant rows
        env["PYTHONPATH"] = s.cuda_site + os.pathsep + env["PYTHONPATH"]
    r = s.run(argv, os.path.join(d, "bench_kernels.log"), deadline, env=env)
    doc = load_json(js)
    res = dict(run=r, rows=len(doc.get("rows", [])), skipped=len(doc.get("meta", {}).get("skipped", [])),
               peaks=doc.get("meta", {}).get("peaks"), table=kernel_rows(doc))
    status = "ok" if r["rc"] == 0 and doc else "timeout" if r["timed_out"] else "failed"
    return dict(status=status, reason=None if status == "ok" else log_tail(os.path.join(d, "bench_kernels.log"), 600),
                **res)


def step_sampling(s: Suite, deadline):
    d = os.path.join(s.work, "sampling")
    left = deadline - time.time()
    argv = s.python(os.path.join(BENCH, "bench_sampling.py"), "--out", d, "--tag", "suite")
    if s.cpu_mode:
        argv += ["--cpu", "--models", "tiny-ddpm", "--batches", "1", "--steps", "2", "--repeats", "1", "--warmup", "1",
                 "--max-seconds", "2", "--threads", "1", "--variants", "fp32-eager", "tgpq-w8a8-cpu", "tgpq-w4a8-cpu",
                 "--total-seconds", str(max(5.0, left - 20.0))]
    else:
        variants = list(SAMPLING_VARIANTS)
        if glob.glob(os.path.join(s.payload, "wheels", "torchao-*.whl")):
            variants.append("torchao-int8dq-compile")
        # the profile of the W8A8 run (where the time goes) needs ~15 s after the last cell
        argv += ["--models", "ddpm-cifar10", "--batches", "256", "64", "--steps", "20", "--repeats", "3",
                 "--warmup", "2", "--max-seconds", "3", "--total-seconds", str(max(10.0, left - 45.0)),
                 "--compile-reserve-s", "60", "--profile-batch", "256", "--variants", *variants]
    r = s.run(argv, os.path.join(d, "bench_sampling.log"), deadline)
    js = sorted(glob.glob(os.path.join(d, "sampling-*.json")))
    doc = load_json(js[-1]) if js else {}
    cells = [{k: c.get(k) for k in ("model", "batch", "variant", "status", "s_per_image", "images_per_s",
                                     "speedup_vs_baseline", "peak_mem_bytes", "weight_bytes", "warmup_s", "extrapolated",
                                     "error")} for c in doc.get("results", [])]
    prof = [{"batch": p.get("batch"), "variant": p.get("variant"), "top": p.get("top", [])[:12]}
            for p in doc.get("profiles", [])]
    ok_cells = sum(c["status"] == "ok" for c in cells)
    status = "ok" if r["rc"] == 0 and ok_cells else "timeout" if r["timed_out"] else "failed"
    return dict(status=status, reason=None if status == "ok" else log_tail(os.path.join(d, "bench_sampling.log"), 600),
                run=r, steps=doc.get("steps"), cells=cells, profiles=prof)


def step_train(s: Suite, deadline):
    d = os.path.join(s.work, "train")
    ckpt = os.path.join(d, "ckpt")
    weights = os.path.join(s.out, WEIGHTS_OUT)
    threads = str(max(1, s.ncpu - 2))
    export_reserve = 25.0 if s.cpu_mode else 35.0
    # the committed model's held-out loss on the same images, meanwhile on the CPU
    base = s.spawn(s.python(os.path.join(BENCH, "train_reference.py"), "--eval", os.path.join(ROOT, TRAIN_INIT),
                            "--heldout-images", str(20 if s.cpu_mode else HELDOUT_IMAGES), "--threads", "2"),
                   os.path.join(d, "baseline_eval.log"), nice=5)
    argv = s.python(os.path.join(BENCH, "train_reference.py"), "--init-from", os.path.join(ROOT, TRAIN_INIT),
                    "--ckpt", ckpt, "--save-every-min", "1", "--log-every-min", "0.25",
                    "--stop-at", f"{deadline - export_reserve:.1f}", "--ema-decay", "0.999")
    if s.cpu_mode:
        argv += ["--device", "cpu", "--batch-size", "4", "--max-steps", "2", "--threads", "1", "--warmup", "1"]
    else:
        argv += ["--device", "cuda", "--batch-size", "128", "--lr", "2e-4", "--warmup", "100", "--threads", "4"]
    r = s.run(argv, os.path.join(d, "train.log"), deadline - export_reserve + GRACE_S)
    run = read_tagged_json(os.path.join(d, "train.log"), "TRAIN_RUN")
    res = dict(run=r, train=run[-1] if run else None)
    if not os.path.isfile(os.path.join(ckpt, "state.pt")):
        s.stop(base)
        return dict(status="failed", reason="no checkpoint written: " + log_tail(os.path.join(d, "train.log"), 600), **res)
    dev = s.env_info.get("device", "cpu")
    note = (f"GPU suite run (benchmarks/gpu_suite.py, {now_iso()[:10]}): resumed from the committed weights "
            f"({TRAIN_INIT}) on {dev}; batch {128 if not s.cpu_mode else 4}, lr 2e-4, bf16 autocast, EMA 0.999; the "
            f"held-out loss here uses {HELDOUT_IMAGES} of the usual 2000 images (see the GPU suite's summary for the "
            f"committed model's loss on the same images).")
    r2 = s.run(s.python(os.path.join(BENCH, "train_reference.py"), "--export", "--ckpt", ckpt, "--out", weights,
                        "--heldout-images", str(20 if s.cpu_mode else HELDOUT_IMAGES), "--threads", threads,
                        "--note", note), os.path.join(d, "export.log"), deadline)
    ex = read_tagged_json(os.path.join(d, "export.log"), "HELDOUT")
    try:
        base.wait(timeout=max(0.0, min(10.0, s.end - FINAL_RESERVE_S - time.time())))
    except subprocess.TimeoutExpired:
        pass
    s.stop(base)
    b = read_tagged_json(os.path.join(d, "baseline_eval.log"), "HELDOUT")
    res.update(export=r2, heldout=ex[-1] if ex else None, heldout_committed=b[-1] if b else None,
               weights=dict(file=WEIGHTS_OUT, bytes=os.path.getsize(weights)) if os.path.isfile(weights) else None)
    status = "ok" if ex and res["weights"] else "failed"
    return dict(status=status, reason=None if ex else log_tail(os.path.join(d, "export.log"), 600), **res)


STEP_FUNCS = {"install": step_install, "correctness": step_correctness, "kernels": step_kernels,
              "sampling": step_sampling, "train": step_train}


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def kernel_rows(doc):
    """Per shape: each variant's ms and its speed-up over torch_fp16."""
    out = {}
    for r in doc.get("rows", []):
        key = r["kind"] + " " + ",".join(f"{k}={v}" for k, v in r["shape"].items())
        out.setdefault(key, {})[r["variant"]] = r.get("ms") if "error" not in r else None
        if "max_rel_err" in r:
            out[key][r["variant"] + ":err"] = r["max_rel_err"]
    return out


# --------------------------------------------------------------------------------------------------
# Targets and the markdown summary
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Rehearsal on the CPU
# --------------------------------------------------------------------------------------------------

REHEARSE = os.path.join(ROOT, "build", "rehearse")
# The GPU image's packages this project touches (KINDS.md of the device tool: python 3.12, torch 2.11.0+cu130,
# triton 3.6.0, numpy 2.5, safetensors 0.8.0, huggingface_hub 1.33.0, pytest, matplotlib, tqdm, scipy, Pillow,
# requests, regex, filelock, zipp, setuptools, wheel, ninja, pybind11); torch is this machine's CPU wheel.
# numpy < 2.4: triton 3.6's interpreter (the rehearsal's stand-in for the GPU tests) calls int() on one-element
# arrays, an error from numpy 2.4 on; the GPU image's numpy 2.5.2 never meets the interpreter there.
IMAGE_PACKAGES = ("torch==2.13.0", "triton==3.6.0", "numpy<2.4", "safetensors==0.8.0", "huggingface-hub==1.33.0", "pytest",
                  "matplotlib", "tqdm", "scipy", "pillow", "requests", "regex", "filelock", "zipp", "setuptools",
                  "wheel", "ninja", "pybind11", "packaging")


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def site_packages(python):
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def ensure_image(base_python, image=None):
    """The image-like base environment: ``image`` (an existing venv, e.g. CI's triton 3.6 one) or
    ``build/rehearse/image`` (made once), with IMAGE_PACKAGES installed; returns its python."""
    image = image or os.path.join(REHEARSE, "image")
    marker = os.path.join(image, "tgpq-image.json")
    want = json.dumps(dict(packages=IMAGE_PACKAGES))
    if os.path.isfile(marker) and open(marker).read() == want:
        return venv_python(image)
    print(f"rehearsal: installing the GPU image's packages into {image}", flush=True)
    if not os.path.isfile(venv_python(image)):
        subprocess.run([base_python, "-m", "venv", image], check=True)
    subprocess.run([venv_python(image), "-m", "pip", "install", "-q", "--disable-pip-version-check", *IMAGE_PACKAGES],
                   check=True)
    with open(marker, "w") as f:
        f.write(want)
    return venv_python(image)


def fresh_venv(image_python):
    """A new virtual environment that sees the image's packages (a .pth file) and installs into its own."""
    venv = os.path.join(REHEARSE, "venv")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([image_python, "-m", "venv", venv], check=True)
    with open(os.path.join(site_packages(venv_python(venv)), "_gpu_image.pth"), "w") as f:
        f.write(site_packages(image_python) + "\n")
    return venv_python(venv)


def check_out(out, summary):
    """The device tool's limits on OUT and the rehearsal's expectations; returns a list of problems."""
    problems = []
    files = []
    for dirpath, _, fns in os.walk(out):
        for fn in fns:
            rel = os.path.relpath(os.path.join(dirpath, fn), out)
            files.append(rel)
            if rel.count(os.sep) > OUT_LIMITS["depth"]:
                problems.append(f"{rel}: deeper than {OUT_LIMITS['depth']} folders")
            if not re.fullmatch(r"[A-Za-z0-9._-]+", fn):
                problems.append(f"{rel}: a name the device tool does not return")
            if os.path.getsize(os.path.join(out, rel)) > OUT_LIMITS["file_bytes"]:
                problems.append(f"{rel}: over 16 MiB")
    if len(files) > OUT_LIMITS["files"]:
        problems.append(f"{len(files)} files in OUT (at most {OUT_LIMITS['files']}): {sorted(files)}")
    total = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    if total > OUT_LIMITS["total_bytes"]:
        problems.append(f"OUT holds {total} bytes (at most 64 MiB)")
    for f in ("summary.json", "summary.md", "logs.tar.gz", WEIGHTS_OUT, "reference_unet.json", "reference_unet.md"):
        if f not in files:
            problems.append(f"{f} missing from OUT")
    expect = {"install": ["install/wheels.log", "install/build.log", "install/imports.log", "install/precompile-0.log"],
              "correctness": ["correctness/pytest_gpu.log", "correctness/tests.jsonl"],
              "kernels": ["kernels/kernels.json", "kernels/kernels.md"],
              "sampling": ["sampling/bench_sampling.log"], "train": ["train/train.log", "train/export.log"]}
    try:
        with tarfile.open(os.path.join(out, "logs.tar.gz")) as tar:
            members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    except (OSError, tarfile.TarError) as e:
        members = set()
        problems.append(f"logs.tar.gz unreadable: {e}")
    for p in summary.get("plan", []):
        st = summary["steps"].get(p["name"], {})
        if st.get("status") != "ok":
            problems.append(f"step {p['name']}: {st.get('status')} ({(st.get('reason') or '')[:200]})")
        if st.get("seconds") is not None and st["seconds"] > st.get("slice_s", 0) + GRACE_S + 5:
            problems.append(f"step {p['name']}: {st['seconds']} s, its slice was {st.get('slice_s')} s")
        for f in expect.get(p["name"], []):
            if f not in members:
                problems.append(f"step {p['name']}: {f} not written")
    if summary["suite"]["elapsed_s"] > summary["suite"]["budget_s"] + GRACE_S:
        problems.append(f"the suite took {summary['suite']['elapsed_s']} s of its {summary['suite']['budget_s']} s")
    return problems


def rehearse(a):
    out = os.path.abspath(a.outdir)
    payload = os.path.abspath(a.payload)
    if not glob.glob(os.path.join(payload, "wheels", "*.whl")) or not os.path.isdir(os.path.join(payload, "data")):
        raise SystemExit(f"{payload}: no payload: run benchmarks/gpu_prepare.sh first")
    t0 = time.time()
    image = ensure_image(a.base_python or sys.executable, a.image and os.path.abspath(a.image))
    t_image = time.time() - t0
    py = fresh_venv(image)
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONNOUSERSITE="1")
    argv = [py, os.path.abspath(__file__), out, "--budget-min", str(a.budget_min), "--payload", payload]
    if a.ci:
        argv.append("--ci")
        env["TGPQ_CI_PYTHON"] = a.ci_python or sys.executable
    print(f"rehearsal: image ready in {t_image:.0f} s; fresh venv {os.path.dirname(os.path.dirname(py))}; "
          f"running {' '.join(argv[1:])}", flush=True)
    t1 = time.time()
    r = subprocess.run(argv, cwd=ROOT, env=env)
    wall = time.time() - t1
    summary = load_json(os.path.join(out, "summary.json"))
    problems = check_out(out, summary) if summary else ["no summary.json written"]
    print("\nrehearsal check:")
    for p in summary.get("plan", []):
        st = summary["steps"].get(p["name"], {})
        print(f"  {p['name']:12s} {st.get('status', '?'):12s} {st.get('seconds', '-')!s:>6} s of {st.get('slice_s', '-')!s:>6} s")
    print(f"  suite wall {wall:.0f} s (budget {a.budget_min * 60:.0f} s), exit {r.returncode}; OUT: "
          f"{sorted(os.listdir(out)) if os.path.isdir(out) else '-'}")
    for p in problems:
        print("  PROBLEM:", p)
    print("rehearsal:", "passed" if not problems else f"{len(problems)} problems")
    return 0 if not problems else 1


# --------------------------------------------------------------------------------------------------
# Preparing the payload (benchmarks/gpu_prepare.sh calls this after downloading the wheels)
# --------------------------------------------------------------------------------------------------

def travelling_bytes():
    """Bytes of the checkout that the device tool sends: tracked and untracked-not-ignored files."""
    r = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True)
    total = 0
    for rel in r.stdout.decode().split("\0"):
        p = os.path.join(ROOT, rel)
        if rel and os.path.isfile(p) and not os.path.islink(p):
            total += os.path.getsize(p)
    return total


def prepare_data(a):
    """Write ``payload/data``: the held-out test images and as much of the CIFAR-10 training set (JPEG bytes,
    the original file's format) as fits the device tool's 64 MiB beside the checkout and the wheels."""
    import numpy as np

    sys.path.insert(0, BENCH)
    from tgpq.eval.cifar10 import default_cifar_root
    from train_reference import HELDOUT_FILE, write_heldout

    payload = os.path.abspath(a.payload)
    data = os.path.join(payload, "data")
    os.makedirs(data, exist_ok=True)
    src = a.cifar or str(default_cifar_root())
    os.environ["TGPQ_CIFAR10"] = src
    write_heldout(os.path.join(data, HELDOUT_FILE), HELDOUT_IMAGES)
    wheels = sum(os.path.getsize(w) for w in glob.glob(os.path.join(payload, "wheels", "*.whl")))
    tree = travelling_bytes()
    heldout = os.path.getsize(os.path.join(data, HELDOUT_FILE))
    room = CARRY_LIMIT - a.margin_mib * (1 << 20) - tree - wheels - heldout
    with np.load(os.path.join(src, "train_jpeg.npz"), allow_pickle=False) as f:
        jpeg, offsets, labels, classes = f["data"], f["offsets"], f["labels"], f["classes"]
    n = len(labels)
    sizes = np.diff(offsets)
    order = np.random.default_rng(0).permutation(n)  # the file is ordered by class: a seeded subset
    fixed = 4096 + 10 * 64  # npz headers, labels / offsets per image below, class names
    cum = np.cumsum(sizes[order] + 8 + 1)
    fit = int(np.searchsorted(cum, room - fixed, side="right"))
    take = min(n, fit, a.train_images or n)
    if take < 1000:
        raise SystemExit(f"only {take} training images fit ({room} bytes left beside the checkout {tree} B, wheels "
                         f"{wheels} B and the held-out set {heldout} B): carry less")
    keep = np.sort(order[:take])
    parts = [jpeg[offsets[i]:offsets[i + 1]] for i in keep]
    new_off = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(offsets.dtype)
    np.savez(os.path.join(data, "train_jpeg.npz"), data=np.concatenate(parts), offsets=new_off, labels=labels[keep],
             classes=classes)
    sizes_out = {f: os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)}
    total = tree + wheels + sum(sizes_out.values())
    doc = dict(checkout_bytes=tree, wheels_bytes=wheels, data=sizes_out, train_images=int(take), train_images_all=int(n),
               heldout_images=HELDOUT_IMAGES, total_bytes=total, limit_bytes=CARRY_LIMIT,
               margin_bytes=CARRY_LIMIT - total)
    with open(os.path.join(payload, "payload.json"), "w") as f:
        json.dump(doc, f, indent=1)
    mib = 1 << 20
    print(f"payload: checkout {tree / mib:.1f} MiB + wheels {wheels / mib:.1f} MiB + data "
          f"{sum(sizes_out.values()) / mib:.1f} MiB ({take} of {n} training images, {HELDOUT_IMAGES} held-out) = "
          f"{total / mib:.1f} MiB of {CARRY_LIMIT / mib:.0f} MiB ({(CARRY_LIMIT - total) / mib:.1f} MiB spare)")
    rel = os.path.relpath(payload, ROOT)
    print(f"\nOn the GPU machine (device tool `run`): carry [\"{rel}\"], timeout_s {DEVICE_TIMEOUT_S}, command:\n"
          f"  PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py \"$OUT\" --payload {rel}\n"
          f"then commit the returned files under benchmarks/results/h200-<date>/.")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", help="where the returned files go (the device tool's $OUT)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help=f"total wall budget in minutes (default {DEFAULT_BUDGET_MIN}; --rehearse: 4, --ci: 1.5)")
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
        a.budget_min = (1.5 if a.ci else 4.0) if a.rehearse else DEFAULT_BUDGET_MIN
    return rehearse(a) if a.rehearse else run_suite(a)


if __name__ == "__main__":
    sys.exit(main())
