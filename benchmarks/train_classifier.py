"""Train the small CIFAR-10 classifier that tgpq's feature Frechet distance uses, and ship it.

Writes (by default into ``src/tgpq/assets/``):
  - ``cifar10_classifier.safetensors``: float32 state dict of ``tgpq.metrics.classifier.CifarResNet``;
  - ``cifar10_classifier.json``: architecture, test accuracy, feature dim, training command/time;
  - ``cifar10_train_feature_stats.safetensors``: ``mu`` [D] and ``sigma`` [D, D] (float64) of the
    pooled penultimate features of the 50000 CIFAR-10 training images (no augmentation).

Inputs are float NCHW in [-1, 1], exactly like diffusion samples. Augmentation: random crop
32x32 from the image reflect-padded by 4, random horizontal flip. Optimiser: SGD with Nesterov
momentum, label smoothing, linear warm-up then linear decay to zero. CPU-friendly:

    nice -n 10 python benchmarks/train_classifier.py --threads 2 --epochs 6

``--stats-only`` recomputes the feature statistics (and test accuracy) from the saved weights.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

# On a shared, oversubscribed machine spinning OpenMP workers burn ~3x the CPU time for the same
# work (measured here: 2.2 vs 0.75 CPU-s per step); must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from tgpq.eval.cifar10 import load_cifar10  # noqa: E402
from tgpq.metrics.classifier import CifarResNet, classifier_features, classifier_logits  # noqa: E402
from tgpq.metrics.frechet import feature_stats  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "src" / "tgpq" / "assets"


def to_float_nchw(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> float32 [N, 3, 32, 32] in [-1, 1]."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def augment(x_padded: torch.Tensor, idx: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random 32x32 crops of the pre-padded images ``x_padded[idx]`` ([N, 3, 32+2p, 32+2p]) + random h-flip."""
    b = idx.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ar = torch.arange(32)
    rows = (dy[:, None] + ar)[:, None, :, None]            # [B, 1, 32, 1]
    cols = (dx[:, None] + ar)                              # [B, 32]
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # [B, 1, 1, 32]
    ch = torch.arange(3)[None, :, None, None]
    return x_padded[idx[:, None, None, None], ch, rows, cols]  # [B, 3, 32, 32]


