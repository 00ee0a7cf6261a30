"""Shortcut models (Frans et al. 2024, "One Step Diffusion via Shortcut Models", arXiv 2410.12557): a network
s(z_t, t, d) of the step size d, the average velocity over [t - d, t] of `FlowMap` (u(z_t, t - d, t)), trained on
the rectified-flow path z_t = (1 - t) x_0 + t eps (t = 1 noise; the paper runs its time the other way, t' = 1 - t,
so its step t' -> t' + d is ours t -> t - d) with two losses (their Eq. 5):
- flow matching at d = 0: ||s(z_t, t, 0) - (eps - x_0)||^2, t from the flow-matching time density;
- self-consistency, for a fraction of the batch (1/4, their bootstrap_every = 4): one step of 2h equals two of h,
      s(z_t, t, 2h) = sg((s(z_t, t, h) + s(z', t - h, h)) / 2),   z' = z_t - h s(z_t, t, h),
  with 2h = 2^-k, k uniform in 0..log2(finest_steps) - 1, and t uniform on the multiples of 2h in (0, 1]; the finest
  half step h = 1 / finest_steps is asked of the network at d = 0 (the flow itself, as the paper).
The target comes from the network being trained (no EMA copy, unlike the paper's code) and carries no gradient.
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.flow_map import AverageVelocity, FlowMap
from diffusion_lab.diffusion.paths import broadcast
from diffusion_lab.utils.errors import ConfigError


def self_consistency_target(u: AverageVelocity, z: Tensor, t: Tensor, half: Tensor, half_asked: Tensor) -> Tensor:
    """(s(z_t, t, h) + s(z', t - h, h)) / 2 with z' = z_t - h s(z_t, t, h), the average velocity over [t - 2h, t] of
    two steps of h (Frans et al. 2024, Eq. 5 in our time), for u(z, r, t) = s(z, t, t - r); the network is asked for
    the step `half_asked` (h, or 0 at the finest h) and steps by h."""
    first = u(z, t - half_asked, t)
    second = u(z - broadcast(half, z) * first, t - half - half_asked, t - half)
    return (first + second) / 2


class Shortcut(FlowMap):
    """The shortcut model's losses over the flow map of `FlowMap`; see the module docstring.
    self_consistency_fraction: the share of the batch under self-consistency; finest_steps: 1 / the finest half step
    (a power of two; 128 in the paper); the time density and the rest are `FlowMatching`'s options (uniform t here)."""

    name = "shortcut"

    def __init__(self, self_consistency_fraction: float = 0.25, finest_steps: int = 128, time_sampling: str = "uniform",
                 **flow_matching_options):
        super().__init__(time_sampling=time_sampling, **flow_matching_options)
        if not 0 <= self_consistency_fraction <= 1:
            raise ConfigError(f"process.self_consistency_fraction={self_consistency_fraction} must be in [0, 1]")
        if not (isinstance(finest_steps, int) and finest_steps >= 2 and finest_steps & (finest_steps - 1) == 0):
            raise ConfigError(f"process.finest_steps={finest_steps} must be a power of two >= 2 (the paper: 128)")
        self.self_consistency_fraction, self.finest_steps = self_consistency_fraction, finest_steps

    def sample_steps(self, batch: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """(d, t) (B,) float64: d = 2^-k, k uniform in 0..log2(finest_steps) - 1, and t = d j, j uniform in
        1..1/d, so that the step from t to t - d stays in [0, 1]."""
        levels = int(math.log2(self.finest_steps))
        k = torch.randint(0, levels, (batch,), generator=generator, device=device).double()
        j = torch.floor(torch.rand(batch, generator=generator, device=device, dtype=torch.float64) * 2**k) + 1
        d = 2.0**-k
        return d, d * j

    def training_losses(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None,
        clip_x0: bool | None = None, noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample mean ||s(z_t, t, d) - target||^2: the first round(B self_consistency_fraction) samples at
        (d, t) of `sample_steps` against `self_consistency_target`, the rest at d = 0 against eps - x_0, t of
        `sample_time`; eps ~ N(0, I) from `generator` (or `noise`), label dropout and self-conditioning as
        `Process.training_kwargs`. Returns (loss (B,), t (B,))."""
        batch = x0.shape[0]
        n = round(batch * self.self_consistency_fraction)
        t = self.sample_time(batch, generator, x0.device)
        d, t_consistency = self.sample_steps(n, generator, x0.device)
        t, d = torch.cat([t_consistency, t[n:]]), torch.cat([d, torch.zeros_like(t[n:])])
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        z = self.path.sample(x0, t, noise)
        net_kwargs = self.training_kwargs(self.core_denoiser(net), z, self.path.alpha(t), t, generator, class_labels,
                                          clip_x0)
        target = noise - x0
        if n:
            half = d[:n] / 2
            half_asked = torch.where(half * self.finest_steps <= 1, torch.zeros_like(half), half)
            head = {key: value[:n] if isinstance(value, Tensor) and value.ndim else value
                    for key, value in net_kwargs.items()}
            with torch.no_grad():
                u = partial(self.average_velocity, net, **head)
                consistent = self_consistency_target(u, z[:n], t[:n], half, half_asked)
            target = torch.cat([consistent, target[n:]])
        prediction = self.average_velocity(net, z, t - d, t, **net_kwargs)
        return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1), t
