"""The attention U-Net of tutorial 000 (after Ho et al. 2020 and lucidrains' denoising-diffusion-pytorch):
weight-standardized conv + GroupNorm ResNet blocks with time scale/shift, linear attention at every level,
full attention in the middle, pixel-unshuffle downsampling and nearest-neighbour upsampling."""

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffusion_lab.models.components.cross_attention import CrossAttention
from diffusion_lab.models.components.features import HiddenLayer
from diffusion_lab.models.components.layers import (
    ClassEmbedding, SinusoidalEmbedding, add_second_time, check_downsampling, check_groups, checkpointed, labels_or_null,
)
from diffusion_lab.utils.errors import ConfigError


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv with W_hat = (W - mean(W)) / sqrt(var(W) + eps) per output channel (Qiao et al. 2019)."""

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        weight = (self.weight - mean) * (var + eps).rsqrt()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Block(nn.Module):
    """WS-conv 3x3 -> GroupNorm -> (x (scale + 1) + shift) -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two Blocks with the embedding as scale/shift of the first, plus a 1x1-conv skip."""

    def __init__(self, dim: int, dim_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale_shift = self.mlp(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """softmax_d(Q) (softmax_n(K)^T V): attention linear in the number of pixels (Shen et al. 2021)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        hidden = dim_head * heads
        self.norm = nn.GroupNorm(1, dim)
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = (rearrange(t, "b (h c) x y -> b h c (x y)", h=self.heads) for t in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("b h d n, b h e n -> b h d e", k, v)
        out = torch.einsum("b h d e, b h d n -> b h e n", context, q)
        out = rearrange(out, "b h c (x y) -> b (h c) x y", x=h, y=w)
        return x + self.to_out(out)


class Attention(nn.Module):
    """Multi-head softmax(Q K^T / sqrt(d)) V over all pixels (Vaswani et al. 2017), pre-normed, residual."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        hidden = dim_head * heads
        self.norm = nn.GroupNorm(1, dim)
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = (rearrange(t, "b (h c) x y -> b h (x y) c", h=self.heads) for t in self.to_qkv(self.norm(x)).chunk(3, dim=1))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.to_out(rearrange(out, "b h (x y) c -> b (h c) x y", x=h, y=w))


def downsample(dim: int, dim_out: int) -> nn.Module:
    """Pixel-unshuffle (space-to-depth, no information lost) then a 1x1 conv."""
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


def upsample(dim: int, dim_out: int) -> nn.Module:
    """Nearest-neighbour x2 then a 3x3 conv."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


def down_levels(in_out: list[tuple[int, int]], block: Callable, attn: Callable) -> nn.ModuleList:
    """Per level (width d_in -> d_out): two ResNet blocks, linear attention, then downsampling (a 3x3 conv to d_out
    at the last level, which keeps the resolution)."""
    last = len(in_out) - 1
    return nn.ModuleList(
        nn.ModuleList([block(d_in, d_in), block(d_in, d_in), attn(d_in),
                       nn.Conv2d(d_in, d_out, 3, padding=1) if i == last else downsample(d_in, d_out)])
        for i, (d_in, d_out) in enumerate(in_out))


def up_levels(in_out: list[tuple[int, int]], block: Callable, attn: Callable) -> nn.ModuleList:
    """The levels of `down_levels` in reverse: two ResNet blocks over (x, skip), linear attention, upsampling."""
    last = len(in_out) - 1
    return nn.ModuleList(
        nn.ModuleList([block(d_out + d_in, d_out), block(d_out + d_in, d_out), attn(d_out),
                       nn.Conv2d(d_out, d_in, 3, padding=1) if i == last else upsample(d_out, d_in)])
        for i, (d_in, d_out) in enumerate(reversed(in_out)))


def time_mlp(dim: int, emb_dim: int) -> nn.Sequential:
    """Sinusoidal time features of width dim -> Linear -> GELU -> Linear to emb_dim."""
    return nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))


