"""Conditioning through cross-attention (Rombach et al. 2022, Sec. 3.3): image features attend to a context
sequence (B, L, D) that a context encoder makes from the conditioning input (here class labels)."""

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError


class ClassTokens(nn.Module):
    """Context encoder for class labels: label y -> `num_tokens` learned tokens of width `dim`, (B, L, D). Index
    `num_classes` is the learned null label of classifier-free guidance (Ho & Salimans 2022)."""

    def __init__(self, num_classes: int, dim: int = 64, num_tokens: int = 1):
        super().__init__()
        if dim < 1 or num_tokens < 1:
            raise ConfigError(f"model.context_encoder.dim={dim} and num_tokens={num_tokens} must be >= 1")
        self.dim, self.num_tokens = dim, num_tokens
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * dim)

    def forward(self, class_labels: Tensor) -> Tensor:
        return rearrange(self.embedding(class_labels), "b (l d) -> b l d", l=self.num_tokens)


class CrossAttention(nn.Module):
    """x + W_o softmax(Q K^T / sqrt(d)) V with Q = W_q GroupNorm(x) over the pixels and K = W_k c, V = W_v c over
    the context tokens c (Rombach et al. 2022, Eq. 3), multi-head (Vaswani et al. 2017)."""

    def __init__(self, dim: int, context_dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        hidden = dim_head * heads
        self.norm = nn.GroupNorm(1, dim)
        self.to_q = nn.Conv2d(dim, hidden, 1, bias=False)
        self.to_kv = nn.Linear(context_dim, hidden * 2, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = rearrange(self.to_q(self.norm(x)), "b (h c) x y -> b h (x y) c", h=self.heads)
        k, v = (rearrange(t, "b l (h c) -> b h l c", h=self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.to_out(rearrange(out, "b h (x y) c -> b (h c) x y", x=h, y=w))
