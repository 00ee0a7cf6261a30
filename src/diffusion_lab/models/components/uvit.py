"""U-ViT (Bao et al. 2023, after baofff/U-ViT libs/uvit.py): a ViT whose tokens are the time, the class (when
conditional) and the p x p patches, with a learned position embedding; depth // 2 shallow blocks, a middle block and
depth // 2 deep blocks, each deep block taking the output of its mirror shallow block through a long skip
(Linear(concat(x, skip))); then LayerNorm, a linear map back to patches and a 3x3 conv."""

import math
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from diffusion_lab.models.components.dit import SelfAttention, check_transformer, mlp
from diffusion_lab.models.components.features import HiddenLayer
from diffusion_lab.models.components.layers import ClassEmbedding, SinusoidalEmbedding, add_second_time, checkpointed
from diffusion_lab.utils.errors import ConfigError


class UViTBlock(nn.Module):
    """Pre-norm transformer block, x = Linear(concat(x, skip)) first when it has a long skip:
    x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio, gelu="none")

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def time_embedder(hidden_size: int, mlp: bool) -> nn.Module:
    """Sinusoidal time features, through Linear -> SiLU -> Linear when `mlp` (U-ViT's mlp_time_embed)."""
    features = SinusoidalEmbedding(hidden_size)
    if not mlp:
        return features
    return nn.Sequential(features, nn.Linear(hidden_size, 4 * hidden_size), nn.SiLU(), nn.Linear(4 * hidden_size, hidden_size))


class UViT(nn.Module):
    """U-ViT with `depth` blocks in all (odd: the paper's U-ViT-S has 13); `mlp_time_embed` passes the sinusoidal
    time features through an MLP (the paper's latent ImageNet models) instead of using them as the token directly.
    `num_classes` adds a class token with one extra null class (index num_classes) for classifier-free guidance;
    `gradient_checkpointing` recomputes each block in the backward pass while training; `second_time` embeds a second
    time (a flow map's t - r or a shortcut's step size) as the first and adds it to the time token (`add_second_time`;
    off: the parameters and state-dict keys are those without)."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        patch_size: int = 2,
        depth: int = 13,
        hidden_size: int = 512,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        conv: bool = True,
        out_channels: int | None = None,
        num_classes: int | None = None,
        gradient_checkpointing: bool = False,
        second_time: bool = False,
    ):
        super().__init__()
        check_transformer("uvit", image_size, patch_size, depth, hidden_size, num_heads)
        if depth % 2 == 0:
            raise ConfigError(f"model=uvit: model.depth={depth} must be odd (depth // 2 shallow blocks, a middle one, "
                              f"depth // 2 deep ones)")
        self.num_classes, self.self_condition, self.gradient_checkpointing = num_classes, False, gradient_checkpointing
        self.patch_size, self.out_channels = patch_size, out_channels or channels
        self.extras = 2 if num_classes else 1  # the time token, and the class token

        self.patch_embed = nn.Conv2d(channels, hidden_size, patch_size, stride=patch_size)
        self.time_embed = time_embedder(hidden_size, mlp_time_embed)
        self.second_time_embed = time_embedder(hidden_size, mlp_time_embed) if second_time else None
        self.class_emb = ClassEmbedding(num_classes, hidden_size) if num_classes else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (image_size // patch_size) ** 2, hidden_size))
        block = partial(UViTBlock, hidden_size, num_heads, mlp_ratio, qkv_bias)
        self.in_blocks = nn.ModuleList([block(skip=False) for _ in range(depth // 2)])
        self.mid_block = block(skip=False)
        self.out_blocks = nn.ModuleList([block(skip=True) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size**2 * self.out_channels)
        self.final_layer = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """U-ViT's initialisation: truncated N(0, 0.02) position embedding and linear weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def hidden_layers(self) -> list[HiddenLayer]:
        """The shallow, middle and deep blocks, in order (`features.HiddenStates`): width hidden_size, grid
        image_size / p, after the time (and class) tokens."""
        width, grid = self.patch_embed.out_channels, math.isqrt(self.pos_embed.shape[1] - self.extras)
        return [HiddenLayer(block, width, grid, self.extras)
                for block in [*self.in_blocks, self.mid_block, *self.out_blocks]]

    def forward(self, x: Tensor, t: Tensor, *, class_labels: Tensor | None = None, x_self_cond: Tensor | None = None,
                second_time: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) real noise levels, second_time (B,) where built with one -> (B, out_channels, H, W);
        x_self_cond is unused (self_condition is False)."""
        h = x.shape[-2] // self.patch_size
        tokens = [add_second_time(self.time_embed(t), self.second_time_embed, second_time, "uvit")[:, None]]
        if self.class_emb is not None:
            tokens.insert(0, self.class_emb(class_labels, x.shape[0])[:, None])
        tokens.append(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = torch.cat(tokens, dim=1) + self.pos_embed  # (B, extras + N, D)
        run = partial(checkpointed, self.gradient_checkpointing and self.training)
        skips = []
        for blk in self.in_blocks:
            x = run(blk, x)
            skips.append(x)
        x = run(self.mid_block, x)
        for blk in self.out_blocks:
            x = run(blk, x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]  # the patch tokens: (B, N, p * p * out_channels)
        x = rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=self.patch_size, q=self.patch_size)
        return self.final_layer(x)
