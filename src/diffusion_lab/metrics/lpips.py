"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), version 0.1
over VGG16, the metric of consistency distillation (Song et al. 2023, Sec. 5):
    d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (phi_l(x) / ||phi_l(x)|| - phi_l(y) / ||phi_l(y)||)_{c,h,w}^2,
phi_l the VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the input in [-1, 1] after the
ScalingLayer (x - shift) / scale, ||.|| the norm over channels (+ 1e-10), w_l the learned 1x1 layers lin0..lin4
(the lpips package's `lpips.LPIPS(net="vgg")`, whose forward this reproduces).

The weights come from two files, never a download:
- `vgg_weights`: torchvision's ImageNet VGG16, vgg16-397923af.pth (VGG16_URL; None: the torch hub cache's copy, where
  `torchvision.models.vgg16(weights="IMAGENET1K_V1")` keeps it);
- `lpips_weights`: the linear layers, lpips/weights/v0.1/vgg.pth of the lpips package (LIN_URL; `pip install lpips`
  ships it), keys lin0.model.1.weight .. lin4.model.1.weight.
"""

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn
from torchvision.models import vgg16

from diffusion_lab.metrics.extractors import hub_checkpoint, rgb
from diffusion_lab.utils.errors import ConfigError

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
TAPS = (3, 8, 15, 22, 29)  # vgg16().features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)
SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)  # the lpips package's ScalingLayer


def unit_channels(features: Tensor, eps: float = 1e-10) -> Tensor:
    """phi / (||phi||_2 over channels + eps) (Zhang et al. 2018, Eq. 1; the lpips package's normalize_tensor)."""
    return features / (features.pow(2).sum(1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 over VGG16 (see the module docstring), per sample: forward(x, y) -> (B,) for images in [-1, 1]
    (B, 1 or 3, H, W), grayscale repeated to RGB. Built with random weights; `load_lpips` fills and freezes it."""

    def __init__(self):
        super().__init__()
        self.vgg = vgg16(weights=None).features[: TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1), persistent=False)

    def features(self, x: Tensor) -> list[Tensor]:
        """phi_l(x) at the five taps, for x already scaled."""
        taps = []
        for index, layer in enumerate(self.vgg):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        scaled = (rgb(torch.cat([x, y])).float() - self.shift) / self.scale
        distance = 0
        for lin, phi in zip(self.lins, self.features(scaled)):
            phi_x, phi_y = unit_channels(phi).chunk(2)
            distance = distance + lin((phi_x - phi_y).pow(2)).mean((1, 2, 3))
        return distance


def read_state(path: str, key: str, url: str) -> Mapping[str, Tensor]:
    """The tensors of the weights file at `path` (config key `key`), on the CPU; one-line ConfigError if absent or not
    a state dict."""
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path} is not a file; download {url} there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"{key}={path} is not a PyTorch weights file ({type(error).__name__}); it should be "
                          f"{url.rsplit('/', 1)[1]} from {url}") from error
    if not isinstance(state, Mapping):
        raise ConfigError(f"{key}={path} holds a {type(state).__name__}, not a state dict; it should be {url}")
    return state


def load_into(module: nn.Module, state: Mapping[str, Tensor], key: str, path: str, url: str) -> None:
    """module.load_state_dict(state), strict; a mismatch is a one-line ConfigError naming the file and its source."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ConfigError(f"{key}={path} does not hold the weights looked for ({detail[:160]}); it should be "
                          f"{url.rsplit('/', 1)[1]} from {url}") from error


def load_lpips(lpips_weights: str, vgg_weights: str | None = None) -> LPIPS:
    """LPIPS with the linear layers of `lpips_weights` and the VGG16 of `vgg_weights` (None: the torch hub cache's
    vgg16-397923af.pth), frozen in eval mode: no gradient for its weights, gradients flow to its inputs."""
    if vgg_weights is None:
        vgg_weights = str(hub_checkpoint(VGG16_URL))
        if not Path(vgg_weights).is_file():
            raise ConfigError(f"the VGG16 weights of module.metric=lpips are absent: looked in module.vgg_weights "
                              f"(null) and {vgg_weights}; download {VGG16_URL} to either")
    lpips = LPIPS()
    vgg_state = read_state(vgg_weights, "module.vgg_weights", VGG16_URL)
    load_into(lpips.vgg, {name.removeprefix("features."): value for name, value in vgg_state.items()
                          if name.startswith("features.")}, "module.vgg_weights", vgg_weights, VGG16_URL)
    lin_state = read_state(lpips_weights, "module.lpips_weights", LIN_URL)
    names = [f"lin{k}.model.1.weight" for k in range(len(CHANNELS))]
    if missing := [name for name in names if name not in lin_state]:
        raise ConfigError(f"module.lpips_weights={lpips_weights} has no {missing[0]}; it should be the lpips package's "
                          f"lpips/weights/v0.1/vgg.pth ({LIN_URL})")
    load_into(lpips.lins, {f"{k}.weight": lin_state[name] for k, name in enumerate(names)}, "module.lpips_weights",
              lpips_weights, LIN_URL)
    return lpips.eval().requires_grad_(False)
