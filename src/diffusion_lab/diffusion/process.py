"""`Process`: what every diffusion process offers the model object, and the network call they share.

A process is a path x = alpha x_0 + sigma eps (`path`, diffusion.paths) with what is its own: the training
distribution over the path and the loss weighting, how the network is read, and the sampling grid. It gives the model:
- `training_losses(net, x0, generator, class_labels=None, clip_x0=None) -> (loss (B,), u (B,))`, u in [0, 1] the
  position along the path each sample was drawn at (0 data, 1 noise), for the loss-by-noise-level figure; the losses
  call the process's denoiser module over net (`diffusion.denoisers`);
- `network_inputs(x_path, t) -> (x_in, t_in)` and `read_output(x_path, t, output) -> DenoiserOutput`: what the
  network sees at the path point x_path of time t (its preconditioning) and what its output means;
- `denoiser(net, clip_denoised, guidance, class_labels, clip_x0)`, the denoiser module for sampling;
- `sampling_grid(steps, spacing) -> (alphas, sigmas)` (steps + 1,) from noise to the data (alpha = 1, sigma = 0);
- `output_channels(channels)`, `clip_x0`, `default_spacing` and `name` (for messages).
The samplers (diffusion_lab.samplers) are functions of the denoiser and the grid alone.
"""

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.diffusion.denoisers import ProcessDenoiser, build_denoiser, self_condition_input
from diffusion_lab.utils.errors import ConfigError


class Process(nn.Module):
    """The shared part of every process: class-label dropout and self-conditioning in training.
    cond_drop_prob: chance that a class label is replaced by the null class `net.num_classes` in training (Ho &
    Salimans 2022). clip_x0: whether sampling clips each x_0 estimate to [-1, 1] unless told otherwise."""

    name = "process"
    clip_x0 = True
    needs_second_time = False  # whether the network takes a second time (the flow maps: `diffusion.flow_map`)

    def __init__(self, cond_drop_prob: float = 0.1):
        super().__init__()
        if not 0 <= cond_drop_prob <= 1:
            raise ConfigError(f"process.cond_drop_prob={cond_drop_prob} must be a probability in [0, 1]")
        self.cond_drop_prob = cond_drop_prob

    def output_channels(self, channels: int) -> int:
        """How many channels the network outputs for images of `channels` channels."""
        return channels

    def core_denoiser(self, net: nn.Module) -> ProcessDenoiser:
        """net read under this process, without guidance, self-conditioning or clipping: what the losses call."""
        return ProcessDenoiser(net, self)

    def denoiser(self, net: nn.Module, clip_denoised: bool | None = None, guidance: Guidance | None = None,
                 class_labels: Tensor | None = None, clip_x0: bool | None = None) -> nn.Module:
        """The denoiser module (x, alpha, sigma) -> DenoiserOutput of net under this process (`build_denoiser`)."""
        return build_denoiser(net, self, clip_denoised, guidance, class_labels, clip_x0)

    def drop_labels(self, class_labels: Tensor, generator: torch.Generator, null_class: int) -> Tensor:
        """Each label replaced by the null class with probability cond_drop_prob (Ho & Salimans 2022)."""
        drop = torch.rand(len(class_labels), generator=generator, device=class_labels.device) < self.cond_drop_prob
        return torch.where(drop, torch.full_like(class_labels, null_class), class_labels)

    def training_kwargs(self, denoiser: ProcessDenoiser, x: Tensor, alpha: Tensor, sigma: Tensor,
                        generator: torch.Generator, class_labels: Tensor | None, clip_x0: bool | None) -> dict:
        """The net's keyword arguments for one training forward at x = alpha x_0 + sigma eps: class labels with dropout
        (`drop_labels`), and for a self-conditioned net, with probability 1/2 per batch, the denoiser's own x_0 estimate
        without gradient through `self_condition_input` (clip_x0, None: this process's; the same rule as in
        sampling) as x_self_cond, else none (Chen et al. 2023, "Analog Bits", Sec. 3)."""
        kwargs = {}
        if class_labels is not None:
            kwargs["class_labels"] = self.drop_labels(class_labels, generator, denoiser.net.num_classes)
        if denoiser.self_condition and torch.rand((), generator=generator, device=x.device) < 0.5:
            with torch.no_grad():
                x0 = denoiser(x, alpha, sigma, **kwargs).x0
            kwargs["x_self_cond"] = self_condition_input(x0, self.clip_x0 if clip_x0 is None else clip_x0)
        return kwargs
