"""Plot what gac learned: sample weight against timestep, one line per block."""
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


def plot_sample_weights(qstate, path) -> Path:
    """Write a PNG of relative sample weight vs timestep for every block of ``qstate.sample_weights``.

    Raises ``ValueError`` when ``qstate`` has no sample weights (only ``method="gac"`` learns them).
    """
    if not qstate.sample_weights:
        raise ValueError("qstate has no sample weights: only method='gac' learns them")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = list(qstate.sample_weights)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for k, b in enumerate(blocks):
        t, rel = weight_per_timestep(qstate.sample_weights[b])
        ax.plot(t.numpy(), rel.numpy(), color=cmap(k / max(1, len(blocks) - 1)), lw=1, alpha=0.8,
                label=b if len(blocks) <= 12 else None)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("timestep")
    ax.set_ylabel("weight / uniform weight")
    ax.set_title(f"gac sample weights ({len(blocks)} blocks, colour = block depth)")
    if len(blocks) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
