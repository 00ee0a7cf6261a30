"""Building the process and the backbone from a composed config: one place, used by training and sampling."""

from typing import Any

from hydra.utils import instantiate
from torch import nn

from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models import autoencoder_module


def build_process(cfg: Any) -> nn.Module:
    """The diffusion process of `cfg.process` over the betas of `cfg.schedule`."""
    return instantiate(cfg["process"], betas=beta_schedule(**cfg["schedule"]))


def backbone_shape(cfg: Any) -> tuple[int, int, int]:
    """(channels, height, width) of what the backbone denoises: the data's images, or for latent diffusion
    (`cfg.first_stage`) the first stage's latents."""
    data, first_stage = cfg["data"], cfg.get("first_stage")
    if first_stage:
        autoencoder = first_stage["model"]
        size = autoencoder["image_size"] // autoencoder["factor"]
        return autoencoder["latent_channels"], size, size
    return data["channels"], data["image_size"], data["image_size"]


def build_net(cfg: Any, process: nn.Module) -> nn.Module:
    """The backbone of `cfg.model` for inputs of `backbone_shape(cfg)`, with the output channels the process
    needs and, for class-conditional data, the number of classes."""
    data = cfg["data"]
    num_classes = data["num_classes"] if data.get("conditional", False) else None
    channels, image_size, _ = backbone_shape(cfg)
    return instantiate(cfg["model"], channels=channels, image_size=image_size,
                       out_channels=process.output_channels(channels), num_classes=num_classes)


def build_first_stage(cfg: Any) -> nn.Module | None:
    """The frozen first stage (autoencoder and latent scale factor, untrained weights) of a latent-diffusion
    config, None for pixel diffusion; its weights are in the checkpoint under `first_stage.`."""
    return autoencoder_module.build_first_stage(cfg["first_stage"]) if cfg.get("first_stage") else None
