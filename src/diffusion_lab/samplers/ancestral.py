"""Samplers that step by the posterior q(x_s | x_t, x_0) and fresh noise: DDPM, DDIM, Euler ancestral, and
multistep consistency sampling (symbols: `samplers.denoiser`)."""

from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.samplers.denoiser import Denoiser, NoiseSampler, check_option, report_step


def posterior(alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_s | x_t, x_0) = N(c_t x_t + c_0 x_0, var) for s less noisy than t, with alpha_ts = alpha_t / alpha_s and
    sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2: c_t = alpha_ts sigma_s^2 / sigma_t^2, c_0 = alpha_s sigma_ts^2 /
    sigma_t^2, var = sigma_ts^2 sigma_s^2 / sigma_t^2 (Kingma et al. 2021, App. A; Ho et al. 2020, Eq. 7 for DDPM,
    where sigma_ts^2 = beta_t). Returns (c_t, c_0, sigma_ts^2)."""
    alpha_ts = alpha_t / alpha_s
    sigma_ts2 = sigma_t**2 - alpha_ts**2 * sigma_s**2
    return alpha_ts * sigma_s**2 / sigma_t**2, alpha_s * sigma_ts2 / sigma_t**2, sigma_ts2


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    variance: str = "auto",
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling from p(x_s | x_t) = N(mu_tilde(x_t, x0_hat), var) (Ho et al. 2020, Alg. 2) with the
    posterior of `posterior`: var = beta_tilde = sigma_ts^2 sigma_s^2 / sigma_t^2 ("beta_tilde"), beta = sigma_ts^2
    ("beta"), or "auto": the network's learned exp(v log beta + (1 - v) log beta_tilde) when it has one, else
    beta_tilde. On a subsequence of DDPM timesteps, beta = 1 - alpha_bar_t / alpha_bar_s (Nichol & Dhariwal 2021,
    Sec. 4). The last step adds no noise."""
    check_option("variance", variance, ("auto", "beta", "beta_tilde"))
    noise_sampler = noise_sampler or torch.randn_like
    n = len(alphas) - 1
    for i in range(n):
        out = denoiser(x, alphas[i], sigmas[i])
        c_t, c_0, beta = posterior(alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1])
        x_mean = c_t * x + c_0 * out.x0
        if i < n - 1:
            beta_tilde = beta * sigmas[i + 1] ** 2 / sigmas[i] ** 2
            if variance == "auto" and out.variance_interp is not None:
                v = out.variance_interp
                std = (0.5 * (v * beta.log() + (1 - v) * beta_tilde.log())).exp()
            else:
                std = (beta if variance == "beta" else beta_tilde).sqrt()
            x = x_mean + std * noise_sampler(x)
        else:
            x = x_mean
        report_step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x


@torch.no_grad()
def ddim(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with c = eta sqrt(beta_tilde), beta_tilde the
    posterior variance of `posterior` (Song et al. 2021, Eq. 12 and 16). With eta = 0 it is the Euler step of the
    probability-flow ODE in any frame, and on rectified flow the Euler step x + (t_s - t) v."""
    noise_sampler = noise_sampler or torch.randn_like
    for i in range(len(alphas) - 1):
        out = denoiser(x, alphas[i], sigmas[i])
        _, _, beta = posterior(alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1])
        c = eta * (beta * sigmas[i + 1] ** 2 / sigmas[i] ** 2).clamp(min=0).sqrt()
        x = alphas[i + 1] * out.x0 + (sigmas[i + 1] ** 2 - c**2).clamp(min=0).sqrt() * out.eps
        if c > 0:
            x = x + c * noise_sampler(x)
        report_step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x


@torch.no_grad()
def euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral), written in x for any path: a DDIM step to the noise
    sigma_down, then fresh noise of std sigma_up, x_next = alpha_next x0 + sigma_down eps + sigma_up z, with
    sigma_up = min(sigma_next, eta sigma_next sqrt(1 - SNR_i / SNR_next)) and sigma_down = sqrt(sigma_next^2 -
    sigma_up^2), SNR = alpha^2 / sigma^2; in the EDM frame this is k-diffusion's sigma_up = eta sqrt(s_next^2 (s^2 -
    s_next^2) / s^2). sigma_up = 0 where the SNR falls."""
    noise_sampler = noise_sampler or torch.randn_like
    for i in range(len(alphas) - 1):
        out = denoiser(x, alphas[i], sigmas[i])
        snr_ratio = (alphas[i] * sigmas[i + 1]) ** 2 / (sigmas[i] * alphas[i + 1]) ** 2  # SNR_i / SNR_next
        sigma_up = torch.minimum(sigmas[i + 1], eta * sigmas[i + 1] * (1 - snr_ratio).clamp(min=0).sqrt())
        sigma_down = (sigmas[i + 1] ** 2 - sigma_up**2).sqrt()
        x = alphas[i + 1] * out.x0 + sigma_down * out.eps
        if sigma_up > 0:
            x = x + sigma_up * noise_sampler(x)
        report_step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x


@torch.no_grad()
def consistency(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    sigma_min: float = 0.0,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): x_0 = f(x, tau_0) at the first grid point, then at
    each later noisy point x = alpha_n x_0 + sqrt(sigma_n^2 - alpha_n^2 sigma_min^2) z and x_0 = f(x, tau_n); one
    evaluation a step. sigma_min: the level where the consistency function is the identity (process.sigma_min), so
    that x_0 already holds noise of that level; 0 on processes without one."""
    noise_sampler = noise_sampler or torch.randn_like
    n = len(alphas) - 1
    for i in range(n):
        out = denoiser(x, alphas[i], sigmas[i])
        x = alphas[i + 1] * out.x0
        if i < n - 1:
            x = x + (sigmas[i + 1] ** 2 - (alphas[i + 1] * sigma_min) ** 2).clamp(min=0).sqrt() * noise_sampler(x)
        report_step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x
