"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), version 0.1
over VGG16, the metric of consistency distillation (Song et al. 2023, Sec. 5):
    d(x, y) = sum_l mean_{h,w} sum_c w_{l,c} (phi_l(x) / ||phi_l(x)|| - phi_l(y) / ||phi_l(y)||)_{c,h,w}^2,
computed by the lpips package's own `lpips.LPIPS(net="vgg")`, built with no download (pretrained=False,
pnet_rand=True) and filled from two files:
- `vgg_weights`: torchvision's ImageNet VGG16, vgg16-397923af.pth (VGG16_URL; None: the torch hub cache's copy, where
  `torchvision.models.vgg16(weights="IMAGENET1K_V1")` keeps it), whose features.N go to the package's net.sliceK.N;
- `lpips_weights`: the linear layers, lpips/weights/v0.1/vgg.pth of the lpips package (LIN_URL; the package ships
  it), keys lin0.model.1.weight .. lin4.model.1.weight.
pooling="average" replaces VGG's four 2x2 max-poolings by average poolings, as piq's `LPIPS(replace_pooling=True)`
that Song et al.'s consistency-model code trains with; "max" is the lpips package's network as published.
"""

import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from diffusion_lab.models.components.layers import rgb
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.io import hub_checkpoint

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # vgg16().features indices of the package's slice1..slice5
POOLINGS = ("max", "average")


class LPIPS(nn.Module):
    """d(x, y) per sample, (B,), for images in [-1, 1] (B, 1 or 3, H, W), grayscale repeated to RGB."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.network(rgb(x).float(), rgb(y).float()).flatten()


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


def load_lpips(lpips_weights: str, vgg_weights: str | None = None, pooling: str = "max") -> LPIPS:
    """LPIPS with the linear layers of `lpips_weights` and the VGG16 of `vgg_weights` (None: the torch hub cache's
    vgg16-397923af.pth) and VGG's `pooling` (see the module docstring), frozen in eval mode: no gradient for its
    weights, gradients flow to its inputs."""
    if pooling not in POOLINGS:
        raise ConfigError(f"module.lpips_pooling={pooling!r} is not allowed; choose one of {', '.join(POOLINGS)}")
    if vgg_weights is None:
        vgg_weights = str(hub_checkpoint(VGG16_URL))
        if not Path(vgg_weights).is_file():
            raise ConfigError(f"the VGG16 weights of module.metric=lpips are absent: looked in module.vgg_weights "
                              f"(null) and {vgg_weights}; download {VGG16_URL} to either")
    import lpips

    with warnings.catch_warnings():  # pnet_rand passes torchvision's deprecated pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        network = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    vgg_state = read_state(vgg_weights, "module.vgg_weights", VGG16_URL)
    slice_of = {index: k for k, (first, end) in enumerate(SLICES, 1) for index in range(first, end)}
    load_into(network.net, {f"slice{slice_of[int(name.split('.')[1])]}.{name.removeprefix('features.')}": value
                            for name, value in vgg_state.items()
                            if name.startswith("features.") and int(name.split(".")[1]) in slice_of},
              "module.vgg_weights", vgg_weights, VGG16_URL)
    lin_state = read_state(lpips_weights, "module.lpips_weights", LIN_URL)
    names = [f"lin{k}.model.1.weight" for k in range(len(SLICES))]
    if missing := [name for name in names if name not in lin_state]:
        raise ConfigError(f"module.lpips_weights={lpips_weights} has no {missing[0]}; it should be the lpips package's "
                          f"lpips/weights/v0.1/vgg.pth ({LIN_URL})")
    load_into(network.lins, {name.removeprefix("lin"): lin_state[name] for name in names},
              "module.lpips_weights", lpips_weights, LIN_URL)
    if pooling == "average":
        for slice_ in network.net.children():
            for index, layer in slice_.named_children():
                if isinstance(layer, nn.MaxPool2d):
                    setattr(slice_, index, nn.AvgPool2d(kernel_size=2, stride=2))
    return LPIPS(network).eval().requires_grad_(False)
