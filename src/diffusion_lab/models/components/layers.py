"""Layers shared by the backbones."""

import math

import torch
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError


class SinusoidalEmbedding(nn.Module):
    """emb(t)_i = sin(t w_i) for i < d/2 and cos(t w_{i-d/2}) after, w_i = 10000^(-i/(d/2-1))
    (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020, Appendix B)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ConfigError(f"the time embedding width {dim} must be an even number >= 4")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def check_downsampling(model: str, image_size: int, levels: int) -> None:
    """A U-Net that halves the resolution `levels` times needs image_size divisible by 2**levels."""
    if image_size % (2**levels):
        raise ConfigError(
            f"model={model} halves the resolution {levels} times, so data.image_size={image_size} must be divisible "
            f"by {2**levels}; change data.image_size or the number of levels"
        )


def check_groups(model: str, key: str, groups: int, widths: list[int]) -> None:
    """GroupNorm needs every channel width divisible by the number of groups."""
    bad = [w for w in widths if w % groups]
    if bad:
        raise ConfigError(f"model.{key}={groups} must divide every channel width of model={model}; it does not divide {bad}")
