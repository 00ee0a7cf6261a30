"""The interface between the samplers and a model: `denoiser(x, alpha, sigma) -> DenoiserOutput`, and the helpers
every sampler shares. Samplers are plain functions over a denoiser and a grid of noise levels, as k-diffusion's.

Every Gaussian process here is x = alpha x_0 + sigma eps for a path of (alpha, sigma): DDPM's table
(alpha = sqrt(alpha_bar)), EDM (alpha = 1) and rectified flow (alpha = 1 - t, sigma = t). A sampler sees only
that path at the points it visits:
    sampler(denoiser, x, alphas, sigmas, *, callback=None, noise_sampler=None, **options) -> x_0
with `alphas`, `sigmas` (n + 1,) descending in noise, the last point the data (alpha = 1, sigma = 0), and
`denoiser(x, alpha, sigma) -> DenoiserOutput(x0, eps, variance_interp)` the model's x_0 estimate for an x at that
noise level (eps = (x - alpha x0) / sigma is derived from it). The denoiser accepts any (alpha, sigma): a process
maps it to the point of its own path with the same signal-to-noise ratio, so a sampler may step in a rescaled frame.
Samplers compute in float64, import no process and know nothing of training.
`callback({"i", "x", "x0", "alpha", "sigma"})` is called after each step with the x reached, at the noise level
(alpha, sigma) reached, and the x_0 estimate of the step.

Symbols: lambda = log(alpha / sigma), the half log-SNR (Lu et al. 2022); the EDM frame y = x / alpha with noise level
s = sigma / alpha, where y = x_0 + s eps (Karras et al. 2022, Eq. 4 with s(t) = alpha); the rectified-flow frame
z = x / (alpha + sigma) with s = sigma / (alpha + sigma) in [0, 1], where z = (1 - s) x_0 + s eps (Liu et al. 2023).
"""

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from diffusion_lab.utils.errors import ConfigError


class DenoiserOutput(NamedTuple):
    """What a sampler gets back from one network evaluation at (x, alpha, sigma)."""

    x0: Tensor  # predicted x_0 (clipped to [-1, 1] when asked; eps then recomputed from it)
    eps: Tensor  # predicted noise, consistent with x0: x = alpha x0 + sigma eps
    # learned variance (Improved DDPM): v of Sigma = exp(v log beta + (1 - v) log beta_tilde) (Nichol & Dhariwal 2021,
    # Eq. 15), with beta, beta_tilde those of the step the sampler takes, so it holds for any spacing of the steps
    # (their Sec. 4); None when the variance is fixed
    variance_interp: Tensor | None = None


Denoiser = Callable[[Tensor, Tensor, Tensor], DenoiserOutput]
NoiseSampler = Callable[[Tensor], Tensor]
ALPHA_FLOOR = 2.0**-12  # alpha = 0 (zero terminal SNR, flow matching's t = 1) where log-SNR must stay finite


class SamplerError(ConfigError):
    """A sampler that cannot run on the grid it was given, or that ran out of its evaluation budget."""


def check_option(name: str, value, allowed: tuple) -> None:
    """ConfigError (one line) unless sampler.<name> is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"sampler.{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def nonzero_alphas(alphas: Tensor) -> Tensor:
    """alphas with 0 replaced by 2^-12 (alpha_bar = 2^-24, as diffusers' rescale_betas_zero_snr), every other value
    kept, so that lambda and sigma / alpha stay finite."""
    return torch.where(alphas == 0, torch.full_like(alphas, ALPHA_FLOOR), alphas)


def half_log_snr(alphas: Tensor, sigmas: Tensor) -> Tensor:
    """lambda = log(alpha / sigma) (Lu et al. 2022)."""
    return alphas.log() - sigmas.log()


def report_step(callback: Callable | None, i: int, x: Tensor, out: DenoiserOutput, alpha: Tensor, sigma: Tensor) -> None:
    """callback({"i", "x", "x0", "alpha", "sigma"}) after step i, if any."""
    if callback is not None:
        callback({"i": i, "x": x, "x0": out.x0, "alpha": alpha, "sigma": sigma})


class CountedDenoiser(nn.Module):
    """A denoiser that counts its evaluations in `evaluations` (what `Sampler` reports as `evaluations_used`)."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser, self.evaluations = denoiser, 0

    def forward(self, x: Tensor, alpha: Tensor, sigma: Tensor, **options) -> DenoiserOutput:
        self.evaluations += 1
        return self.denoiser(x, alpha, sigma, **options)


def reset_state(denoiser: Denoiser) -> None:
    """Start a sampling run afresh: `reset_sampling_state()` every part of a denoiser module that keeps state between
    evaluations (self-conditioning's previous x_0)."""
    if isinstance(denoiser, nn.Module):
        for module in denoiser.modules():
            if hasattr(module, "reset_sampling_state"):
                module.reset_sampling_state()
