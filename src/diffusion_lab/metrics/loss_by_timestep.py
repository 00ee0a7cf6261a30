"""The training loss by timestep bucket: where along the diffusion the model still errs."""

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_lab.utils.io import atomic_path


@torch.no_grad()
def loss_by_timestep(
    process: nn.Module, net: nn.Module, x0: Tensor, generator: torch.Generator, buckets: int = 10, repeats: int = 4, **net_kwargs
) -> Tensor:
    """Mean per-sample loss of `process.training_losses` (its own t ~ U{0..T-1} and noise, `repeats` draws per
    image) within each of `buckets` equal timestep ranges [k T / buckets, (k + 1) T / buckets); NaN where empty."""
    sums = torch.zeros(buckets, dtype=torch.float64, device=x0.device)
    counts = torch.zeros_like(sums)
    for _ in range(repeats):
        losses, t = process.training_losses(net, x0, generator, **net_kwargs)
        bucket = t * buckets // process.num_timesteps
        sums.index_add_(0, bucket, losses.double())
        counts.index_add_(0, bucket, torch.ones_like(sums[bucket]))
    return (sums / counts).cpu()


def save_loss_by_timestep(losses: Tensor, num_timesteps: int, path: str | Path, title: str = "") -> None:
    """A bar chart of `loss_by_timestep` (the PNG is written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = len(losses)
    width = num_timesteps / buckets
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([(k + 0.5) * width for k in range(buckets)], losses.tolist(), width=0.9 * width)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("mean loss")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
