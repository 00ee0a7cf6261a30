"""`Process`: what every diffusion process offers the model object, and the network call they share.

A process is a path x = alpha x_0 + sigma eps with its training loss. It gives the model:
- `training_losses(net, x0, generator, class_labels=None) -> (loss (B,), u (B,))`, u in [0, 1] the position along
  the path each sample was drawn at (0 data, 1 noise), for the loss-by-noise-level figure;
- `denoiser(net, clip_denoised, guidance_scale, class_labels) -> Denoiser` over any noise level (alpha, sigma);
- `sampling_grid(steps, spacing) -> (alphas, sigmas)` (steps + 1,) from noise to the data (alpha = 1, sigma = 0);
- `output_channels(channels)`, `clip_x0`, `default_spacing` and `name` (for messages).
The samplers (diffusion_lab.samplers) are functions of the denoiser and the grid alone.
"""

from typing import Callable

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.paths import broadcast, vp_norm  # noqa: F401 (the processes' shared helpers)
from diffusion_lab.utils.errors import ConfigError


class GuidedNetwork:
    """net(x, t_in) with classifier-free guidance and self-conditioning, for sampling.

    Classifier-free guidance (Ho & Salimans 2022, Eq. 6): with class_labels and guidance_scale w != 1, one forward
    over the batch twice, conditional then null-class half (label `net.num_classes`), gives out_u + w (out_c - out_u)
    (w = 1: conditional, w = 0: unconditional). Guiding the raw output is guiding x_0, eps and v alike for every
    process here, as each is affine in the output with the same coefficients for both halves; a learned variance
    (channels beyond the image's) comes from the conditional half.

    Self-conditioning (Chen et al. 2023): samplers are stateless, so the state lives here; for a net with
    `self_condition`, `remember(x0)` keeps the x_0 estimate of the last call for the next one (none on the first).
    Build a fresh one for every sampling run."""

    def __init__(self, net: nn.Module, guidance_scale: float = 1.0, class_labels: Tensor | None = None, **net_kwargs):
        if guidance_scale != 1 and class_labels is None:
            raise ConfigError(f"guidance_scale={guidance_scale} needs class_labels (a class-conditional model)")
        self.net, self.guidance_scale, self.class_labels, self.net_kwargs = net, guidance_scale, class_labels, net_kwargs
        self.self_condition = getattr(net, "self_condition", False)
        self.previous_x0: Tensor | None = None

    def __call__(self, x_in: Tensor, t_in: Tensor) -> Tensor:
        """The network output at x_in (any float dtype; the net runs in its own) for the per-sample inputs t_in,
        returned in x_in's dtype."""
        dtype = next(self.net.parameters()).dtype
        x_net, t_net = x_in.to(dtype), t_in.to(dtype).expand(x_in.shape[0])
        kwargs = dict(self.net_kwargs)
        if self.self_condition:
            kwargs["x_self_cond"] = self.previous_x0
        if self.guidance_scale == 1:
            if self.class_labels is not None:
                kwargs["class_labels"] = self.class_labels
            return self.net(x_net, t_net, **kwargs).to(x_in.dtype)
        labels = self.class_labels
        kwargs["class_labels"] = torch.cat([labels, torch.full_like(labels, self.net.num_classes)])
        if kwargs.get("x_self_cond") is not None:
            kwargs["x_self_cond"] = torch.cat([kwargs["x_self_cond"]] * 2)
        cond, uncond = self.net(torch.cat([x_net, x_net]), torch.cat([t_net, t_net]), **kwargs).chunk(2)
        c = x_in.shape[1]
        guided = uncond[:, :c] + self.guidance_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1).to(x_in.dtype)

    def remember(self, x0: Tensor) -> None:
        if self.self_condition:
            self.previous_x0 = x0.to(next(self.net.parameters()).dtype)


class Process(nn.Module):
    """The shared part of every process: class-label dropout and self-conditioning in training.
    cond_drop_prob: chance that a class label is replaced by the null class `net.num_classes` in training (Ho &
    Salimans 2022). clip_x0: whether sampling clips each x_0 estimate to [-1, 1] unless told otherwise."""

    name = "process"
    clip_x0 = True

    def __init__(self, cond_drop_prob: float = 0.1):
        super().__init__()
        if not 0 <= cond_drop_prob <= 1:
            raise ConfigError(f"process.cond_drop_prob={cond_drop_prob} must be a probability in [0, 1]")
        self.cond_drop_prob = cond_drop_prob

    def output_channels(self, channels: int) -> int:
        """How many channels the network outputs for images of `channels` channels."""
        return channels

    def training_kwargs(
        self,
        net: nn.Module,
        x_in: Tensor,
        t_in: Tensor,
        generator: torch.Generator,
        class_labels: Tensor | None,
        estimate_x0: Callable[[Tensor], Tensor],
    ) -> dict:
        """The net's keyword arguments for one training forward: class labels with dropout to the null class, and for
        a self-conditioned net (`net.self_condition`), with probability 1/2 per batch, its own x_0 estimate
        `estimate_x0(output)` (no gradient, clipped to [-1, 1]) as x_self_cond, else none (Chen et al. 2023,
        "Analog Bits", Sec. 3)."""
        kwargs = {}
        if class_labels is not None:
            drop = torch.rand(len(class_labels), generator=generator, device=class_labels.device) < self.cond_drop_prob
            kwargs["class_labels"] = torch.where(drop, torch.full_like(class_labels, net.num_classes), class_labels)
        if getattr(net, "self_condition", False):
            if torch.rand((), generator=generator, device=x_in.device) < 0.5:
                with torch.no_grad():
                    first = net(x_in, t_in, **kwargs)[:, : x_in.shape[1]]
                    kwargs["x_self_cond"] = estimate_x0(first).clamp(-1, 1)
        return kwargs
