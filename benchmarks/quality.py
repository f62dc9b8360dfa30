"""Quality table: FP and rtn / uniform / gac at W8A8 / W4A8 on the shipped reference model.

One calibration set (``calibration_quality.collect_calibration_set``) is shared by every
(bits, method); each calibrated model is converted (``tgpq.convert``, ``--backend``), saved with
``tgpq.save`` under ``<out>_models/`` and sampled from the same seeds as the FP model: image ``i``
starts from noise seeded by ``(--seed, i)`` (``tgpq.eval.initial_noise``), so the images do not
depend on the batch size or the number of ranks. Per row:

* feature FD: Frechet distance of the shipped CIFAR-10 classifier's penultimate features vs the
  CIFAR-10 train statistics (``tgpq.metrics``; not comparable with Inception FID);
* precision / recall: k-NN manifold precision and recall (k = 3) in the same feature space vs a
  seeded subset of ``min(N, 10000)`` real CIFAR-10 test images;
* PSNR / SSIM vs the FP images of the same seeds;
* FID and Inception Score with ``--inception pt_inception-2015-12-05-6726825d.pth`` only (FID vs
  the CIFAR-10 train set, ``--fid-ref``);
* calibration wall time, the weight bytes of the model (``tgpq.weight_bytes``: what ``tgpq.save``
  writes; FP: the float32 state dict).

Data-parallel under ``torchrun --nproc_per_node K`` (nccl on CUDA, gloo on CPU): rank 0 calibrates
and saves every model, the others load it after a barrier; rank ``r`` samples images
``r, r + K, ...``; the images are gathered on rank 0, which computes the metrics and writes
``<out>.json`` and ``<out>.md``.

    nice -n 10 python benchmarks/quality.py --threads 1                 # CPU: 256 images, 20 DDIM steps
    python benchmarks/quality.py --quick                                # seconds-scale smoke run
    torchrun --nproc_per_node 8 benchmarks/quality.py --images 10000 --steps 100
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
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
from calibration_quality import (add_calibration_args, calibration_setting, collect_calibration_set,  # noqa: E402
                                 load_model, quant_config, timed_calibrate)

#: ``--quick``: a seconds-scale smoke setting (applies to options not given explicitly).
QUICK = dict(images=8, steps=2, batch_size=8, traj=2, calib_steps=10, interval=2, iters=4, weight_steps=1,
             calib_batch_size=8)
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


# ------------------------------------------------------------------------------------------- output
COLUMNS = [  # (json key, header, format); None values print as '-'
    ("weight_bytes", "weights MiB", lambda v: f"{v / 2**20:.2f}"),
    ("calib_seconds", "calib s", lambda v: f"{v:.1f}"),
    ("feature_fd", "feature FD", lambda v: f"{v:.3f}"),
    ("precision", "precision", lambda v: f"{v:.3f}"),
    ("recall", "recall", lambda v: f"{v:.3f}"),
    ("psnr_vs_fp_db", "PSNR vs FP (dB)", lambda v: f"{v:.2f}"),
    ("ssim_vs_fp", "SSIM vs FP", lambda v: f"{v:.4f}"),
    ("fid", "FID", lambda v: f"{v:.2f}"),
    ("inception_score", "IS", lambda v: f"{v:.2f}"),
]


def markdown(doc: dict) -> str:
    s = doc["settings"]
    cols = [c for c in COLUMNS if c[0] not in ("fid", "inception_score") or s["inception"]]
    pr = (f"precision / recall: k-NN (k={PR_K}) in that feature space vs {s['precision_recall_reference']}"
          if s["precision_recall_reference"] else "precision / recall: CIFAR-10 test images not found")
    fid = f"; FID / IS: FID-Inception, FID vs {s['fid_reference']}" if s["inception"] else ""
    lines = [
        f"# Quality: {s['model']}, {s['params'] / 1e6:.2f}M params", "",
        f"Setting: {s['images']} images per model, {s['steps']}-step DDIM (eta 0), image i from noise seed "
        f"({s['seed']}, i) for every model; calibration: {s['calibration']['setting']}, one set shared by all "
        f"methods (seeds disjoint from the evaluation); backend {s['backend']}; {s['device']}; world size "
        f"{s['world_size']}; torch {s['torch']}; {s['date']}.", "",
        f"Feature FD: Frechet distance of the shipped CIFAR-10 classifier's features vs the CIFAR-10 train "
        f"statistics (not Inception FID; biased upwards at small N); {pr}; PSNR / SSIM vs the FP images of the "
        f"same seeds{fid}. Weights: bytes of the saved state (FP: float32 state dict).", "",
        "| model | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in doc["rows"]:
        cells = ["-" if r.get(k) is None else fmt(r[k]) for k, _, fmt in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `{s['command']}`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", nargs="+", default=["W8A8", "W4A8"])
    p.add_argument("--methods", nargs="+", default=["rtn", "uniform", "gac"], choices=["rtn", "uniform", "gac"])
    p.add_argument("--images", type=int, help="images per model (default 256 on CPU, 10000 on CUDA)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 20 on CPU, 100 on CUDA)")
    p.add_argument("--batch-size", type=int, help="sampling batch per rank (default 64 on CPU, 1024 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="evaluation noise seed")
    add_calibration_args(p, batch_flag="--calib-batch-size")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"],
                   help="quantized-layer backend (auto: cpu on the CPU, triton on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--inception", metavar="PATH", help="local pt_inception-2015-12-05-6726825d.pth: adds FID and IS")
    p.add_argument("--fid-ref", default="train", choices=["train", "test"], help="CIFAR-10 split FID compares with")
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--quick", action="store_true", help="seconds-scale smoke setting: " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()))
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


def calibrate_and_save(unet, a, models_dir: Path) -> tuple[dict, dict]:
    """Rank 0: one calibration set, then every (bits, method) calibrated, converted and saved."""
    t0 = time.perf_counter()
    calib = collect_calibration_set(unet, a)
    calibration = {"setting": calibration_setting(a, calib), "samples": len(calib),
                   "validation_samples": int(calib.val_x.shape[0]), "collect_seconds": time.perf_counter() - t0,
                   **{k: getattr(a, k) for k in ("traj", "calib_steps", "interval", "iters", "weight_steps",
                                                 "lr_adaround", "calib_batch_size")}}
    models_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for bits in a.bits:
        for method in a.methods:
            qstate, seconds, rss = timed_calibrate(unet, calib, quant_config(a, bits, method))
            path = models_dir / f"{bits}-{method}.safetensors"
            tgpq.save(tgpq.convert(unet, qstate, backend=a.backend), path)
            stats[(bits, method)] = {"calib_seconds": seconds, "calib_peak_rss_increase_mb": rss / 2**20,
                                     "model_file": str(path)}
            print(f"{bits} {method}: calibrated in {seconds:.1f} s, saved {path}")
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
    unet, model_desc = load_model(ranks.device)
    calibration, stats = calibrate_and_save(unet, a, models_dir) if ranks.main else (None, None)
    ranks.barrier()  # the saved models are there for every rank

    metrics = Metrics(a.images, ranks.device, a.inception, a.fid_ref, a.seed) if ranks.main else None
    share = ranks.share(a.images)
    models = [("FP", None, None)] + [(f"{b} {m}", b, m) for b in a.bits for m in a.methods]
    rows, fp_images = [], None
    for name, bits, method in models:
        model = unet if bits is None else tgpq.load(models_dir / f"{bits}-{method}.safetensors",
                                                    backend=a.backend, device=ranks.device)
        t0 = time.perf_counter()
        local = ddim_sample(model, share, a.steps, seed=a.seed, batch_size=a.batch_size, device=ranks.device,
                            progress=ranks.main, first=ranks.rank, stride=ranks.world) if share else \
            torch.empty(0, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        sample_s = time.perf_counter() - t0
        images = ranks.gather(local, a.images)
        if not ranks.main:
            continue
        row = {"name": name, "bits": bits, "method": method, "weight_bytes": tgpq.weight_bytes(model),
               "sample_seconds_rank0": sample_s, **stats.get((bits, method), {"calib_seconds": None})}
        row.update(metrics(images, fp_images))
        if bits is None:
            fp_images = images
        rows.append(row)
        print(json.dumps(row))
    if not ranks.main:
        return None

    launcher = f"torchrun --nproc_per_node {ranks.local_world}" if ranks.distributed else "python"
    settings = {
        "model": model_desc, "params": sum(t.numel() for t in unet.parameters()),
        "images": a.images, "steps": a.steps, "batch_size": a.batch_size, "seed": a.seed,
        "calibration": calibration, "bits": a.bits, "methods": a.methods,
        "backend": backend_name(a.backend, ranks.device), "device": device_name(ranks.device), "world_size": ranks.world, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([launcher, "benchmarks/quality.py", shlex.join(argv)]).strip(),
        "quick": a.quick, "inception": a.inception, "fid_reference": metrics.fid_ref_desc,
        "precision_recall_reference": metrics.pr_ref_desc, "models_dir": str(models_dir),
    }
    doc = {"settings": settings, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
