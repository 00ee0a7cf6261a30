"""DiT, the diffusion transformer of Peebles & Xie 2023 (after facebookresearch/DiT models.py): the image cut into
p x p patches, each a token with a fixed 2-D sin-cos position embedding; adaLN-Zero transformer blocks conditioned on
c = time embedding + class embedding; a final adaLN layer and a linear map back to patches. Zero-initialised
modulation and output make every block the identity and the output 0 at initialisation."""

import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffusion_lab.models.components.features import HiddenLayer
from diffusion_lab.models.components.layers import ClassEmbedding, SinusoidalEmbedding, add_second_time, checkpointed
from diffusion_lab.utils.errors import ConfigError

# the paper's sizes (Table 1): depth, hidden size, heads
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
FREQUENCY_EMBEDDING_SIZE = 256  # width of the sinusoidal time features before DiT's time MLP


def check_transformer(model: str, image_size: int, patch_size: int, depth: int, hidden_size: int, num_heads: int) -> None:
    """The shapes a ViT-style backbone needs: a patch size dividing the image, heads dividing the width, depth >= 1."""
    if patch_size < 1 or image_size % patch_size:
        raise ConfigError(
            f"model={model}: model.patch_size={patch_size} must divide data.image_size={image_size} (the latent size "
            f"under latent diffusion); use a patch size that divides {image_size}"
        )
    if depth < 1:
        raise ConfigError(f"model={model}: model.depth={depth} must be at least 1")
    if num_heads < 1 or hidden_size % num_heads:
        raise ConfigError(f"model={model}: model.num_heads={num_heads} must divide model.hidden_size={hidden_size}")


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[sin(pos w_i), cos(pos w_i)] with w_i = 10000^(-i / (dim/2)), i < dim/2 (Vaswani et al. 2017; MAE's pos_embed)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.double()[:, None] * omega[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """(grid_size^2, dim) fixed position embedding, row-major over patches: the first dim/2 channels encode the
    column, the last dim/2 the row (DiT's get_2d_sincos_pos_embed)."""
    if dim % 4:
        raise ConfigError(f"model.hidden_size={dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (1 + scale) + shift, per sample over all tokens (adaLN)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head softmax(Q K^T / sqrt(d)) V over the tokens (Vaswani et al. 2017) through
    F.scaled_dot_product_attention (fused kernels on GPUs)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (k h d) -> k b h n d", k=3, h=self.num_heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


def mlp(dim: int, mlp_ratio: float, gelu: str) -> nn.Sequential:
    """Linear(dim, dim * mlp_ratio) -> GELU -> Linear back: the transformer's feed-forward block."""
    hidden = int(dim * mlp_ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate=gelu), nn.Linear(hidden, dim))


class DiTBlock(nn.Module):
    """adaLN-Zero block (Sec. 3.2): (shift, scale, gate) x 2 = Linear(SiLU(c));
    x += gate_1 Attn(modulate(LN(x), shift_1, scale_1)); x += gate_2 MLP(modulate(LN(x), shift_2, scale_2))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(dim, mlp_ratio, gelu="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Linear(modulate(LN(x), shift, scale)) to p * p * out_channels values per token; (shift, scale) = Linear(SiLU(c))."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def time_embedder(hidden_size: int) -> nn.Sequential:
    """DiT's TimestepEmbedder: sinusoidal features -> Linear -> SiLU -> Linear."""
    return nn.Sequential(SinusoidalEmbedding(FREQUENCY_EMBEDDING_SIZE), nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size),
                         nn.SiLU(), nn.Linear(hidden_size, hidden_size))


class DiT(nn.Module):
    """DiT-`size`/`patch_size` (sizes S, B, L, XL of the paper's Table 1); depth, hidden_size and num_heads, when
    given, replace the size's values. `num_classes` adds a class embedding with one extra null class (index
    num_classes) for classifier-free guidance; `gradient_checkpointing` recomputes each block in the backward pass
    while training; `second_time` embeds a second time (a flow map's t - r or a shortcut's step size) as the first
    and adds it to c (`add_second_time`; off: the parameters and state-dict keys are those without). Two departures
    from the reference, neither changing parameters or FLOPs: the time features are the project's SinusoidalEmbedding
    (exponent i / (d/2 - 1), not i / (d/2)), and the fixed position embedding is a buffer, not a frozen parameter."""

    def __init__(
        self,
        channels: int,
        image_size: int,
        size: str = "S",
        patch_size: int = 2,
        depth: int | None = None,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        out_channels: int | None = None,
        num_classes: int | None = None,
        gradient_checkpointing: bool = False,
        second_time: bool = False,
    ):
        super().__init__()
        if size not in SIZES:
            raise ConfigError(f"model.size={size} is not a DiT size; one of {', '.join(SIZES)}")
        default_depth, default_hidden, default_heads = SIZES[size]
        depth = default_depth if depth is None else depth
        hidden_size = default_hidden if hidden_size is None else hidden_size
        num_heads = default_heads if num_heads is None else num_heads
        check_transformer("dit", image_size, patch_size, depth, hidden_size, num_heads)
        self.num_classes, self.self_condition, self.gradient_checkpointing = num_classes, False, gradient_checkpointing
        self.patch_size, self.out_channels = patch_size, out_channels or channels

        self.x_embedder = nn.Conv2d(channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, image_size // patch_size), persistent=False)
        self.t_embedder = time_embedder(hidden_size)
        self.second_time_embedder = time_embedder(hidden_size) if second_time else None
        self.class_emb = ClassEmbedding(num_classes, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (and patch embedding), N(0, 0.02) time MLP and class table,
        zero adaLN modulation in every block and the final layer, zero output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for embedder in filter(None, (self.t_embedder, self.second_time_embedder)):
            nn.init.normal_(embedder[1].weight, std=0.02)
            nn.init.normal_(embedder[3].weight, std=0.02)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def hidden_layers(self) -> list[HiddenLayer]:
        """The transformer blocks, in order (`features.HiddenStates`): width hidden_size, grid image_size / p."""
        width, grid = self.x_embedder.out_channels, math.isqrt(len(self.pos_embed))
        return [HiddenLayer(block, width, grid) for block in self.blocks]

    def forward(self, x: Tensor, t: Tensor, *, class_labels: Tensor | None = None, x_self_cond: Tensor | None = None,
                second_time: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) real noise levels, second_time (B,) where built with one -> (B, out_channels, H, W);
        x_self_cond is unused (self_condition is False)."""
        h = x.shape[-2] // self.patch_size
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = HW / p^2
        c = add_second_time(self.t_embedder(t), self.second_time_embedder, second_time, "dit")
        if self.class_emb is not None:
            c = c + self.class_emb(class_labels, x.shape[0])
        run = partial(checkpointed, self.gradient_checkpointing and self.training)
        for block in self.blocks:
            tokens = run(block, tokens, c)
        out = self.final_layer(tokens, c)  # (B, N, p * p * out_channels)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=self.patch_size, q=self.patch_size)
