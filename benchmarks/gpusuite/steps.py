"""The suite's five steps (install, correctness, kernels, sampling, train): each runs its subprocesses until
its deadline and returns its results for summary.json. See benchmarks/gpu_suite.py."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time

from .core import (BENCH, FINAL_RESERVE_S, GRACE_S, HELDOUT_IMAGES, ROOT, SAMPLING_VARIANTS, TRAIN_INIT,
                   WEIGHTS_OUT, Suite, load_json, log_tail, now_iso, read_tagged_json)
from .report import kernel_rows

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
    built = s.ci or res["build"].get("rc") == 0  # --ci copies the compiled package instead
    ok = res["wheels"]["rc"] == 0 and built and res["imports"].get("extension") is True
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
                     "-k", "exact_ties" if s.ci else "nan or exact_ties"), os.path.join(d, "pytest_interpreter.log"),
            deadline, env=env)
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
                 "--max-seconds", "2", "--threads", "1", "--variants", "fp32-eager", "tgpq-w8a8-cpu",
                 *([] if s.ci else ["tgpq-w4a8-cpu"]),
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
        argv += ["--device", "cpu", "--batch-size", "4", "--steps", "2", "--threads", "1", "--warmup", "1"]
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


