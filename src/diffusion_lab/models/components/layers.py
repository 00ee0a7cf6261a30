"""Layers shared by the backbones."""

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion_lab.utils.errors import ConfigError


class SinusoidalEmbedding(nn.Module):
    """emb(t)_i = sin(t w_i) for i < d/2 and cos(t w_{i-d/2}) after, w_i = 10000^(-i/(d/2-1))
    (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020, Appendix B), in float32 (float64 for float64 t)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ConfigError(f"the time embedding width {dim} must be an even number >= 4")
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        args = t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def add_second_time(emb: Tensor, embedder: nn.Module | None, second_time: Tensor | None, model: str) -> Tensor:
    """emb + embedder(second_time): the embedding of a second time (a flow map's t - r, a shortcut's step size d),
    embedded as the first and added to its embedding (Geng et al. 2025, MeanFlow, Tab. 1c; Frans et al. 2024,
    shortcut models). A backbone built with `second_time=true` needs one at every call and one built without takes none: either
    mismatch is a ConfigError."""
    if embedder is None and second_time is not None:
        raise ConfigError(f"model={model} was built without a second time (model.second_time=false) but was given one; "
                          "the flow-map processes (process=meanflow, process=shortcut) build it with one")
    if embedder is not None and second_time is None:
        raise ConfigError(f"model={model} was built with a second time (model.second_time=true) but was called "
                          "without one; only the flow-map processes (process=meanflow, process=shortcut) give one")
    return emb if embedder is None else emb + embedder(second_time)


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


def labels_or_null(class_labels: Tensor | None, num_classes: int, batch_size: int, device: torch.device) -> Tensor:
    """The class labels, or the null class (index num_classes, the unconditional one of classifier-free
    guidance) for every sample when none are given."""
    if class_labels is not None:
        return class_labels
    return torch.full((batch_size,), num_classes, device=device, dtype=torch.long)


class ClassEmbedding(nn.Embedding):
    """One learned vector per class plus one for the null class (Ho & Salimans 2022); no labels embed the null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__(num_classes + 1, dim)
        self.num_classes = num_classes

    def forward(self, class_labels: Tensor | None, batch_size: int) -> Tensor:
        return super().forward(labels_or_null(class_labels, self.num_classes, batch_size, self.weight.device))


def checkpointed(enabled: bool, block: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """block(*args); when enabled, its activations are not kept but recomputed in the backward pass (gradient
    checkpointing, Chen et al. 2016; torch.utils.checkpoint, non-reentrant: same outputs and gradients)."""
    return checkpoint(block, *args, use_reentrant=False) if enabled else block(*args)


def rgb(images: Tensor) -> Tensor:
    """Grayscale images (B, 1, H, W) repeated to 3 channels; RGB ones unchanged."""
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
