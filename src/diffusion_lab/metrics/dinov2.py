"""DINOv2 ViT/14 (Oquab et al. 2023) for inference, as facebookresearch/dinov2 builds its hub backbones
(`dinov2/hub/backbones.py`: img_size 518, layer scale, MLP feed-forward, no register tokens; `dinov2/models/
vision_transformer.py`, `dinov2/layers/`): the same state-dict keys and shapes, so `dinov2_vitl14_pretrain.pth` loads
as it is. No masking, drop-path or xFormers: those act in training only.
"""

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError

HEAD_DIM = 64  # every DINOv2 ViT (S 384/6, B 768/12, L 1024/16, g 1536/24 heads)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (B, HW/p^2, D) by a stride-p convolution."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over heads of width d, q, k, v from one linear map (dinov2's `qkv` layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class LayerScale(nn.Module):
    """x * gamma, per channel (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """ViT whose output is the CLS token after the final LayerNorm (dinov2's `x_norm_clstoken`, `forward`'s value).
    Defaults: ViT-L/14 at 518 px (1 + 37 * 37 position embeddings), `dinov2_vitl14`."""

    def __init__(self, embed_dim: int = 1024, depth: int = 24, patch_size: int = 14, img_size: int = 518,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.embed_dim, self.patch_size = embed_dim, patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # masked-image training only; part of the checkpoint
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(Block(embed_dim, embed_dim // HEAD_DIM, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], source: str) -> "DinoVisionTransformer":
        """The ViT a dinov2 checkpoint describes (width, depth, patch and grid read from its shapes), its weights
        loaded; ConfigError (one line) for anything else."""
        try:
            embed_dim, patch_size = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
            grid = math.isqrt(state["pos_embed"].shape[1] - 1)
            depth = 1 + max(int(name.split(".")[1]) for name in state if name.startswith("blocks."))
            mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
            with torch.device("meta"):
                net = cls(embed_dim, depth, patch_size, grid * patch_size, mlp_ratio)
            net.load_state_dict(state, assign=True)
        except (KeyError, ValueError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0]
            raise ConfigError(f"{source} is not a DINOv2 ViT checkpoint (dinov2_vitl14_pretrain.pth layout): {first}") from None
        return net.eval().requires_grad_(False)

    def position_embedding(self, rows: int, cols: int) -> Tensor:
        """pos_embed for a rows x cols patch grid: the M x M trained grid resized bicubically with dinov2's scale
        factors ((rows + 0.1) / M, (cols + 0.1) / M) (`interpolate_pos_encoding`, offset 0.1, no antialias)."""
        patches = self.pos_embed.shape[1] - 1
        if rows * cols == patches and rows == cols:
            return self.pos_embed
        grid = math.isqrt(patches)
        patch_pos = self.pos_embed[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid), mode="bicubic",
                                  antialias=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1].float(), patch_pos], dim=1).to(self.pos_embed.dtype)

    def normed_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W), H and W multiples of the patch size, normalised -> (B, 1 + HW / p^2, D): the CLS token, then
        the patch tokens row-major, after the final norm (dinov2's x_norm_clstoken and x_norm_patchtokens)."""
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W), H and W multiples of the patch size, normalised -> (B, D): the CLS token."""
        return self.normed_tokens(x)[:, 0]