class UnetAttn(nn.Module):
    """U-Net with widths dim * dim_mults; the resolution halves between levels (len(dim_mults) - 1 times).
    `self_condition` adds the previous x_0 estimate as extra input channels (Chen et al. 2023, analog bits);
    `num_classes` adds a class embedding (with one extra "null" class for classifier-free guidance) to the
    time embedding; with a `context_encoder` (a factory called with num_classes, e.g. a partial `ClassTokens`)
    the classes enter instead as a context sequence (B, L, D) that cross-attention blocks after every attention
    attend to (Rombach et al. 2022, Sec. 3.3). `gradient_checkpointing` recomputes each ResNet, attention and
    cross-attention block in the backward pass while training. `second_time` embeds a second time (a flow map's t - r
    or a shortcut's step size) as the first and adds it to the time embedding (`add_second_time`; off: the parameters
    and state-dict keys are those without)."""

    def __init__(
        self,
        dim: int,
        dim_mults: list[int],
        channels: int,
        image_size: int,
        out_channels: int | None = None,
        resnet_block_groups: int = 4,
        self_condition: bool = False,
        num_classes: int | None = None,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        context_encoder: Callable[..., nn.Module] | None = None,
        gradient_checkpointing: bool = False,
        second_time: bool = False,
    ):
        super().__init__()
        if dim < 1 or not dim_mults or any(m < 1 for m in dim_mults):
            raise ConfigError(f"model.dim={dim} and model.dim_mults={list(dim_mults)} must be positive")
        check_downsampling("unet_attn", image_size, len(dim_mults) - 1)
        dims = [dim, *(dim * m for m in dim_mults)]
        check_groups("unet_attn", "resnet_block_groups", resnet_block_groups, dims)
        self.channels, self.self_condition, self.num_classes = channels, self_condition, num_classes
        self.image_size = image_size
        self.out_channels, self.gradient_checkpointing = out_channels or channels, gradient_checkpointing
        emb_dim = dim * 4
        block = partial(ResnetBlock, emb_dim=emb_dim, groups=resnet_block_groups)
        attn = partial(LinearAttention, heads=attn_heads, dim_head=attn_dim_head)

        self.init_conv = nn.Conv2d(channels * (2 if self_condition else 1), dim, 1)
        self.time_mlp = time_mlp(dim, emb_dim)
        self.second_time_mlp = time_mlp(dim, emb_dim) if second_time else None
        if context_encoder is not None and not num_classes:
            raise ConfigError("model.context_encoder encodes class labels: it needs data.conditional=true")
        self.context_encoder = context_encoder(num_classes=num_classes) if context_encoder is not None else None
        self.class_emb = ClassEmbedding(num_classes, emb_dim) if num_classes and context_encoder is None else None

        in_out = list(zip(dims[:-1], dims[1:]))
        self.downs = down_levels(in_out, block, attn)
        self.mid_block1 = block(dims[-1], dims[-1])
        self.mid_attn = Attention(dims[-1], heads=attn_heads, dim_head=attn_dim_head)
        self.mid_block2 = block(dims[-1], dims[-1])
        self.ups = up_levels(in_out, block, attn)
        self.final_block = block(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, self.out_channels, 1)
        self.add_cross_attention(in_out, attn_heads, attn_dim_head)

    def add_cross_attention(self, in_out: list[tuple[int, int]], heads: int, dim_head: int) -> None:
        """Cross-attention after every attention, kept apart from downs / ups (empty without a context encoder, so
        the parameters and state-dict keys of a model without it are unchanged)."""
        with_cross = self.context_encoder is not None
        if with_cross:
            cross = partial(CrossAttention, context_dim=self.context_encoder.dim, heads=heads, dim_head=dim_head)
        self.down_cross = nn.ModuleList([cross(d_in) for d_in, _ in in_out] if with_cross else [])
        self.mid_cross = cross(in_out[-1][1]) if with_cross else None
        self.up_cross = nn.ModuleList([cross(d_out) for _, d_out in reversed(in_out)] if with_cross else [])

    def hidden_layers(self) -> list[HiddenLayer]:
        """The two ResNet blocks of each down level, then the two middle ones, in order (`features.HiddenStates`):
        level i has width dim * dim_mults[i - 1] (dim at level 0) and a grid of image_size / 2^i."""
        layers = [HiddenLayer(block, block.block2.proj.out_channels, self.image_size // 2**level)
                  for level, (block1, block2, _, _) in enumerate(self.downs) for block in (block1, block2)]
        middle = self.image_size // 2 ** (len(self.downs) - 1)
        width = self.mid_block1.block2.proj.out_channels
        return layers + [HiddenLayer(block, width, middle) for block in (self.mid_block1, self.mid_block2)]

    def forward(self, x: Tensor, t: Tensor, *, x_self_cond: Tensor | None = None, class_labels: Tensor | None = None,
                second_time: Tensor | None = None) -> Tensor:
        if self.self_condition:
            x = torch.cat([x_self_cond if x_self_cond is not None else torch.zeros_like(x), x], dim=1)
        x = self.init_conv(x)
        skip = x.clone()
        emb = add_second_time(self.time_mlp(t), self.second_time_mlp, second_time, "unet_attn")
        if self.num_classes:
            class_labels = labels_or_null(class_labels, self.num_classes, x.shape[0], x.device)
        if self.class_emb is not None:
            emb = emb + self.class_emb(class_labels, x.shape[0])
        context = self.context_encoder(class_labels) if self.context_encoder is not None else None
        run = partial(checkpointed, self.gradient_checkpointing and self.training)

        hs = []
        for i, (block1, block2, attn, down) in enumerate(self.downs):
            x = run(block1, x, emb)
            hs.append(x)
            x = run(attn, run(block2, x, emb))
            if context is not None:
                x = run(self.down_cross[i], x, context)
            hs.append(x)
            x = down(x)
        x = run(self.mid_attn, run(self.mid_block1, x, emb))
        if context is not None:
            x = run(self.mid_cross, x, context)
        x = run(self.mid_block2, x, emb)
        for i, (block1, block2, attn, up) in enumerate(self.ups):
            x = run(block1, torch.cat([x, hs.pop()], dim=1), emb)
            x = run(attn, run(block2, torch.cat([x, hs.pop()], dim=1), emb))
            if context is not None:
                x = run(self.up_cross[i], x, context)
            x = up(x)
        x = run(self.final_block, torch.cat([x, skip], dim=1), emb)
        return self.final_conv(x)
