"""The rehearsal on the CPU (``gpu_suite.py --rehearse``) and the payload's data (``--prepare-data``, called by
benchmarks/gpu_prepare.sh). See benchmarks/gpu_suite.py."""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

from .core import (BENCH, CARRY_LIMIT, DEVICE_TIMEOUT_S, GRACE_S, HELDOUT_IMAGES, OUT_LIMITS, ROOT, WEIGHTS_OUT,
                   load_json)

ENTRY = os.path.join(BENCH, "gpu_suite.py")
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


def work_done(steps):
    """Problems where a step reported ok without doing its work: no interpreter test passed, no kernel row,
    no sampling cell, no training step or held-out loss."""
    out = []
    cor = steps.get("correctness", {})
    counts = (cor.get("tests") or {}).get("counts", {})
    if cor.get("status") == "ok" and not counts.get("passed"):
        out.append(f"step correctness: no test passed ({counts})")
    if steps.get("kernels", {}).get("status") == "ok" and not steps["kernels"].get("rows"):
        out.append("step kernels: no result row")
    cells = steps.get("sampling", {}).get("cells") or []
    if steps.get("sampling", {}).get("status") == "ok" and not any(c.get("status") == "ok" for c in cells):
        out.append("step sampling: no measured cell")
    tr = steps.get("train", {})
    if tr.get("status") == "ok" and not ((tr.get("train") or {}).get("steps_this_run") and tr.get("heldout")):
        out.append(f"step train: no training step or no held-out loss ({tr.get('train')}, {tr.get('heldout')})")
    return out


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
    problems += work_done(summary.get("steps", {}))
    if summary["suite"]["elapsed_s"] > summary["suite"]["budget_s"] + GRACE_S:
        problems.append(f"the suite took {summary['suite']['elapsed_s']} s of its {summary['suite']['budget_s']} s")
    return problems


def warm_build(py, env):
    """Build the extension's CPU part once, untimed, the way the install step does, then uninstall it: the
    checkout's build/ keeps the objects, so the timed install step re-links only. A cold build takes minutes
    on a 2-core machine, more than a rehearsal's install slice; the GPU machine (16 cores) builds cold.
    Returns the seconds it took."""
    t = time.time()
    benv = dict(env, TGPQ_NO_CUDA="1", MAX_JOBS=str(os.cpu_count() or 2))
    print("rehearsal: warm-up build of the extension's CPU part (untimed)", flush=True)
    r = subprocess.run([py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile",
                        "--disable-pip-version-check", "-q", "."], cwd=ROOT, env=benv, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"rehearsal: the warm-up build failed:\n{(r.stdout + r.stderr)[-3000:]}")
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "tgpq"], cwd=ROOT, env=env, check=True)
    return time.time() - t


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
    argv = [py, ENTRY, out, "--budget-min", str(a.budget_min), "--payload", payload]
    cold = None
    if a.ci:
        argv.append("--ci")
        env["TGPQ_CI_PYTHON"] = a.ci_python or sys.executable
    else:
        cold = warm_build(py, env)
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
    if cold is not None:
        print(f"  untimed warm-up build of the extension's CPU part before the suite: {cold:.0f} s on "
              f"{os.cpu_count()} cores (the suite's timed install then reuses its objects; the GPU machine builds "
              f"cold, with all its cores)")
    for p in problems:
        print("  PROBLEM:", p)
    print("rehearsal:", "passed" if not problems else f"{len(problems)} problems")
    return 0 if not problems else 1


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


