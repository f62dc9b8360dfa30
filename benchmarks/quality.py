"""Quality table: FP and rtn / uniform / gac (/ gac without matching) at W8A8 / W4A8 on the reference model.

Per calibration seed ``k`` (``--calib-seeds``, default 0) one calibration set is collected
(DDIM trajectories from noise seed ``1000 + k``, ``collect_calibration``) and shared by every
(bits, method); ``QuantConfig.seed = k`` (mini-batch order). Methods: ``rtn``, ``uniform``, ``gac``
and ``gac_gm0`` (gac with ``gm_lambda = 0``, the ablation of the matching term). Each calibrated model
is converted (``tgpq.convert``, ``--backend``), saved with ``tgpq.save`` under ``<out>_models/`` and
sampled from the same seeds as the FP model: image ``i`` starts from noise seeded by ``(--seed, i)``
(``tgpq.eval.initial_noise``), so the images do not depend on the batch size or the number of
ranks. Per row (one per bits x method x calibration seed):

* feature FD: Frechet distance of the shipped CIFAR-10 classifier's penultimate features vs the
  CIFAR-10 train statistics (``tgpq.metrics``; not comparable with Inception FID);
* precision / recall: k-NN manifold precision and recall (k = 3) in the same feature space vs a
  seeded subset of ``min(N, 10000)`` real CIFAR-10 test images;
* PSNR / SSIM vs the FP images of the same seeds;
* FID and Inception Score with ``--inception pt_inception-2015-12-05-6726825d.pth`` only (FID vs
  the CIFAR-10 train set, ``--fid-ref``);
* calibration wall time, the weight bytes of the model (``tgpq.weight_bytes``: what ``tgpq.save``
  writes; FP: the float32 state dict);
* eps-MSE per timestep group: along the FP model's DDIM trajectories of the first ``--eps-images``
  images, the mean squared difference of the quantized and the FP noise predictions on the same
  ``x_t``, averaged per timestep group (the calibration's groups; g0 = lowest t).

With several calibration seeds, ``<out>.md`` also has the mean and standard deviation over seeds of
every metric per (bits, method), and paired differences (same seed, same calibration set) of gac,
gac_gm0 and uniform; ``<out>.png`` plots the means with their spread. ``--resume`` reuses the saved
models and finished rows (``<out>_models/cells/``) of an interrupted run with the same settings.

Data-parallel under ``torchrun --nproc_per_node K`` (nccl on CUDA, gloo on CPU): rank 0 calibrates
and saves every model, the others load it after a barrier; rank ``r`` samples images
``r, r + K, ...``; the images are gathered on rank 0, which computes the metrics and writes
``<out>.json`` and ``<out>.md``.

    nice -n 10 python benchmarks/quality.py --threads 1                 # CPU: 256 images, 20 DDIM steps
    python benchmarks/quality.py --quick                                # seconds-scale smoke run
    torchrun --nproc_per_node 8 benchmarks/quality.py --images 10000 --steps 100
    # the gac evidence (issue #13): 3 calibration seeds x 4 methods x 2 bit widths
    nice -n 5 python benchmarks/quality.py --calib-seeds 0 1 2 --methods rtn uniform gac gac_gm0 \
        --images 1000 --steps 50 --traj 16 --calib-steps 100 --interval 5 --iters 200 --resume \
        --out benchmarks/results/quality_gac
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # calibration_quality
import tgpq  # noqa: E402  (the installed package: README, install)

from tgpq.eval.bench.report import device_name, git_commit  # noqa: E402
from calibration_quality import (add_calibration_args, calibration_setting, load_model,  # noqa: E402
                                 timed_calibrate)

#: ``--quick``: a seconds-scale smoke setting (applies to options not given explicitly).
QUICK = dict(images=8, steps=2, batch_size=8, traj=2, calib_steps=10, interval=2, iters=4, calib_batch_size=8)
#: ``--methods`` names: (QuantConfig.method, further QuantConfig fields).
METHODS = {"rtn": ("rtn", {}), "uniform": ("uniform", {}), "gac": ("gac", {}), "gac_gm0": ("gac", {"gm_lambda": 0.0})}
#: Noise seed of calibration set ``k``'s trajectories: ``CALIB_SEED + k`` (disjoint from the evaluation's).
CALIB_SEED = 1000
#: Defaults that depend on the device: (CPU, CUDA).
DEVICE_DEFAULTS = dict(images=(256, 10000), steps=(20, 100), batch_size=(64, 1024))
PR_K = 3


# ------------------------------------------------------------------------------------ distribution
class Ranks:
    """This process's place in a torchrun job (or a single process: rank 0 of 1, no process group)."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
        if use_cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            # the FP row (and the float layers of the quantized models) in true float32, not TF32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        else:
            self.device = torch.device("cpu")
        self.distributed = "WORLD_SIZE" in os.environ and "RANK" in os.environ
        if self.distributed:
            # rank 0 calibrates while the others wait at a barrier: allow hours, not the default minutes
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_dt.timedelta(hours=6))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank]) if self.device.type == "cuda" else dist.barrier()

    def share(self, n: int) -> int:
        """How many of images ``0..n-1`` this rank samples (``rank, rank + world, ...``)."""
        return len(range(self.rank, n, self.world))

    def gather(self, x: torch.Tensor, n: int) -> torch.Tensor | None:
        """All ranks' shares ``[share, ...]`` -> images ``[n, ...]`` in index order on rank 0 (CPU)."""
        if not self.distributed:
            return x.cpu()
        per = -(-n // self.world)
        buf = torch.zeros(per, *x.shape[1:], dtype=x.dtype, device=self.device)
        buf[:x.shape[0]] = x.to(self.device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        # image i = rank + world * j sits at parts[rank][j]: stack as [j, rank] and flatten
        return torch.stack(parts, 1).flatten(0, 1)[:n].cpu() if self.main else None

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``x`` over all ranks (float64, on CPU)."""
        if not self.distributed:
            return x.double().cpu()
        y = x.double().to(self.device)
        dist.all_reduce(y)
        return y.cpu()

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ metrics
class Metrics:
    """The per-row metrics on rank 0; reference features and statistics are computed once."""

    def __init__(self, num_images: int, device: torch.device, inception: str | None, fid_ref: str, seed: int):
        from tgpq.eval.cifar10 import load_cifar10
        from tgpq.metrics import classifier_features, load_train_feature_stats

        self.device, self.inception = device, inception
        self.train_stats = load_train_feature_stats()
        try:
            real, _ = load_cifar10("test")
            idx = np.random.default_rng(seed).permutation(len(real))[:min(num_images, len(real))]
            self.pr_ref = classifier_features(real[idx], device=device)
            self.pr_ref_desc = f"{len(idx)} CIFAR-10 test images (seeded subset)"
        except FileNotFoundError as e:
            print(f"precision/recall unavailable: {e}")
            self.pr_ref, self.pr_ref_desc = None, None
        self.fid_stats, self.fid_ref_desc = None, None
        if inception:
            from tgpq.metrics import feature_stats, inception_outputs

            real, _ = load_cifar10(fid_ref)
            feats = inception_outputs(real, inception, batch_size=200, device=device, progress=True)[0]
            self.fid_stats = feature_stats(feats)
            self.fid_ref_desc = f"{len(real)} CIFAR-10 {fid_ref} images"

    def __call__(self, images: torch.Tensor, fp_images: torch.Tensor | None) -> dict:
        from tgpq import metrics as M

        feats = M.classifier_features(images, device=self.device)
        row = {"images_evaluated": int(images.shape[0]),
               "feature_fd": M.feature_frechet_distance(feats, self.train_stats)}
        if self.pr_ref is not None and images.shape[0] > PR_K:
            row.update(M.classifier_precision_recall(feats, self.pr_ref, k=PR_K))
        row["psnr_vs_fp_db"] = None if fp_images is None else M.psnr(images, fp_images)
        row["ssim_vs_fp"] = None if fp_images is None else M.ssim(images, fp_images)
        if self.inception:
            f, logits = M.inception_outputs(images, self.inception, batch_size=200, device=self.device)
            mu, sigma = M.feature_stats(f)
            row["fid"] = M.frechet_distance(mu, sigma, *self.fid_stats)
            row["inception_score"], row["inception_score_std"] = M.inception_score_from_logits(
                logits, splits=min(10, images.shape[0]))
        return row


# ------------------------------------------------------------------------------------- eps-MSE
def eval_timestep_groups(a) -> torch.Tensor:
    """int64 ``[1000]``: the calibration's timestep -> group table (``QuantConfig.num_groups`` groups of the
    kept steps of a ``--calib-steps`` DDIM schedule, every ``--interval``-th), as ``calibrate`` builds it."""
    from diffusers import DDIMScheduler

    from tgpq.nn.routing import timestep_groups_from_calibration

    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(a.calib_steps)
    kept = sched.timesteps[::a.interval]
    return timestep_groups_from_calibration(kept, tgpq.QuantConfig().num_groups, 1000)


@torch.no_grad()
def fp_trajectory(unet, n: int, steps: int, seed: int, first: int, stride: int, batch_size: int, device) -> list:
    """``[(t, x_t [n, C, H, W], eps_fp [n, C, H, W])]`` along the FP model's DDIM trajectories of images
    ``first + k * stride`` (``k < n``) from the evaluation noise (the same images ``ddim_sample`` starts from)."""
    from diffusers import DDIMScheduler

    from tgpq.eval.sampling import initial_noise

    cfg = unet.config
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x = initial_noise(n, (cfg.in_channels, cfg.sample_size, cfg.sample_size), seed, first, stride).to(device)
    out = []
    for t in sched.timesteps:
        eps = torch.cat([unet(xb, t.to(device)).sample for xb in x.split(batch_size)])
        out.append((int(t), x.cpu(), eps.cpu()))
        x = sched.step(eps, t, x).prev_sample
    return out


@torch.no_grad()
def eps_mse_sums(model, traj: list, table: torch.Tensor, num_groups: int, batch_size: int, device) -> torch.Tensor:
    """float64 ``[2, G]``: per timestep group, the sum over steps of the mean squared eps difference, and
    the number of steps (this rank's images only)."""
    sums = torch.zeros(2, num_groups, dtype=torch.float64)
    for t, x, eps in traj:
        if x.shape[0] == 0:
            continue
        q = torch.cat([model(xb.to(device), torch.tensor(t, device=device)).sample.float().cpu()
                       for xb in x.split(batch_size)])
        g = int(table[t])
        sums[0, g] += float((q - eps).pow(2).sum()) / q[0].numel()
        sums[1, g] += x.shape[0]
    return sums


# ------------------------------------------------------------------------------------------- output
COLUMNS = [  # (json key, header, format); None values print as '-'
    ("weight_bytes", "weights MiB", lambda v: f"{v / 2**20:.2f}"),
    ("calib_seconds", "calib s", lambda v: f"{v:.1f}"),
    ("feature_fd", "feature FD", lambda v: f"{v:.3f}"),
    ("precision", "precision", lambda v: f"{v:.3f}"),
    ("recall", "recall", lambda v: f"{v:.3f}"),
    ("psnr_vs_fp_db", "PSNR vs FP (dB)", lambda v: f"{v:.2f}"),
    ("ssim_vs_fp", "SSIM vs FP", lambda v: f"{v:.4f}"),
    ("eps_mse_mean", "eps-MSE", lambda v: f"{v:.3e}"),
    ("fid", "FID", lambda v: f"{v:.2f}"),
    ("inception_score", "IS", lambda v: f"{v:.2f}"),
]
SUMMARY_KEYS = ["feature_fd", "precision", "recall", "psnr_vs_fp_db", "ssim_vs_fp", "eps_mse_mean", "calib_seconds",
                "fid", "inception_score"]
#: paired comparisons (same calibration seed): (a, b) -> a - b
PAIRS = [("gac", "uniform"), ("gac_gm0", "uniform"), ("gac", "gac_gm0"), ("uniform", "rtn")]


def mean_std(values: list) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None)


def summarize(rows: list, num_groups: int) -> dict:
    """Mean and standard deviation over calibration seeds per (bits, method), and paired differences."""
    cells = {}
    for r in rows:
        if r["bits"] is not None:
            cells.setdefault((r["bits"], r["method"]), []).append(r)
    summary = []
    for (bits, method), rs in cells.items():
        e = {"bits": bits, "method": method, "seeds": [r["calib_seed"] for r in rs]}
        for k in SUMMARY_KEYS:
            e[k], e[k + "_std"] = mean_std([r.get(k) for r in rs])
        e["eps_mse_per_group"] = [mean_std([r["eps_mse_per_group"][g] for r in rs])[0] for g in range(num_groups)]
        summary.append(e)
    paired = []
    for bits in dict.fromkeys(b for b, _ in cells):
        for x, y in PAIRS:
            if (bits, x) not in cells or (bits, y) not in cells:
                continue
            by_seed = {r["calib_seed"]: r for r in cells[(bits, y)]}
            common = [r for r in cells[(bits, x)] if r["calib_seed"] in by_seed]
            e = {"bits": bits, "a": x, "b": y, "seeds": len(common)}
            for k in ("feature_fd", "precision", "recall", "psnr_vs_fp_db", "ssim_vs_fp", "eps_mse_mean"):
                d = [r[k] - by_seed[r["calib_seed"]][k] for r in common
                     if r.get(k) is not None and by_seed[r["calib_seed"]].get(k) is not None]
                m, sd = mean_std(d)
                e[k] = m
                e[k + "_std"] = sd
                e[k + "_t"] = (m / (sd / math.sqrt(len(d)))) if (sd and len(d) > 1) else None
                e[k + "_p"] = None
                if e[k + "_t"] is not None:
                    from scipy.stats import t as student_t

                    e[k + "_p"] = float(2 * student_t.sf(abs(e[k + "_t"]), len(d) - 1))
            paired.append(e)
    return {"per_method": summary, "paired": paired}


def _pm(m, sd, fmt):
    if m is None:
        return "-"
    return fmt(m) if sd is None else f"{fmt(m)} ± {fmt(sd)}"


def markdown(doc: dict) -> str:
    s = doc["settings"]
    cols = [c for c in COLUMNS if c[0] not in ("fid", "inception_score") or s["inception"]]
    pr = (f"precision / recall: k-NN (k={PR_K}) in that feature space vs {s['precision_recall_reference']}"
          if s["precision_recall_reference"] else "precision / recall: CIFAR-10 test images not found")
    fid = f"; FID / IS: FID-Inception, FID vs {s['fid_reference']}" if s["inception"] else ""
    seeds = s.get("calib_seeds", [0])
    lines = [
        f"# Quality: {s['model']}, {s['params'] / 1e6:.2f}M params", "",
        f"Setting: {s['images']} images per model, {s['steps']}-step DDIM (eta 0), image i from noise seed "
        f"({s['seed']}, i) for every model; calibration: {s['calibration']['setting']}, one set per calibration "
        f"seed shared by all methods (seeds disjoint from the evaluation; calibration seeds {seeds}); "
        f"backend {s['backend']}; {s['device']}; world size {s['world_size']}; torch {s['torch']}; {s['date']}.", "",
        f"Feature FD: Frechet distance of the shipped CIFAR-10 classifier's features vs the CIFAR-10 train "
        f"statistics (not Inception FID; biased upwards at small N); {pr}; PSNR / SSIM vs the FP images of the "
        f"same seeds{fid}; eps-MSE: quantized vs FP noise prediction along the FP trajectories of the first "
        f"{s.get('eps_images', '-')} images, mean over steps. Weights: bytes of the saved state (FP: float32 state "
        f"dict).", "",
    ]
    summ = doc.get("summary")
    if summ and len(seeds) > 1:
        G = len(summ["per_method"][0]["eps_mse_per_group"])
        keys = [c for c in cols if c[0] in SUMMARY_KEYS]
        lines += [f"## Mean ± standard deviation over {len(seeds)} calibration seeds", "",
                  "| model | " + " | ".join(c[1] for c in keys) + " |", "|---|" + "---|" * len(keys)]
        for e in summ["per_method"]:
            lines.append(f"| {e['bits']} {e['method']} | " +
                         " | ".join(_pm(e[k], e[k + '_std'], fmt) for k, _, fmt in keys) + " |")
        lines += ["", "eps-MSE per timestep group (mean over seeds; g0 = lowest t):", "",
                  "| model | " + " | ".join(f"g{g}" for g in range(G)) + " |", "|---|" + "---|" * G]
        for e in summ["per_method"]:
            lines.append(f"| {e['bits']} {e['method']} | " +
                         " | ".join("-" if v is None else f"{v:.3e}" for v in e["eps_mse_per_group"]) + " |")
        lines += ["", "Paired differences a - b (same calibration seed and set): mean ± std over seeds, "
                  "t = mean / standard error and its two-sided p-value (Student t, seeds - 1 degrees of freedom):", "",
                  "| bits | a - b | feature FD | precision | recall | PSNR (dB) | SSIM | eps-MSE |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in summ["paired"]:
            cells = []
            for k, f in (("feature_fd", ".3f"), ("precision", ".3f"), ("recall", ".3f"), ("psnr_vs_fp_db", ".2f"),
                         ("ssim_vs_fp", ".4f"), ("eps_mse_mean", ".2e")):
                t, pv = e.get(k + "_t"), e.get(k + "_p")
                cells.append(_pm(e[k], e[k + "_std"], lambda v, f=f: format(v, f)) +
                             ("" if t is None else f" (t {t:+.1f}, p {pv:.2f})"))
            lines.append(f"| {e['bits']} | {e['a']} - {e['b']} | " + " | ".join(cells) + " |")
        lines += ["", "## Every row", ""]
    lines += ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in doc["rows"]:
        cells = ["-" if r.get(k) is None else fmt(r[k]) for k, _, fmt in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{s['command']}`", ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    """Mean (marker) and every seed (dots) of feature FD, PSNR vs FP and eps-MSE per method, per bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["bits"] is not None]
    bits = list(dict.fromkeys(r["bits"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fp = next((r for r in doc["rows"] if r["bits"] is None), None)
    keys = [("feature_fd", "feature FD (lower is better)"), ("psnr_vs_fp_db", "PSNR vs FP, dB (higher is better)"),
            ("eps_mse_mean", "eps-MSE vs FP (lower is better)")]
    fig, axes = plt.subplots(len(bits), len(keys), figsize=(4.2 * len(keys), 3.2 * len(bits)), squeeze=False, dpi=110)
    for i, b in enumerate(bits):
        for j, (k, title) in enumerate(keys):
            ax = axes[i][j]
            for x, m in enumerate(methods):
                vals = [r[k] for r in rows if r["bits"] == b and r["method"] == m and r.get(k) is not None]
                if vals:
                    ax.scatter([x] * len(vals), vals, s=12, color="grey", alpha=0.7)
                    ax.errorbar([x], [sum(vals) / len(vals)], yerr=[mean_std(vals)[1] or 0], fmt="o", color="C0",
                                capsize=4)
            if k == "feature_fd" and fp is not None:
                ax.axhline(fp["feature_fd"], color="k", ls="--", lw=0.8, label="FP")
                ax.legend(fontsize=7)
            ax.set_xticks(range(len(methods)), methods, fontsize=8)
            ax.set_title(f"{b}: {title}", fontsize=9)
            if k == "eps_mse_mean":
                ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--methods", nargs="+", default=["rtn", "uniform", "gac"], choices=list(METHODS))
    p.add_argument("--calib-seeds", nargs="+", type=int, default=[0],
                   help="calibration seeds k: trajectories from noise seed 1000 + k, QuantConfig.seed = k")
    p.add_argument("--images", type=int, help="images per model (default 256 on CPU, 10000 on CUDA)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 20 on CPU, 100 on CUDA)")
    p.add_argument("--batch-size", type=int, help="sampling batch per rank (default 64 on CPU, 1024 on CUDA)")
    p.add_argument("--eps-images", type=int, default=256, help="images whose FP trajectories give the eps-MSE")
    p.add_argument("--seed", type=int, default=0, help="evaluation noise seed")
    add_calibration_args(p, batch_flag="--calib-batch-size")
    p.set_defaults(weight_steps=None)  # QuantConfig's default (logit steps per refresh)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"],
                   help="quantized-layer backend (auto: cpu on the CPU, triton on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--inception", metavar="PATH", help="local pt_inception-2015-12-05-6726825d.pth: adds FID and IS")
    p.add_argument("--fid-ref", default="train", choices=["train", "test"], help="CIFAR-10 split FID compares with")
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--quick", action="store_true", help="seconds-scale smoke setting: " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--resume", action="store_true",
                   help="reuse the saved models and finished rows of a run with the same settings")
    p.add_argument("--out", default=str(HERE / "results" / "quality"), help="output stem: STEM.json, STEM.md")
    return p


def resolve(p: argparse.ArgumentParser, argv: list[str], cuda: bool) -> argparse.Namespace:
    """Parse; options not given take the ``--quick`` value, else the device default, else the parser's."""
    base = {k: p.get_default(k) for k in QUICK}
    p.set_defaults(**{k: None for k in QUICK})
    a = p.parse_args(argv)
    for k in QUICK:
        if getattr(a, k) is None:
            fallback = DEVICE_DEFAULTS[k][int(cuda)] if k in DEVICE_DEFAULTS else base[k]
            setattr(a, k, QUICK[k] if a.quick else fallback)
    return a


def backend_name(backend: str, device: torch.device) -> str:
    """``backend`` as given, and what ``auto`` picks on ``device`` (``tgpq.backends.resolve``)."""
    from tgpq.backends import resolve as resolve_backend

    picked = resolve_backend(backend, torch.empty(0, device=device)).__name__.rsplit(".", 1)[-1]
    return picked if picked == backend else f"{backend} ({picked})"


def check_inception(path: str) -> None:
    """Fail fast, in one line naming the file, when ``--inception`` is unusable."""
    from tgpq.metrics import load_fid_inception

    try:
        load_fid_inception(path)
    except (FileNotFoundError, ValueError) as e:
        print(f"quality.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def method_config(a, bits: str, name: str, seed: int):
    """The ``QuantConfig`` of ``--methods`` entry ``name`` at calibration seed ``seed``."""
    from tgpq.recipe import parse_bits

    method, over = METHODS[name]
    wb, ab = parse_bits(bits)
    kw = dict(weight_bits=wb, act_bits=ab, method=method, iters=a.iters, batch_size=a.calib_batch_size,
              lr_adaround=a.lr_adaround, block_inputs=a.block_inputs, seed=seed, **over)
    if a.weight_steps is not None:
        kw["weight_steps"] = a.weight_steps
    return tgpq.QuantConfig(**kw)


def cell_name(bits: str, method: str, seed: int, seeds: list) -> str:
    return f"{bits} {method}" + (f" s{seed}" if len(seeds) > 1 else "")


def collect_seed(unet, a, seed: int):
    from diffusers import DDIMScheduler

    return tgpq.collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=a.traj,
                                    num_steps=a.calib_steps, interval=a.interval, seed=CALIB_SEED + seed, batch_size=64)


def fingerprint(a) -> dict:
    """The settings a saved model or row depends on (``--resume`` reuses only an exact match)."""
    keys = ("images", "steps", "seed", "traj", "calib_steps", "interval", "iters", "weight_steps", "lr_adaround",
            "calib_batch_size", "block_inputs", "backend", "eps_images", "inception", "fid_ref")
    return {k: getattr(a, k) for k in keys}


def calibrate_and_save(unet, a, models_dir: Path) -> tuple[dict, dict]:
    """Rank 0: per calibration seed one calibration set, then every (bits, method) calibrated, converted and saved."""
    models_dir.mkdir(parents=True, exist_ok=True)
    stats, calibration = {}, None
    for seed in a.calib_seeds:
        calib = None
        for bits in a.bits:
            for method in a.methods:
                path = models_dir / f"{bits}-{method}-s{seed}.safetensors"
                meta = path.with_suffix(".json")
                if a.resume and path.is_file() and meta.is_file():
                    rec = json.loads(meta.read_text())
                    if rec.get("fingerprint") == fingerprint(a):
                        stats[(bits, method, seed)] = rec["stats"]
                        calibration = calibration or rec.get("calibration")
                        print(f"{bits} {method} seed {seed}: reusing {path}")
                        continue
                if calib is None:
                    t0 = time.perf_counter()
                    calib = collect_seed(unet, a, seed)
                    if calibration is None or seed == a.calib_seeds[0]:
                        shown = argparse.Namespace(**{**vars(a), "weight_steps": method_config(a, bits, "gac", seed)
                                                      .weight_steps})
                        calibration = {"setting": calibration_setting(shown, calib), "samples": len(calib),
                                       "validation_samples": int(calib.val_x.shape[0]),
                                       "collect_seconds": time.perf_counter() - t0,
                                       **{k: getattr(a, k) for k in ("traj", "calib_steps", "interval", "iters",
                                                                     "weight_steps", "lr_adaround",
                                                                     "calib_batch_size")}}
                qstate, seconds, rss = timed_calibrate(unet, calib, method_config(a, bits, method, seed))
                tgpq.save(tgpq.convert(unet, qstate, backend=a.backend), path)
                st = {"calib_seconds": seconds, "calib_peak_rss_increase_mb": rss / 2**20, "model_file": str(path)}
                if qstate.sample_weights:
                    from tgpq.calibration import plot_sample_weights

                    st["weights_plot"] = str(plot_sample_weights(qstate, path.with_suffix(".weights.png")))
                meta.write_text(json.dumps({"fingerprint": fingerprint(a), "stats": st, "calibration": calibration}))
                stats[(bits, method, seed)] = st
                print(f"{bits} {method} seed {seed}: calibrated in {seconds:.1f} s, saved {path}")
    return calibration, stats


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    pre = p.parse_known_args(argv)[0]
    a = resolve(p, argv, cuda=pre.device == "cuda" or (pre.device == "auto" and torch.cuda.is_available()))
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.inception:
        check_inception(a.inception)
    ranks = Ranks(a.device)
    try:
        return run(a, argv, ranks)
    finally:
        ranks.close()


def run(a: argparse.Namespace, argv: list[str], ranks: Ranks) -> dict | None:
    from tgpq.eval.sampling import ddim_sample

    out = Path(a.out)
    models_dir = out.parent / f"{out.name}_models"
    cells_dir = models_dir / "cells"
    unet, model_desc = load_model(ranks.device)
    calibration, stats = calibrate_and_save(unet, a, models_dir) if ranks.main else (None, None)
    ranks.barrier()  # the saved models are there for every rank

    metrics = Metrics(a.images, ranks.device, a.inception, a.fid_ref, a.seed) if ranks.main else None
    share = ranks.share(a.images)
    table = eval_timestep_groups(a)
    num_groups = int(table.max()) + 1
    n_eps = len(range(ranks.rank, min(a.eps_images, a.images), ranks.world))
    traj = fp_trajectory(unet, n_eps, a.steps, a.seed, ranks.rank, ranks.world, a.batch_size, ranks.device)
    models = [("FP", None, None, None)] + [(cell_name(b, m, k, a.calib_seeds), b, m, k)
                                           for k in a.calib_seeds for b in a.bits for m in a.methods]
    rows, fp_images = [], None
    if ranks.main:
        cells_dir.mkdir(parents=True, exist_ok=True)
    for name, bits, method, seed in models:
        cache = cells_dir / (name.replace(" ", "_") + ".pt")
        if a.resume and cache.is_file():  # every rank sees the same file system (one machine or shared)
            saved = torch.load(cache, weights_only=False)
            if saved["fingerprint"] == fingerprint(a):
                if ranks.main:
                    rows.append(saved["row"])
                    print(f"{name}: reusing {cache}")
                if bits is None:
                    fp_images = saved["images"]
                continue
        model = unet if bits is None else tgpq.load(models_dir / f"{bits}-{method}-s{seed}.safetensors",
                                                    backend=a.backend, device=ranks.device)
        t0 = time.perf_counter()
        local = ddim_sample(model, share, a.steps, seed=a.seed, batch_size=a.batch_size, device=ranks.device,
                            progress=ranks.main, first=ranks.rank, stride=ranks.world) if share else \
            torch.empty(0, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        sample_s = time.perf_counter() - t0
        images = ranks.gather(local, a.images)
        sums = ranks.sum(eps_mse_sums(model, traj, table, num_groups, a.batch_size, ranks.device)) \
            if bits is not None else None
        if not ranks.main:
            if bits is None:
                fp_images = images
            continue
        row = {"name": name, "bits": bits, "method": method, "calib_seed": seed,
               "weight_bytes": tgpq.weight_bytes(model),
               "sample_seconds_rank0": sample_s,
               **(stats.get((bits, method, seed), {}) if bits is not None else {"calib_seconds": None})}
        row.update(metrics(images, fp_images))
        if sums is not None:
            per = [float(sums[0, g] / sums[1, g]) if sums[1, g] > 0 else None for g in range(num_groups)]
            row["eps_mse_per_group"] = per
            row["eps_mse_mean"] = float(sums[0].sum() / sums[1].sum()) if sums[1].sum() > 0 else None
        else:
            row["eps_mse_per_group"], row["eps_mse_mean"] = [None] * num_groups, None
        if bits is None:
            fp_images = images
        rows.append(row)
        torch.save({"fingerprint": fingerprint(a), "row": row, "images": images if bits is None else None}, cache)
        print(json.dumps(row))
    if not ranks.main:
        return None

    launcher = f"torchrun --nproc_per_node {ranks.local_world}" if ranks.distributed else "python"
    settings = {
        "model": model_desc, "params": sum(t.numel() for t in unet.parameters()),
        "images": a.images, "steps": a.steps, "batch_size": a.batch_size, "seed": a.seed,
        "calibration": calibration, "calib_seeds": a.calib_seeds, "bits": a.bits, "methods": a.methods,
        "eps_images": min(a.eps_images, a.images), "timestep_groups": table.tolist(),
        "backend": backend_name(a.backend, ranks.device), "device": device_name(ranks.device),
        "world_size": ranks.world,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([launcher, "benchmarks/quality.py", shlex.join(argv)]).strip(),
        "quick": a.quick, "inception": a.inception, "fid_reference": metrics.fid_ref_desc,
        "precision_recall_reference": metrics.pr_ref_desc, "models_dir": str(models_dir),
    }
    doc = {"settings": settings, "rows": rows, "summary": summarize(rows, num_groups)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    if len(a.calib_seeds) > 1 or len(a.methods) > 1:
        plot(doc, out.with_suffix(".png"))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
