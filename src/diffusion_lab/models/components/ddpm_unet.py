"""The CIFAR-10 U-Net of Ho et al. 2020 (Appendix B; tutorial 004): pre-activation ResNet blocks
(GroupNorm, Swish, 3x3 conv) with the time embedding added between the two convolutions and dropout before
the second, single-head self-attention at chosen levels, strided-conv downsampling, nearest-neighbour
upsampling, Xavier-uniform initialization with the last layer of each residual branch scaled by 1e-5.
With ch=128, ch_mult=[1, 2, 2, 2], attention at level 1 (16x16) and 2 blocks per level it has 35,746,307
parameters, as the paper's configuration."""

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from diffusion_lab.models.components.features import HiddenLayer
from diffusion_lab.models.components.layers import (
    ClassEmbedding, SinusoidalEmbedding, add_second_time, check_downsampling, check_groups, checkpointed,
)
from diffusion_lab.utils.errors import ConfigError


def xavier(module: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weights (scaled by gain), zero bias."""
    init.xavier_uniform_(module.weight, gain=gain)
    init.zeros_(module.bias)
    return module


class AttnBlock(nn.Module):
    """x + proj(softmax(q k^T / sqrt(C)) v), q, k, v 1x1 convs of GroupNorm(x) (Ho et al. 2020, App. B)."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.qkv = xavier(nn.Conv2d(dim, dim * 3, 1))
        self.proj = xavier(nn.Conv2d(dim, dim, 1), gain=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """h = conv(Dropout(Swish(GN(conv(Swish(GN(x))) + Linear(Swish(emb)))))); out = h + skip(x), then attention."""

    def __init__(self, dim: int, dim_out: int, emb_dim: int, dropout: float, groups: int, attn: bool):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(groups, dim), nn.SiLU(), xavier(nn.Conv2d(dim, dim_out, 3, padding=1)))
        self.emb_proj = nn.Sequential(nn.SiLU(), xavier(nn.Linear(emb_dim, dim_out)))
        self.block2 = nn.Sequential(
            nn.GroupNorm(groups, dim_out), nn.SiLU(), nn.Dropout(dropout),
            xavier(nn.Conv2d(dim_out, dim_out, 3, padding=1), gain=1e-5),
        )
        self.skip = xavier(nn.Conv2d(dim, dim_out, 1)) if dim != dim_out else nn.Identity()
        self.attn = AttnBlock(dim_out, groups) if attn else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.block1(x) + self.emb_proj(emb)[:, :, None, None]
        return self.attn(self.block2(h) + self.skip(x))


def time_embedding(ch: int, emb_dim: int) -> nn.Sequential:
    """Sinusoidal time features of width ch -> Linear -> Swish -> Linear to emb_dim (Xavier-initialised)."""
    return nn.Sequential(SinusoidalEmbedding(ch), xavier(nn.Linear(ch, emb_dim)), nn.SiLU(), xavier(nn.Linear(emb_dim, emb_dim)))


class DDPMUNet(nn.Module):
    """Widths ch * ch_mult; the resolution halves between levels (len(ch_mult) - 1 times); num_res_blocks
    ResBlocks per level going down and num_res_blocks + 1 going up; attention at the levels in attn_levels
    (level 1 is 16x16 for 32x32 inputs). `num_classes` adds a class embedding (index num_classes = "null") to
    the time embedding. `gradient_checkpointing` recomputes each ResBlock in the backward pass while training.
    `second_time` embeds a second time (a flow map's t - r or a shortcut's step size) as the first and adds it to the
    time embedding (`add_second_time`; off: the parameters and state-dict keys are those without)."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        ch: int = 128,
        ch_mult: list[int] = (1, 2, 2, 2),
        attn_levels: list[int] = (1,),
        num_res_blocks: int = 2,
        dropout: float = 0.1,
        norm_groups: int = 32,
        out_channels: int | None = None,
        num_classes: int | None = None,
        gradient_checkpointing: bool = False,
        second_time: bool = False,
    ):
        super().__init__()
        if ch < 1 or not ch_mult or any(m < 1 for m in ch_mult) or num_res_blocks < 1:
            raise ConfigError(
                f"model.ch={ch}, model.ch_mult={list(ch_mult)}, model.num_res_blocks={num_res_blocks} must be positive"
            )
        bad = [i for i in attn_levels if not 0 <= i < len(ch_mult)]
        if bad:
            raise ConfigError(f"model.attn_levels={list(attn_levels)}: levels {bad} do not exist; allowed: 0..{len(ch_mult) - 1}")
        check_downsampling("ddpm_unet", image_size, len(ch_mult) - 1)
        check_groups("ddpm_unet", "norm_groups", norm_groups, [ch * m for m in ch_mult])
        self.num_classes, self.gradient_checkpointing = num_classes, gradient_checkpointing
        self.image_size = image_size
        emb_dim = ch * 4
        self.time_emb = time_embedding(ch, emb_dim)
        self.second_time_emb = time_embedding(ch, emb_dim) if second_time else None
        self.class_emb = ClassEmbedding(num_classes, emb_dim) if num_classes else None
        block = lambda d, d_out, level: ResBlock(d, d_out, emb_dim, dropout, norm_groups, level in attn_levels)  # noqa: E731

        self.head = xavier(nn.Conv2d(channels, ch, 3, padding=1))
        self.down = nn.ModuleList()
        skips, now = [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(now, ch * mult, level))
                now = ch * mult
                skips.append(now)
            if level != len(ch_mult) - 1:
                self.down.append(xavier(nn.Conv2d(now, now, 3, stride=2, padding=1)))
                skips.append(now)
        self.middle = nn.ModuleList([ResBlock(now, now, emb_dim, dropout, norm_groups, True),
                                     ResBlock(now, now, emb_dim, dropout, norm_groups, False)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(skips.pop() + now, ch * mult, level))
                now = ch * mult
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             xavier(nn.Conv2d(now, now, 3, padding=1))))
        self.tail = nn.Sequential(
            nn.GroupNorm(norm_groups, now), nn.SiLU(),
            xavier(nn.Conv2d(now, out_channels or channels, 3, padding=1), gain=1e-5),
        )

    def hidden_layers(self) -> list[HiddenLayer]:
        """The ResBlocks of the down path, then the two middle ones, in order (`features.HiddenStates`), each at the
        grid of its level (image_size halved by every strided conv before it)."""
        layers, grid = [], self.image_size
        for layer in self.down:
            if isinstance(layer, ResBlock):
                layers.append(HiddenLayer(layer, layer.block2[-1].out_channels, grid))
            else:
                grid //= 2
        return layers + [HiddenLayer(block, block.block2[-1].out_channels, grid) for block in self.middle]

    def forward(self, x: Tensor, t: Tensor, *, x_self_cond: Tensor | None = None, class_labels: Tensor | None = None,
                second_time: Tensor | None = None) -> Tensor:
        emb = add_second_time(self.time_emb(t), self.second_time_emb, second_time, "ddpm_unet")
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_labels, x.shape[0])
        run = partial(checkpointed, self.gradient_checkpointing and self.training)
        h = self.head(x)
        hs = [h]
        for layer in self.down:
            h = run(layer, h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = run(layer, h, emb)
        for layer in self.up:
            h = run(layer, torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.tail(h)
