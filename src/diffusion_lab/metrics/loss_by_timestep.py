"""The training loss by timestep bucket: where along the diffusion the model still errs."""

from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion_lab.utils.io import atomic_path


@torch.no_grad()
def loss_by_timestep(
    model: nn.Module, images: Tensor, generator: torch.Generator, buckets: int = 10, repeats: int = 4,
    class_labels: Tensor | None = None,
) -> Tensor:
    """Mean per-sample training loss of the model (its own draws of noise level and noise, `repeats` per image) on
    `model.encode(images)` within each of `buckets` equal ranges [k / buckets, (k + 1) / buckets) of the position
    u along the path that the process reports (DDPM: t / T); NaN where empty."""
    sums = torch.zeros(buckets, dtype=torch.float64, device=images.device)
    counts = torch.zeros_like(sums)
    for _ in range(repeats):
        losses, u = model.loss(model.encode(images, generator), generator, class_labels)
        bucket = (u * buckets).long().clamp(0, buckets - 1)
        sums.index_add_(0, bucket, losses.double())
        counts.index_add_(0, bucket, torch.ones_like(sums[bucket]))
    return (sums / counts).cpu()


def save_loss_by_timestep(losses: Tensor, path: str | Path, title: str = "") -> None:
    """A bar chart of `loss_by_timestep` (the PNG is written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = len(losses)
    width = 1 / buckets
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([(k + 0.5) * width for k in range(buckets)], losses.tolist(), width=0.9 * width)
    ax.set_xlabel("position along the process u (0 data, 1 noise; DDPM: t / T)")
    ax.set_ylabel("mean loss")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
