"""Plot what gac learned: sample weight per timestep group and per timestep, for every block."""
from __future__ import annotations

from pathlib import Path

import torch


def weight_per_timestep(sample_weights: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps int64 [S], relative weight float32 [S])`` for one block's record.

    The relative weight of a timestep is the total weight of its samples divided by their
    uniform share (``count / N``): 1 everywhere means uniform weighting.
    """
    t, w = sample_weights["timesteps"], sample_weights["weights"].double()
    uniq, inv = torch.unique(t, return_inverse=True)
    total = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, w)
    count = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(w))
    return uniq, (total / (count / w.numel())).float()


def weight_per_group(sample_weights: dict, timestep_to_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """float32 ``[num_groups]``: each timestep group's total weight over its uniform share (NaN: no sample)."""
    t, w = sample_weights["timesteps"], sample_weights["weights"].double()
    g = timestep_to_group.cpu()[t.clamp(0, timestep_to_group.numel() - 1)]
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, w)
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, torch.ones_like(w))
    rel = total / (count / w.numel())
    rel[count == 0] = float("nan")
    return rel.float()


def plot_sample_weights(qstate, path) -> Path:
    """Write a PNG of what gac learned in ``qstate.sample_weights``.

    Left: a heat map of every block's relative weight per timestep group (``weight_per_group``;
    1 = uniform, log colour scale). Right: relative weight against timestep, one line per block.
    Raises ``ValueError`` when ``qstate`` has no sample weights (only ``method="gac"`` learns them).
    """
    if not qstate.sample_weights:
        raise ValueError("qstate has no sample weights: only method='gac' learns them")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = list(qstate.sample_weights)
    G = qstate.config.num_groups
    table = torch.stack([weight_per_group(qstate.sample_weights[b], qstate.timestep_to_group, G) for b in blocks])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, max(4.5, 0.28 * len(blocks) + 1.5)), dpi=110,
                                   gridspec_kw={"width_ratios": [1, 1.4]})
    finite = table[torch.isfinite(table)]
    span = float(max(finite.max(), 1 / finite.min())) if finite.numel() else 2.0
    span = max(span, 1.25)
    im = ax0.imshow(table.numpy(), aspect="auto", cmap="RdBu_r", norm=LogNorm(vmin=1 / span, vmax=span))
    for i in range(table.shape[0]):
        for j in range(G):
            v = float(table[i, j])
            if v == v:
                ax0.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    ax0.set_xticks(range(G), [f"g{j}" for j in range(G)])
    ax0.set_yticks(range(len(blocks)), blocks, fontsize=6)
    ax0.set_xlabel("timestep group (g0 = lowest t)")
    ax0.set_title("group weight / uniform share", fontsize=9)
    fig.colorbar(im, ax=ax0, fraction=0.04)
    cmap = plt.get_cmap("viridis")
    for k, b in enumerate(blocks):
        t, rel = weight_per_timestep(qstate.sample_weights[b])
        ax1.plot(t.numpy(), rel.numpy(), color=cmap(k / max(1, len(blocks) - 1)), lw=1, alpha=0.8,
                 label=b if len(blocks) <= 12 else None)
    ax1.axhline(1.0, color="k", ls="--", lw=0.8)
    ax1.set_xlabel("timestep")
    ax1.set_ylabel("weight / uniform weight")
    ax1.set_title(f"gac sample weights per timestep ({len(blocks)} blocks, colour = block depth)", fontsize=9)
    if len(blocks) <= 12:
        ax1.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
