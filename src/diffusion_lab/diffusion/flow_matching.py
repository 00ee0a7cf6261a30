"""Rectified flow / conditional flow matching with the straight path (Lipman et al. 2023; Liu et al. 2023;
Esser et al. 2024, "Scaling Rectified Flow Transformers", SD3), as a Gaussian process:

    x_t = (1 - t) x_0 + t eps,   t in [0, 1]   (alpha = 1 - t, sigma = t),

with the network predicting the velocity v = dx_t/dt = eps - x_0 and the loss E ||v_hat(x_t, t) - v||^2 over the
time density of `time_sampling` (SD3, Sec. 3.1):
- uniform: t ~ U(0, 1);
- logit_normal: t = sigmoid(n), n ~ N(logit_mean, logit_std^2);
- mode: t = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1) (mode_scale in [-1, 2/(pi - 2)]).
The network sees time_scale * t (1000 t, as SD3 and diffusers' FlowMatchEulerDiscreteScheduler), so backbones keep
the timestep range of DDPM. Sampling grids are uniform in t from 1 to 0, shifted by the SD3 time shift
t' = shift t / (1 + (shift - 1) t) (their Eq. 23; shift > 1 spends more steps at high noise).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.paths import RectifiedFlowPath, broadcast, velocity_from_x0_eps, x0_eps_from_velocity
from diffusion_lab.diffusion.process import Process
from diffusion_lab.samplers.denoiser import DenoiserOutput
from diffusion_lab.utils.errors import ConfigError

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")
SPACINGS = ("uniform",)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024, Eq. 23): the same noise level at shift^2 times the
    resolution's signal; shift = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


class FlowMatching(Process):
    """Flow matching on x_t = (1 - t) x_0 + t eps with a velocity target; see the module docstring."""

    name = "flow_matching"
    default_spacing = "uniform"
    clip_x0 = False

    def __init__(
        self,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        time_scale: float = 1000.0,
        cond_drop_prob: float = 0.1,
    ):
        super().__init__(cond_drop_prob)
        if time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(f"process.time_sampling={time_sampling!r} is not allowed; choose one of {', '.join(TIME_SAMPLINGS)}")
        if not logit_std > 0:
            raise ConfigError(f"process.logit_std={logit_std} must be > 0 (the std of the logit-normal time density)")
        if not -1 <= mode_scale <= 2 / (math.pi - 2):
            raise ConfigError(f"process.mode_scale={mode_scale} must be in [-1, {2 / (math.pi - 2):.4f}] (a density on [0, 1])")
        if not shift > 0:
            raise ConfigError(f"process.shift={shift} must be > 0 (the SD3 time shift; 1 leaves the grid as it is)")
        if not time_scale > 0:
            raise ConfigError(f"process.time_scale={time_scale} must be > 0")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.mode_scale, self.shift, self.time_scale = mode_scale, shift, time_scale
        self.path = RectifiedFlowPath()

    def sample_time(self, batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
        """t (B,) float64 from the training density of `time_sampling`."""
        if self.time_sampling == "logit_normal":
            n = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
            return torch.sigmoid(self.logit_mean + self.logit_std * n)
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        if self.time_sampling == "uniform":
            return u
        return 1 - u - self.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)

    def training_losses(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None,
        clip_x0: bool | None = None, noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample mean ||v_hat(x_t, t) - (eps - x_0)||^2 with t from `sample_time` and eps ~ N(0, I) from
        `generator`, or the eps given as `noise` (a coupling, as reflow's) (Lipman et al. 2023, Eq. 23; Liu et al.
        2023, Eq. 1); label dropout and self-conditioning as `Process.training_kwargs`. Returns (loss (B,), t (B,))."""
        t = self.sample_time(x0.shape[0], generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.path.sample(x0, t, noise)
        denoiser, alpha = self.core_denoiser(net), self.path.alpha(t)
        net_kwargs = self.training_kwargs(denoiser, x_t, alpha, t, generator, class_labels, clip_x0)
        out = denoiser(x_t, alpha, t, **net_kwargs)
        d_alpha, d_sigma = broadcast(self.path.d_alpha(t), x0), broadcast(self.path.d_sigma(t), x0)
        velocity = velocity_from_x0_eps(d_alpha, d_sigma, out.x0, out.eps)
        target = velocity_from_x0_eps(d_alpha, d_sigma, x0, noise)
        per_sample = F.mse_loss(velocity.float(), target.float(), reduction="none").flatten(1).mean(1)
        return per_sample, t

    def x0_eps(self, x_t: Tensor, t: Tensor, velocity: Tensor) -> tuple[Tensor, Tensor]:
        """(x_0, eps) = (x_t - t v, x_t + (1 - t) v) from the velocity at per-sample t (B,), by the path's conversion."""
        path, t = self.path, broadcast(t, x_t)
        return x0_eps_from_velocity(x_t, path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t), velocity)

    def network_inputs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x_t and time_scale * t."""
        return x, self.time_scale * t

    def read_output(self, x: Tensor, t: Tensor, output: Tensor) -> DenoiserOutput:
        """The output is the velocity v_hat: (x_0, eps) by `x0_eps`."""
        return DenoiserOutput(*self.x0_eps(x, t, output))

    def sampling_grid(self, steps: int, spacing: str = "uniform") -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) = (1 - t, t) at t = shift_time(linspace(1, 0, steps + 1)): `steps` noisy points from
        t = 1 (pure noise) and then the data."""
        if spacing not in SPACINGS:
            raise ConfigError(f"sampler.spacing={spacing!r} is not a spacing of process flow_matching; choose one of "
                              f"{', '.join(SPACINGS)} (and process.shift for the SD3 time shift)")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"sampler.steps={steps} must be an integer >= 1")
        t = shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), self.shift)
        return 1 - t, t
