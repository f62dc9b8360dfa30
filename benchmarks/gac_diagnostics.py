"""gac diagnostics on the reference model: look-ahead, matching term, weight stability, cost.

For each bit width, at ``QuantConfig``'s defaults (``iters`` etc.) on one calibration set
(``collect_calibration`` defaults: 100-step DDIM, every 5th step kept; ``--traj`` trajectories;
seed 1000), it calibrates ``uniform`` and ``gac`` once per ``--seeds`` entry (``QuantConfig.seed``:
only the mini-batch order changes) and reports, per block:

* look-ahead: ``max_t L_t(theta*) / L_t(theta)`` over every refresh (issue #13 item 1: <= 1.5);
* matching term: the ratio of its logit-gradient norm to the validation term's, per refresh
  (min / median / max; item 2);
* seed-to-seed Pearson correlation of the learned log-weights ``log w_i`` between the first two
  seeds, and of the per-timestep relative weights (item 3); the mean weight of every timestep group;
* block output MSE (training set) of gac and uniform, and calibration wall / CPU time (item 5:
  gac / uniform <= 1.3 at the defaults). Runs are interleaved (uniform, gac, uniform, gac, ...)
  so that load from other processes hits both alike.

Writes ``<out>.json``, ``<out>.md`` and ``<out>_<bits>_weights.png`` (``plot_sample_weights`` of
the first gac run). Every finished run is cached under ``--cache`` (``runs/gac_diagnostics``; rerun to
resume).

    nice -n 5 python benchmarks/gac_diagnostics.py --threads 2
    python benchmarks/gac_diagnostics.py --quick        # seconds-scale smoke run
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import tgpq
except ImportError:  # a checkout without installing
    sys.path.insert(0, str(HERE.parent))
    import tgpq

from tgpq import QuantConfig  # noqa: E402
from tgpq.recipe import parse_bits  # noqa: E402


def collect(unet, a):
    from diffusers import DDIMScheduler

    return tgpq.collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=a.traj,
                                                num_steps=a.calib_steps, interval=a.interval, seed=1000,
                                                progress=False)


def config(a, bits: str, method: str, seed: int, **over) -> QuantConfig:
    wb, ab = parse_bits(bits)
    kw = dict(weight_bits=wb, act_bits=ab, method=method, seed=seed)
    if a.iters is not None:
        kw["iters"] = a.iters
    kw.update(over)
    return QuantConfig(**kw)


def run_one(unet, calib, cfg: QuantConfig, cache: Path) -> dict:
    """Calibrate (or load the cached record): timings, block MSEs, sample weights, gac records."""
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    w0, c0 = time.perf_counter(), time.process_time()
    q = tgpq.calibrate(unet, calib, cfg, progress=False)
    rec = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "block_mse": q.block_mse,
           "sample_weights": q.sample_weights, "gac": q.meta.get("gac"), "units": q.meta["units"],
           "timestep_to_group": q.timestep_to_group, "config": cfg.to_dict()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rec, cache)
    return rec


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    d = float(a.norm() * b.norm())
    return float((a * b).sum()) / d if d > 0 else float("nan")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def block_rows(uni: list, gac: list, num_groups: int) -> list:
    from tgpq.calibration.plot import weight_per_group, weight_per_timestep

    rows = []
    g0 = gac[0]
    for b in g0["units"]:
        recs = g0["gac"][b]
        look = [max(r["val_loss_ratio"]) for r in recs]
        gm_ratio = [r["grad_norm_gm"] / r["grad_norm_val"] for r in recs if r.get("grad_norm_val")]
        row = {"block": b, "refreshes": len(recs),
               "lookahead_max_ratio": max(look) if look else None,
               "lookahead_min_ratio": min(min(r["val_loss_ratio"]) for r in recs) if recs else None,
               "gm_over_val_min": min(gm_ratio) if gm_ratio else None,
               "gm_over_val_median": median(gm_ratio) if gm_ratio else None,
               "gm_over_val_max": max(gm_ratio) if gm_ratio else None,
               "gm_value_last": recs[-1].get("gm") if recs else None,
               "group_weight": weight_per_group(g0["sample_weights"][b], g0["timestep_to_group"], num_groups).tolist(),
               "mse_uniform": [u["block_mse"][b]["final"] for u in uni],
               "mse_gac": [g["block_mse"][b]["final"] for g in gac],
               "mse_rtn": uni[0]["block_mse"][b]["rtn"]}
        if len(gac) >= 2:
            w0, w1 = g0["sample_weights"][b]["weights"], gac[1]["sample_weights"][b]["weights"]
            row["seed_corr_logw"] = pearson(w0.log(), w1.log())
            row["seed_corr_timestep"] = pearson(weight_per_timestep(g0["sample_weights"][b])[1],
                                                weight_per_timestep(gac[1]["sample_weights"][b])[1])
        rows.append(row)
    return rows


def fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# gac diagnostics: {s['model']}", "",
             f"Calibration set: {s['calibration']}. QuantConfig defaults except bits and seed ({s['config_note']}); "
             f"seeds {s['seeds']} (mini-batch order only); {s['threads']} threads, {s['device']}, torch {s['torch']}, "
             f"{s['date']}, commit {s['git_commit']}.", ""]
    for bits, part in doc["bits"].items():
        t = part["timing"]
        lines += [f"## {bits}", "",
                  f"Wall time per calibration: uniform {' / '.join(f'{x:.0f}' for x in t['uniform_wall_s'])} s, "
                  f"gac {' / '.join(f'{x:.0f}' for x in t['gac_wall_s'])} s: **gac / uniform = "
                  f"{t['wall_ratio']:.2f}** (CPU time ratio {t['cpu_ratio']:.2f}).",
                  f"Seed-to-seed correlation of log-weights: median {fmt(part['summary']['seed_corr_logw_median'])}, "
                  f"min {fmt(part['summary']['seed_corr_logw_min'])} (gm_lambda = 0: median "
                  f"{fmt(part['summary'].get('seed_corr_logw_gm0_median'))}); look-ahead ratio max over all blocks "
                  f"{fmt(part['summary']['lookahead_max'])}; mean block MSE gac / uniform "
                  f"{fmt(part['summary']['mse_ratio_mean'])}.", "",
                  "| block | look-ahead max L(θ*)/L(θ) | GM / val grad norm (min / median / max) | seed corr log w | "
                  "seed corr log w (gm_lambda 0) | seed corr per timestep | group weight g0..g4 | MSE gac / uniform |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in part["blocks"]:
            mg, mu = sum(r["mse_gac"]) / len(r["mse_gac"]), sum(r["mse_uniform"]) / len(r["mse_uniform"])
            lines.append(f"| {r['block']} | {fmt(r['lookahead_max_ratio'])} | {fmt(r['gm_over_val_min'], '.2f')} / "
                         f"{fmt(r['gm_over_val_median'], '.2f')} / {fmt(r['gm_over_val_max'], '.2f')} | "
                         f"{fmt(r.get('seed_corr_logw'), '.2f')} | {fmt(r.get('seed_corr_logw_gm0'), '.2f')} | "
                         f"{fmt(r.get('seed_corr_timestep'), '.2f')} | "
                         f"{' '.join(fmt(v, '.2f') for v in r['group_weight'])} | {mg / mu:.3f} |")
        lines.append("")
    lines += [f"Command: `{s['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", nargs="+", default=["W4A8", "W8A8"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--traj", type=int, default=16)
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--iters", type=int, default=None, help="QuantConfig.iters (default: QuantConfig's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gm0-bits", nargs="*", default=["W4A8"],
                   help="bit widths for which gac with gm_lambda = 0 is also run per seed (seed correlation)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 trajectories x 10 steps, 4 iterations")
    p.add_argument("--out", default=str(HERE / "results" / "gac_diagnostics"))
    p.add_argument("--cache", default=str(HERE.parent / "runs" / "gac_diagnostics"),
                   help="folder of the finished calibrations (rerun to resume)")
    a = p.parse_args(argv)
    if a.quick:
        a.traj, a.calib_steps, a.interval, a.iters = 2, 10, 1, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    from bench_sampling import git_commit
    from calibration_quality import load_model

    out = Path(a.out)
    runs = Path(a.cache)
    unet, model_desc = load_model()
    calib = collect(unet, a)
    doc = {"settings": {
        "model": model_desc, "calibration": f"{len(calib)} training + {calib.val_x.shape[0]} validation samples "
        f"({a.traj} trajectories x {calib.kept_timesteps.numel()} kept steps of {a.calib_steps}-step DDIM)",
        "config_note": f"iters {config(a, 'W8A8', 'gac', 0).iters}, batch {QuantConfig().batch_size}",
        "seeds": a.seeds, "threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git_commit": git_commit(),
        "command": "python benchmarks/gac_diagnostics.py " + " ".join(argv if argv is not None else sys.argv[1:])},
        "bits": {}}
    for bits in a.bits:
        uni, gac, gm0 = [], [], []
        for seed in a.seeds:  # interleaved, so that load from other processes hits both methods alike
            uni.append(run_one(unet, calib, config(a, bits, "uniform", seed), runs / f"{bits}-uniform-{seed}.pt"))
            gac.append(run_one(unet, calib, config(a, bits, "gac", seed), runs / f"{bits}-gac-{seed}.pt"))
            print(f"{bits} seed {seed}: uniform {uni[-1]['wall_s']:.0f} s, gac {gac[-1]['wall_s']:.0f} s", flush=True)
        if bits in (a.gm0_bits or []):
            for seed in a.seeds:
                gm0.append(run_one(unet, calib, config(a, bits, "gac", seed, gm_lambda=0.0),
                                   runs / f"{bits}-gac_gm0-{seed}.pt"))
        rows = block_rows(uni, gac, QuantConfig().num_groups)
        if len(gm0) >= 2:
            for r, b in zip(rows, gac[0]["units"]):
                r["seed_corr_logw_gm0"] = pearson(gm0[0]["sample_weights"][b]["weights"].log(),
                                                  gm0[1]["sample_weights"][b]["weights"].log())
                r["mse_gac_gm0"] = [g["block_mse"][b]["final"] for g in gm0]
        corr = [r["seed_corr_logw"] for r in rows if "seed_corr_logw" in r]
        mse_ratio = [sum(r["mse_gac"]) / sum(r["mse_uniform"]) for r in rows]
        timing = {"uniform_wall_s": [u["wall_s"] for u in uni], "gac_wall_s": [g["wall_s"] for g in gac],
                  "uniform_cpu_s": [u["cpu_s"] for u in uni], "gac_cpu_s": [g["cpu_s"] for g in gac]}
        timing["wall_ratio"] = sum(timing["gac_wall_s"]) / sum(timing["uniform_wall_s"])
        timing["cpu_ratio"] = sum(timing["gac_cpu_s"]) / sum(timing["uniform_cpu_s"])
        looks = [r["lookahead_max_ratio"] for r in rows if r["lookahead_max_ratio"] is not None]
        corr0 = [r["seed_corr_logw_gm0"] for r in rows if "seed_corr_logw_gm0" in r]
        doc["bits"][bits] = {"timing": timing, "blocks": rows, "summary": {
            "seed_corr_logw_median": median(corr) if corr else None, "seed_corr_logw_min": min(corr) if corr else None,
            "seed_corr_logw_gm0_median": median(corr0) if corr0 else None,
            "lookahead_max": max(looks) if looks else None, "mse_ratio_mean": sum(mse_ratio) / len(mse_ratio)}}
        from tgpq.calibration.plot import plot_sample_weights
        from tgpq.recipe import QuantState

        qs = QuantState(config=QuantConfig.from_dict(gac[0]["config"]), timestep_to_group=gac[0]["timestep_to_group"],
                        sample_weights=gac[0]["sample_weights"])
        plot_sample_weights(qs, out.parent / f"{out.name}_{bits}_weights.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
