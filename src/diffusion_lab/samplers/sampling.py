"""Samplers: plain functions over a denoiser, in the manner of k-diffusion.

Every sampler has the signature
    sampler(denoiser, x, timesteps, alpha_bars, *, callback=None, noise_sampler=None, **options) -> x_0
where `denoiser(x_t, t) -> DenoiserOutput(x0, eps, log_variance)`, `timesteps` (n,) is the descending list
of timesteps to visit and `alpha_bars` (n + 1,) their alpha_bar with alpha_bars[n] = 1 (the data).
Samplers compute in float64, never look at the schedule table, and know nothing of training.
`callback({"i", "t", "x", "x0"})` is called after each step.
"""

from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.diffusion.gaussian import Denoiser

NoiseSampler = Callable[[Tensor], Tensor]


def _batch(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).expand(x.shape[0])


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    alpha_bars: Tensor,
    *,
    variance: str = "beta_tilde",
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling from p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), sigma_t^2) (Ho et al. 2020, Alg. 2),
    sigma_t^2 = beta_t ("beta"), beta_tilde_t ("beta_tilde") or the network's ("learned"). On a subsequence of
    timesteps, beta_t = 1 - alpha_bar_t / alpha_bar_prev (Nichol & Dhariwal 2021, Sec. 4)."""
    noise_sampler = noise_sampler or torch.randn_like
    for i, t in enumerate(timesteps):
        a_t, a_prev = alpha_bars[i], alpha_bars[i + 1]
        out = denoiser(x, _batch(t, x))
        beta_t = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta_t * out.x0 + (1 - beta_t).sqrt() * (1 - a_prev) * x) / (1 - a_t)
        if i < len(timesteps) - 1:
            if variance == "learned":
                std = (0.5 * out.log_variance).exp()
            else:
                std = (beta_t if variance == "beta" else beta_t * (1 - a_prev) / (1 - a_t)).sqrt()
            x = mean + std * noise_sampler(x)
        else:
            x = mean  # the last step adds no noise
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": out.x0})
    return x


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    alpha_bars: Tensor,
    *,
    eta: float = 0.0,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM: x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z, with
    sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev) (Song et al. 2021, Eq. 12 and 16)."""
    noise_sampler = noise_sampler or torch.randn_like
    for i, t in enumerate(timesteps):
        a_t, a_prev = alpha_bars[i], alpha_bars[i + 1]
        out = denoiser(x, _batch(t, x))
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x = a_prev.sqrt() * out.x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * out.eps
        if sigma > 0:
            x = x + sigma * noise_sampler(x)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": out.x0})
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim}