@torch.no_grad()
def accuracy(model: CifarResNet, images_u8: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    pred = classifier_logits(images_u8, model=model).argmax(1).numpy()
    return float((pred == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--time-budget-min", type=float, default=None,
                    help="train for this many wall-clock minutes (time-based LR schedule) instead of --epochs")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--stem", type=int, default=24)
    ap.add_argument("--widths", type=int, nargs=3, default=[40, 80, 160])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=ASSETS)
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from these saved weights (same architecture) and train further; the JSON "
                         "then records the earlier run under 'previous_runs'")
    ap.add_argument("--stats-only", action="store_true", help="skip training; recompute stats from saved weights")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    w_path, cfg_path = out / "cifar10_classifier.safetensors", out / "cifar10_classifier.json"
    stats_path = out / "cifar10_train_feature_stats.safetensors"

    print("loading CIFAR-10 ...", flush=True)
    xtr_u8, ytr = load_cifar10("train")
    xte_u8, yte = load_cifar10("test")
    arch = {"name": "CifarResNet", "stem": args.stem, "widths": list(args.widths), "num_classes": 10}
    model = CifarResNet(stem=args.stem, widths=tuple(args.widths))
    n_params = sum(p.numel() for p in model.parameters())

    if args.stats_only:
        meta = json.loads(cfg_path.read_text())
        model = CifarResNet(stem=meta["architecture"]["stem"], widths=tuple(meta["architecture"]["widths"]))
        model.load_state_dict(load_file(str(w_path)))
        train_seconds = meta.get("train_seconds")
        previous_runs = meta.get("previous_runs", [])
        steps_done = meta.get("steps")
        cpu_seconds = meta.get("train_cpu_seconds")
    else:
        previous_runs = []
        if args.init_from is not None:
            model.load_state_dict(load_file(str(args.init_from)))
            prev_cfg = args.init_from.with_suffix(".json")
            if prev_cfg.is_file():
                prev = json.loads(prev_cfg.read_text())
                previous_runs = prev.get("previous_runs", []) + [
                    {k: prev.get(k) for k in ("training_command", "steps", "train_seconds", "train_cpu_seconds",
                                              "test_accuracy")}]
            print(f"initialised from {args.init_from} (test accuracy {accuracy(model, xte_u8, yte):.4f})", flush=True)
        print(f"model: {n_params} parameters, batch {args.batch_size}, "
              + (f"{args.time_budget_min} min budget" if args.time_budget_min else f"{args.epochs} epochs"), flush=True)
        x_train = to_float_nchw(xtr_u8)
        x_pad = F.pad(x_train, (4, 4, 4, 4), mode="reflect")
        y_train = torch.from_numpy(ytr.astype(np.int64))
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
        steps_per_epoch = len(y_train) // args.batch_size
        total = steps_per_epoch * args.epochs
        budget = None if args.time_budget_min is None else 60.0 * args.time_budget_min
        warm_frac = 0.1 if budget is not None else args.warmup_epochs / args.epochs

        def lr_factor(step: int, elapsed: float) -> float:
            frac = elapsed / budget if budget is not None else step / total
            return min((frac + 1e-3) / warm_frac, max(0.0, (1.0 - frac) / (1.0 - warm_frac)))

        gen = torch.Generator().manual_seed(args.seed)
        eval_idx = np.random.default_rng(args.seed).permutation(len(yte))[:2000]
        t0, c0, step, epoch, done = time.time(), time.process_time(), 0, 0, False
        while not done:
            model.train()
            perm = torch.randperm(len(y_train), generator=gen)
            n_ep = "?" if budget is not None else args.epochs
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{n_ep}", mininterval=10)
            loss_sum = correct = seen = 0
            for i in bar:
                factor = lr_factor(step, time.time() - t0)
                if (budget is not None and time.time() - t0 >= budget) or (budget is None and step >= total):
                    done = True
                    break
                for g in opt.param_groups:
                    g["lr"] = args.lr * factor
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
                xb, yb = augment(x_pad, idx, gen), y_train[idx]
                logits = model(xb)
                loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                loss_sum += loss.item() * len(yb)
                correct += (logits.argmax(1) == yb).sum().item()
                seen += len(yb)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{args.lr * factor:.3f}")
            bar.close()
            epoch += 1
            done = done or (budget is None and step >= total)
            if seen:
                test_acc = accuracy(model, xte_u8[eval_idx], yte[eval_idx])
                print(f"epoch {epoch} (step {step}): train loss {loss_sum / seen:.4f} train acc {correct / seen:.4f} "
                      f"test acc (2000 images) {test_acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
        print(f"trained {step} steps ({step * args.batch_size / len(y_train):.2f} epochs)", flush=True)
        steps_done = step
        train_seconds = time.time() - t0
        cpu_seconds = time.process_time() - c0
        model.eval()
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(w_path))

    model.eval()
    test_acc = accuracy(model, xte_u8, yte)
    print(f"test accuracy {test_acc:.4f}; computing train-set feature statistics ...", flush=True)
    feats = torch.cat([classifier_features(xtr_u8[i:i + 5000], model=model)
                       for i in tqdm(range(0, len(xtr_u8), 5000), desc="train features")])
    mu, sigma = feature_stats(feats)
    save_file({"mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}, str(stats_path),
              metadata={"source": "CIFAR-10 train (50000 images, JPEG-decoded by tgpq.eval.load_cifar10)",
                        "features": "tgpq.metrics.classifier.classifier_features", "count": str(len(feats))})
    meta = {
        "architecture": arch,
        "parameters": n_params,
        "feature_dim": model.feature_dim,
        "feature_layer": "global average pool of the last stage (input of the linear head)",
        "input": "float32 NCHW [B, 3, 32, 32] in [-1, 1]",
        "test_accuracy": round(test_acc, 4),
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "train_cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
        "steps": steps_done,
        "epochs_completed": None if steps_done is None else round(steps_done * args.batch_size / len(ytr), 2),
        "threads": args.threads,
        "training_command": "nice -n 10 python " + " ".join(shlex.quote(a) for a in sys.argv),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("out_dir", "stats_only")},
        "torch": torch.__version__,
        "previous_runs": previous_runs,
    }
    if args.stats_only and cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        meta["training_command"] = old.get("training_command", meta["training_command"])
        meta["hyperparameters"] = old.get("hyperparameters", meta["hyperparameters"])
        meta["threads"] = old.get("threads", meta["threads"])
    cfg_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
