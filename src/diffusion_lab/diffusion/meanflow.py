"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447): the average velocity
u(z_t, r, t) over [r, t] learned from scratch through the MeanFlow identity (their Eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),

on the rectified-flow path z_t = (1 - t) x_0 + t eps of the paper's own time convention (t = 1 noise, r < t), with
v = eps - x_0 the conditional velocity. The loss (their Eq. 9-10) is ||u_theta - sg(u_tgt)||^2 with
u_tgt = v - (t - r) d/dt u_theta, the total derivative a JVP along (v, 0, 1) (`flow_map.time_derivative`), weighted
adaptively by sg(1 / (||delta||^2 + c)^p) (their Sec. 4.3, p = 1 on ImageNet, c = 1e-3). t and r are two draws of
the flow-matching time density (logit-normal, their Tab. 1a), t the larger, and r = t for a fraction of the batch
(`equal_fraction`, 75% on ImageNet: plain flow matching there). Classifier-free guidance is folded into training
(their Eq. 19-21): v is replaced by omega v + (1 - omega) u_theta(z_t, t, t | null) for labelled samples, so that
one step samples the guided model.
"""

from functools import partial

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.flow_map import JVP_MODES, FlowMap, time_derivative
from diffusion_lab.diffusion.paths import broadcast
from diffusion_lab.utils.errors import ConfigError


class MeanFlow(FlowMap):
    """MeanFlow's loss over the flow map of `FlowMap`; see the module docstring. equal_fraction: the share of the
    batch with r = t; adaptive_power, adaptive_c: p and c of the weight (p = 0: the plain squared error);
    guidance_scale: omega of the guidance folded into training (1: none); jvp_mode, fd_step: how d/dt u is computed
    (`time_derivative`); the time density and the rest are `FlowMatching`'s options (logit mean -0.4 here)."""

    name = "meanflow"

    def __init__(
        self,
        equal_fraction: float = 0.75,
        adaptive_power: float = 1.0,
        adaptive_c: float = 1e-3,
        guidance_scale: float = 1.0,
        jvp_mode: str = "auto",
        fd_step: float = 1e-4,
        logit_mean: float = -0.4,
        **flow_matching_options,
    ):
        super().__init__(logit_mean=logit_mean, **flow_matching_options)
        if not 0 <= equal_fraction <= 1:
            raise ConfigError(f"process.equal_fraction={equal_fraction} must be a fraction in [0, 1] (the share of r = t)")
        if not (adaptive_power >= 0 and adaptive_c > 0):
            raise ConfigError(f"process.adaptive_power={adaptive_power} must be >= 0 and process.adaptive_c={adaptive_c} > 0")
        if not guidance_scale >= 1:
            raise ConfigError(f"process.guidance_scale={guidance_scale} must be >= 1 (1: no guidance folded into training)")
        if jvp_mode not in JVP_MODES:
            raise ConfigError(f"process.jvp_mode={jvp_mode!r} is not allowed; choose one of {', '.join(JVP_MODES)}")
        if not 0 < fd_step < 0.1:
            raise ConfigError(f"process.fd_step={fd_step} must be in (0, 0.1) (the finite-difference step in t)")
        self.equal_fraction, self.adaptive_power, self.adaptive_c = equal_fraction, adaptive_power, adaptive_c
        self.guidance_scale, self.jvp_mode, self.fd_step = guidance_scale, jvp_mode, fd_step

    def sample_times(self, batch: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """(r, t) (B,) float64: two draws of `sample_time`, t the larger, then r = t with probability equal_fraction."""
        a, b = self.sample_time(batch, generator, device), self.sample_time(batch, generator, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        equal = torch.rand(batch, generator=generator, device=device, dtype=torch.float64) < self.equal_fraction
        return torch.where(equal, t, r), t

    def target(self, net: nn.Module, z: Tensor, r: Tensor, t: Tensor, velocity: Tensor,
               **net_kwargs) -> tuple[Tensor, Tensor]:
        """(u_theta(z_t, r, t), u_tgt = velocity - (t - r) d/dt u_theta) (MeanFlow, Eq. 10), the derivative along
        dz/dt = velocity; u_tgt carries no gradient. A net that recomputes its forward in the backward pass
        (gradient checkpointing, in training) gets u from a forward apart from the JVP's."""
        recomputes = bool(getattr(net, "gradient_checkpointing", False)) and net.training
        u, du_dt = time_derivative(partial(self.average_velocity, net, **net_kwargs), z, r, t, velocity,
                                   self.jvp_mode, self.fd_step, primal_apart=recomputes)
        return u, (velocity - broadcast(t - r, z) * du_dt).detach()

    def guided_velocity(self, net: nn.Module, z: Tensor, t: Tensor, velocity: Tensor, net_kwargs: dict) -> Tensor:
        """omega v + (1 - omega) u_theta(z_t, t, t | null) without gradient for samples with a class label, v for
        those of the null class (MeanFlow, Eq. 19 and 21); v itself when omega = 1 or the model has no classes."""
        labels = net_kwargs.get("class_labels")
        if self.guidance_scale == 1 or labels is None:
            return velocity
        null = torch.full_like(labels, net.num_classes)
        with torch.no_grad():
            unconditional = self.average_velocity(net, z, t, t, **{**net_kwargs, "class_labels": null})
        guided = self.guidance_scale * velocity + (1 - self.guidance_scale) * unconditional
        return torch.where((labels == null).reshape(-1, *[1] * (z.ndim - 1)), velocity, guided)

    def training_losses(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None,
        clip_x0: bool | None = None, noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample sg(w) ||u_theta(z_t, r, t) - u_tgt||^2 (summed over the sample), w = 1 / (||.||^2 + c)^p, with
        (r, t) from `sample_times`, eps ~ N(0, I) from `generator` (or `noise`), label dropout and
        self-conditioning as `Process.training_kwargs`. Returns (loss (B,), t (B,))."""
        r, t = self.sample_times(x0.shape[0], generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        z = self.path.sample(x0, t, noise)
        net_kwargs = self.training_kwargs(self.core_denoiser(net), z, self.path.alpha(t), t, generator, class_labels,
                                          clip_x0)
        velocity = self.guided_velocity(net, z, t, noise - x0, net_kwargs)
        u, u_target = self.target(net, z, r, t, velocity, **net_kwargs)
        squared = (u.float() - u_target.float()).pow(2).flatten(1).sum(1)
        return squared / (squared.detach() + self.adaptive_c) ** self.adaptive_power, t
