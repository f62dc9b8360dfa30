"""The GPU suite's machinery: constants, the plan, the ``Suite`` (deadlines, subprocesses, OUT) and small
helpers. See benchmarks/gpu_suite.py for what the suite does."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

from .report import evaluate_targets, summary_markdown

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
STEPS = (("install", 0.20, 20.0), ("correctness", 0.17, 15.0), ("kernels", 0.14, 15.0), ("sampling", 0.33, 30.0),
         ("train", 0.16, 40.0))


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


