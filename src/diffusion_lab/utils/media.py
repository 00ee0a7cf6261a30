"""Images out of the model's world: uint8 arrays, grids, GIFs, the samples file, the forward-noising figure."""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from diffusion_lab.utils.io import atomic_path


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C), rounding (x + 1) * 127.5 to the nearest integer."""
    scaled = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


def grid_image(images: np.ndarray, nrow: int | None = None) -> Image.Image:
    """A PIL grid of uint8 (N, H, W, C) images, nrow per row (default: about square)."""
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    grid = make_grid(tensor, nrow=nrow, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None) -> None:
    with atomic_path(path) as tmp:
        grid_image(images, nrow).save(tmp, format="PNG")


def save_gif(frames: list[np.ndarray], path: str | Path, duration_ms: int = 80) -> None:
    """An animated GIF of uint8 (N, H, W, C) frames (each shown as one grid row), holding the last frame longer."""
    pictures = [grid_image(frame, nrow=len(frame)) for frame in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [1500]
    with atomic_path(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0)


def save_samples(images: np.ndarray, path: str | Path) -> None:
    """samples.npz: uint8 (N, H, W, C) under the key arr_0, the layout of the reference evaluators."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images)


def forward_noising_figure(alphas: Tensor, sigmas: Tensor, images: Tensor, path: str | Path, seed: int = 0) -> None:
    """Rows of x = alpha x_0 + sigma eps at the given noise levels, one row per image (tutorial 000's figure)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = images.to(torch.float64).cpu()
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    rows = [float(alpha) * x0 + float(sigma) * noise for alpha, sigma in zip(alphas, sigmas)]
    stacked = torch.stack(rows, dim=1).flatten(0, 1)  # image-major: each row is one image over timesteps
    save_grid(to_uint8(stacked), path, nrow=len(rows))
