"""The simple BatchNorm U-Net of tutorial 001: each block is conv3x3 -> ReLU -> BatchNorm, plus
ReLU(Linear(time embedding)) per channel, conv3x3 -> ReLU -> BatchNorm, then a 4x4 stride-2 conv (down) or
transposed conv (up); skips are concatenated on the way up.

The tutorial's up path (widths 256->128->64->64 after downs 64->128->256->256) does not line up with its
skips; here the up path mirrors the down path, so the block that leaves resolution r up-samples from the skip
of the block that entered it. Images whose size is not a multiple of 2**len(dims[1:]) (28x28 MNIST for the
default three halvings) are zero-padded up to the next multiple and the output cropped back.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.models.components.layers import ClassEmbedding, SinusoidalEmbedding
from diffusion_lab.utils.errors import ConfigError


class Block(nn.Module):
    """conv -> ReLU -> BN, + ReLU(Linear(emb)), conv -> ReLU -> BN, then resample by 2 (conv or transposed conv)."""

    def __init__(self, dim: int, dim_out: int, emb_dim: int, up: bool):
        super().__init__()
        self.emb_proj = nn.Linear(emb_dim, dim_out)
        self.conv1 = nn.Conv2d(2 * dim if up else dim, dim_out, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim_out)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim_out)
        self.resample = (nn.ConvTranspose2d if up else nn.Conv2d)(dim_out, dim_out, 4, 2, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.norm1(F.relu(self.conv1(x))) + F.relu(self.emb_proj(emb))[:, :, None, None]
        return self.resample(self.norm2(F.relu(self.conv2(h))))


class SimpleUNet(nn.Module):
    """dims[0] after a 3x3 input conv, then one down Block per following width (each halves the resolution) and
    the mirrored up Blocks; time embedding: sinusoidal(time_dim) -> Linear -> ReLU. `num_classes` adds a class
    embedding (index num_classes = "null") to the time embedding."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        dims: list[int] = (64, 128, 256, 256),
        time_dim: int = 256,
        out_channels: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if len(dims) < 2 or any(d < 1 for d in dims):
            raise ConfigError(f"model.dims={list(dims)} must be at least two positive widths")
        self.num_classes = num_classes
        self.multiple = 2 ** (len(dims) - 1)
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(time_dim), nn.Linear(time_dim, time_dim), nn.ReLU())
        self.class_emb = ClassEmbedding(num_classes, time_dim) if num_classes else None
        self.conv0 = nn.Conv2d(channels, dims[0], 3, padding=1)
        pairs = list(zip(dims[:-1], dims[1:]))
        self.downs = nn.ModuleList([Block(d, d_out, time_dim, up=False) for d, d_out in pairs])
        self.ups = nn.ModuleList([Block(d_out, d, time_dim, up=True) for d, d_out in reversed(pairs)])
        self.output = nn.Conv2d(dims[0], out_channels or channels, 1)

    def forward(self, x: Tensor, t: Tensor, *, x_self_cond: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(t)
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_labels, x.shape[0])
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.multiple, 0, -h % self.multiple))
        x = self.conv0(x)
        skips = []
        for down in self.downs:
            x = down(x, emb)
            skips.append(x)
        for up in self.ups:
            x = up(torch.cat([x, skips.pop()], dim=1), emb)
        return self.output(x)[..., :h, :w]
