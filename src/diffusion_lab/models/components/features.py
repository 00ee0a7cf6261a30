"""A backbone's hidden states as tokens (B, N, D), read by forward hooks on its blocks, so that losses on them (REPA,
the dispersive loss: diffusion/representation.py) need no change to any backbone's forward.

Every backbone lists its blocks in the order the input meets them (`hidden_layers()`); depth d is the output of the
d-th: DiT's and U-ViT's transformer blocks, and along a U-Net's down path and middle its residual blocks."""

from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError


class HiddenLayer(NamedTuple):
    """A block whose output holds hidden states: its width D, the side of its square token grid (N = grid^2), and
    the tokens its output holds before the patches (U-ViT's time and class tokens)."""

    block: nn.Module
    width: int
    grid: int
    extra_tokens: int = 0


def patch_tokens(output: Tensor, extra_tokens: int) -> Tensor:
    """(B, N, D) patch tokens of a block's output: a transformer's (B, extras + N, D) less the extras, or a U-Net's
    feature map (B, D, H, W) flattened row-major."""
    return output.flatten(2).transpose(1, 2) if output.ndim == 4 else output[:, extra_tokens:]


def hidden_layer(net: nn.Module, depth: int | None, key: str) -> HiddenLayer:
    """The block at `depth` (1-based; None: the last) of a backbone's `hidden_layers()`; ConfigError naming `key`
    where there is none."""
    if not hasattr(net, "hidden_layers"):
        raise ConfigError(f"{key}: backbone {type(net).__name__} offers no hidden states (dit, uvit, unet_attn and "
                          "ddpm_unet do)")
    layers = net.hidden_layers()
    depth = len(layers) if depth is None else depth
    if not 1 <= depth <= len(layers):
        raise ConfigError(f"{key}={depth}: backbone {type(net).__name__} has hidden states at depths 1..{len(layers)}")
    return layers[depth - 1]


class HiddenStates:
    """Records by forward hooks the patch tokens of some blocks ({name: HiddenLayer}) in every forward pass that
    trains: the block in training mode with gradients on. Passes without gradients (sampling, validation,
    self-conditioning's first estimate, a target under no_grad) record nothing, nor does a network without hooks."""

    def __init__(self, layers: dict[str, HiddenLayer]):
        self.layers = layers
        self.recorded: dict[str, list[Tensor]] = {name: [] for name in layers}
        for name, layer in layers.items():
            layer.block.register_forward_hook(partial(self.record, name))

    def record(self, name: str, block: nn.Module, args: tuple, output: Tensor) -> None:
        if block.training and torch.is_grad_enabled():
            self.recorded[name].append(patch_tokens(output, self.layers[name].extra_tokens))

    def clear(self) -> None:
        for tokens in self.recorded.values():
            tokens.clear()

    def take(self) -> dict[str, Tensor]:
        """{name: tokens (B, N, D)} of the one training forward since the last take or clear; ConfigError where the
        loss ran the network with gradients more or less than once."""
        counts = {len(tokens) for tokens in self.recorded.values()}
        if counts != {1}:
            raise ConfigError(f"the representation terms read the backbone's hidden states of one forward pass with "
                              f"gradients per step; this training step ran {max(counts)}")
        taken = {name: tokens[0] for name, tokens in self.recorded.items()}
        self.clear()
        return taken
