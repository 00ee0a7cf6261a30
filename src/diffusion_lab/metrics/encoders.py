"""Frozen image encoders whose patch features REPA aligns a backbone's hidden states with (models/representation.py),
loaded from a file, never downloaded. Each maps images in [-1, 1] (B, C, H, W) and the side g of the backbone's
token grid to features (B, g^2, width) on that grid, row-major; `width` is their dimension.

- `dinov2`: a DINOv2 ViT/14 checkpoint in facebookresearch/dinov2's layout (`dinov2_vits14_pretrain.pth`,
  `..._vitb14_...`, `..._vitl14_...`; metrics/dinov2.py): the patch tokens after the final norm (REPA's
  `x_norm_patchtokens`) of the image resized bicubically (antialiased) to 14 g pixels, so that the encoder's patch
  grid is the backbone's as in REPA (224 px for a 16 x 16 grid); grayscale repeated to RGB, ImageNet's mean and std.
- `classifier`: a feature_classifier checkpoint (`python train.py experiment=feature_classifier`, or a file that
  `extractors.ship_classifier` wrote): the feature map of its last conv block (before the flatten), resized
  bilinearly (antialiased when shrinking) to g x g.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.metrics.dinov2 import DinoVisionTransformer
from diffusion_lab.metrics.extractors import IMAGENET_MEAN, IMAGENET_STD, load_classifier
from diffusion_lab.models.components.layers import rgb
from diffusion_lab.utils.errors import ConfigError

ENCODERS = ("dinov2", "classifier")


class DinoV2PatchEncoder(nn.Module):
    """DINOv2's normed patch tokens on the backbone's grid (the image resized to 14 g pixels)."""

    def __init__(self, vit: DinoVisionTransformer):
        super().__init__()
        self.vit, self.width = vit, vit.embed_dim

    def forward(self, images: Tensor, grid: int) -> Tensor:
        size = grid * self.vit.patch_size
        x = F.interpolate(rgb((images.float() + 1) / 2), size=(size, size), mode="bicubic", antialias=True)
        mean, std = (torch.tensor(values, device=x.device).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
        return self.vit.normed_tokens((x - mean) / std)[:, 1:]


class ClassifierPatchEncoder(nn.Module):
    """The feature classifier's last conv feature map, resized to the backbone's grid."""

    def __init__(self, conv: nn.Sequential, width: int):
        super().__init__()
        self.conv, self.width = conv, width

    def forward(self, images: Tensor, grid: int) -> Tensor:
        features = F.interpolate(self.conv(images.float()), size=(grid, grid), mode="bilinear", antialias=True)
        return features.flatten(2).transpose(1, 2)


def load_patch_encoder(kind: str, path: str | None) -> nn.Module:
    """The frozen patch encoder of `kind` (ENCODERS) from the file at `path`, in eval mode without gradients;
    ConfigError (one line) for an unknown kind, a missing file or a file of another layout."""
    key = "representation.encoder"
    if kind not in ENCODERS:
        raise ConfigError(f"{key}.kind={kind!r} is not an encoder; choose one of {', '.join(ENCODERS)}")
    if not path or not Path(path).is_file():
        raise ConfigError(f"{key}.path={path} is not a file; give the {kind} encoder's weights file (it is never "
                          "downloaded; docs/training.md#faster-training-repa-and-the-dispersive-loss)")
    if kind == "classifier":
        net, _ = load_classifier(path, f"{key}.path")
        encoder = ClassifierPatchEncoder(net.body[:-2], net.config["widths"][-1])
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(f"{key}.path={path} is not a readable weights file ({type(error).__name__})") from None
        if not isinstance(state, dict):
            raise ConfigError(f"{key}.path={path} holds no state dict (dinov2_vitl14_pretrain.pth layout)")
        encoder = DinoV2PatchEncoder(DinoVisionTransformer.from_state_dict(state, f"{key}.path={path}"))
    return encoder.eval().requires_grad_(False)
