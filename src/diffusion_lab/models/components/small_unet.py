"""The small LayerNorm U-Net of tutorial 003, built for 28x28 images: three levels (28, 14, 7) and a 3x3
bottleneck of three blocks each, a block being LayerNorm over (C, H, W) -> conv3x3 -> SiLU -> conv3x3 -> SiLU;
each level adds its own time embedding MLP(sinusoidal(t)) to its input, one value per input channel."""

import torch
from torch import Tensor, nn

from diffusion_lab.models.components.layers import ClassEmbedding, SinusoidalEmbedding
from diffusion_lab.utils.errors import ConfigError


class Block(nn.Module):
    """LayerNorm([C, H, W]) (optional) -> conv3x3 -> SiLU -> conv3x3 -> SiLU."""

    def __init__(self, dim: int, dim_out: int, size: int, normalize: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm([dim, size, size]) if normalize else nn.Identity()
        self.conv1 = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.act(self.conv1(self.norm(x)))))


class Level(nn.Module):
    """x + MLP(emb) per channel, then three Blocks dims[0] -> dims[1] -> dims[2] -> dims[3] at one resolution."""

    def __init__(self, dims: list[int], size: int, emb_dim: int, normalize_last: bool = True):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, dims[0]), nn.SiLU(), nn.Linear(dims[0], dims[0]))
        self.blocks = nn.Sequential(
            Block(dims[0], dims[1], size), Block(dims[1], dims[2], size), Block(dims[2], dims[3], size, normalize_last)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.blocks(x + self.time_mlp(emb)[:, :, None, None])


class SmallUNet(nn.Module):
    """Widths dim, 2 dim, 4 dim at 28, 14, 7 (tutorial: dim=10); downsampling 28->14->7 by 4x4 stride-2 convs and
    7->6->3 by a 2x2 conv then a 4x4 stride-2 conv, upsampling by the transposed convs. `num_classes` adds a
    class embedding (index num_classes = "null") to the sinusoidal time embedding."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        dim: int = 10,
        time_emb_dim: int = 100,
        out_channels: int | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if image_size != 28:
            raise ConfigError(
                f"model=small_unet is built for 28x28 images (LayerNorm shapes and its 28->14->7->3 path are fixed), "
                f"but data.image_size={image_size}; use data.image_size=28 or another model (unet_attn, ddpm_unet, simple_unet)"
            )
        if dim < 1:
            raise ConfigError(f"model.dim={dim} must be positive")
        d1, d2, d4 = dim, 2 * dim, 4 * dim
        self.num_classes = num_classes
        self.time_emb = SinusoidalEmbedding(time_emb_dim)
        self.class_emb = ClassEmbedding(num_classes, time_emb_dim) if num_classes else None
        self.level1 = Level([channels, d1, d1, d1], 28, time_emb_dim)
        self.down1 = nn.Conv2d(d1, d1, 4, 2, 1)
        self.level2 = Level([d1, d2, d2, d2], 14, time_emb_dim)
        self.down2 = nn.Conv2d(d2, d2, 4, 2, 1)
        self.level3 = Level([d2, d4, d4, d4], 7, time_emb_dim)
        self.down3 = nn.Sequential(nn.Conv2d(d4, d4, 2, 1), nn.SiLU(), nn.Conv2d(d4, d4, 4, 2, 1))
        self.bottleneck = Level([d4, d2, d2, d4], 3, time_emb_dim)
        self.up3 = nn.Sequential(nn.ConvTranspose2d(d4, d4, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(d4, d4, 2, 1))
        self.level4 = Level([2 * d4, d4, d2, d2], 7, time_emb_dim)
        self.up2 = nn.ConvTranspose2d(d2, d2, 4, 2, 1)
        self.level5 = Level([2 * d2, d2, d1, d1], 14, time_emb_dim)
        self.up1 = nn.ConvTranspose2d(d1, d1, 4, 2, 1)
        self.level6 = Level([2 * d1, d1, d1, d1], 28, time_emb_dim, normalize_last=False)
        self.conv_out = nn.Conv2d(d1, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, *, x_self_cond: Tensor | None = None, class_labels: Tensor | None = None) -> Tensor:
        emb = self.time_emb(t)
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_labels, x.shape[0])
        h1 = self.level1(x, emb)
        h2 = self.level2(self.down1(h1), emb)
        h3 = self.level3(self.down2(h2), emb)
        h = self.bottleneck(self.down3(h3), emb)
        h = self.level4(torch.cat([h3, self.up3(h)], dim=1), emb)
        h = self.level5(torch.cat([h2, self.up2(h)], dim=1), emb)
        h = self.level6(torch.cat([h1, self.up1(h)], dim=1), emb)
        return self.conv_out(h)
