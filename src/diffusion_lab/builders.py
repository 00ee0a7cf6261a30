"""Building the process and the backbone from a composed config: one place, used by training and sampling."""

from typing import Any

from hydra.utils import instantiate
from torch import nn

from diffusion_lab.diffusion.schedules import beta_schedule


def build_process(cfg: Any) -> nn.Module:
    """The diffusion process of `cfg.process` over the betas of `cfg.schedule`."""
    return instantiate(cfg["process"], betas=beta_schedule(**cfg["schedule"]))


def build_net(cfg: Any, process: nn.Module) -> nn.Module:
    """The backbone of `cfg.model`, with the output channels the process needs and, for class-conditional
    data, the number of classes."""
    data = cfg["data"]
    num_classes = data["num_classes"] if data.get("conditional", False) else None
    return instantiate(cfg["model"], out_channels=process.output_channels(data["channels"]), num_classes=num_classes)
