"""Solvers of the probability-flow ODE in the EDM or the rectified-flow frame: Heun, Euler, the EDM sampler and
adaptive Dormand-Prince (symbols: `samplers.denoiser`)."""

from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.samplers.denoiser import Denoiser, DenoiserOutput, NoiseSampler, SamplerError, report_step
from diffusion_lab.utils.errors import ConfigError


def ode_frame(alphas: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(scale c, noise level s) of the frame the Karras-form solvers step in, x = c (x_0 + ... ) with y = x / c:
    the EDM frame c = alpha, s = sigma / alpha (Karras et al. 2022, Sec. 3; diffusers' and k-diffusion's Heun on
    DDPM) when alpha > 0 all along; a path that starts at alpha = 0 (flow matching's t = 1, where sigma / alpha is
    infinite) steps in the rectified-flow frame c = alpha + sigma, s = sigma / (alpha + sigma), which for flow
    matching is x and t themselves (diffusers' FlowMatchHeunDiscreteScheduler)."""
    scale = alphas + sigmas if alphas[0] == 0 else alphas
    return scale, sigmas / scale


def _frame_denoise(denoiser: Denoiser, y: Tensor, s: Tensor, rectified: bool) -> DenoiserOutput:
    """The denoiser at y in the frame: y = x_0 + s eps (EDM frame) or (1 - s) x_0 + s eps (rectified-flow frame)."""
    return denoiser(y, 1 - s if rectified else torch.ones_like(s), s)


def _slope(out: DenoiserOutput, rectified: bool) -> Tensor:
    """dy/ds of the probability-flow ODE in the frame: eps (EDM frame), eps - x_0 (rectified-flow frame)."""
    return out.eps - out.x0 if rectified else out.eps


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    second_order: bool = True,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE dy/ds = slope in the frame of `ode_frame` (Karras et al.
    2022, Alg. 1 without churn): 2 evaluations a step, the last step (to s = 0) an Euler step, 2n - 1 in all.
    second_order=False is Euler's method (`euler`). Use DDPM's spacing=karras for the paper's steps."""
    scale, s = ode_frame(alphas, sigmas)
    rectified = bool(alphas[0] == 0)
    n = len(alphas) - 1
    y = x / scale[0]
    for i in range(n):
        out = _frame_denoise(denoiser, y, s[i], rectified)
        slope = _slope(out, rectified)
        y_next = y + (s[i + 1] - s[i]) * slope
        if second_order and i < n - 1:  # average with the slope at the Euler point
            out_next = _frame_denoise(denoiser, y_next, s[i + 1], rectified)
            y_next = y + (s[i + 1] - s[i]) * (slope + _slope(out_next, rectified)) / 2
        y = y_next
        report_step(callback, i, y * scale[i + 1], out, alphas[i + 1], sigmas[i + 1])
    return y * scale[-1]


@torch.no_grad()
def euler(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (`heun` without the correction); on flow matching
    x_next = x + (t_next - t) v (Liu et al. 2023; diffusers' FlowMatchEulerDiscreteScheduler)."""
    return heun(denoiser, x, alphas, sigmas, second_order=False, callback=callback)


def check_edm_grid(alphas: Tensor, sigmas: Tensor) -> None:
    """`edm` steps in s = sigma / alpha, which must be finite at every point."""
    if alphas[0] == 0:
        raise SamplerError("sampler=edm steps in sigma / alpha, which is infinite where this process starts (alpha = 0, "
                           "e.g. flow matching's t = 1); use sampler=heun or sampler=euler")


@torch.no_grad()
def edm(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """The EDM stochastic sampler (Karras et al. 2022, Alg. 2) in the EDM frame y = x / alpha, s = sigma / alpha:
    at each step with S_min <= s_i <= S_max, gamma = min(S_churn / n, sqrt(2) - 1) raises the noise to
    s_hat = s_i (1 + gamma) by adding sqrt(s_hat^2 - s_i^2) S_noise z, then a Heun step from s_hat to s_{i+1} (Euler
    on the last). S_churn = 0 is `heun`. It needs alpha > 0 at every point (sigma / alpha finite)."""
    check_edm_grid(alphas, sigmas)
    noise_sampler = noise_sampler or torch.randn_like
    s, n = sigmas / alphas, len(alphas) - 1
    gamma_max = min(S_churn / n, 2**0.5 - 1)
    y = x / alphas[0]
    for i in range(n):
        gamma = gamma_max if S_min <= float(s[i]) <= S_max else 0.0
        s_hat = s[i] * (1 + gamma)
        if gamma > 0:
            y = y + (s_hat**2 - s[i] ** 2).sqrt() * S_noise * noise_sampler(y)
        out = denoiser(y, torch.ones_like(s_hat), s_hat)
        y_next = y + (s[i + 1] - s_hat) * out.eps
        if i < n - 1:
            out_next = denoiser(y_next, torch.ones_like(s_hat), s[i + 1])
            y_next = y + (s[i + 1] - s_hat) * (out.eps + out_next.eps) / 2
        y = y_next
        report_step(callback, i, y * alphas[i + 1], out, alphas[i + 1], sigmas[i + 1])
    return y * alphas[-1]


@torch.no_grad()
def dopri5(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_evals: int = 1000,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """The probability-flow ODE dz/ds = eps_hat - x0_hat in the rectified-flow frame (`ode_frame`, finite on every
    path) solved by adaptive Dormand-Prince 5(4) (torchdiffeq's dopri5, with rtol/atol) from the first to the last
    noisy point of the grid, then x_0 = the denoiser's estimate there (the steps in between are the solver's own).
    More than `max_evals` network evaluations raise a SamplerError."""
    from torchdiffeq import odeint

    if not (rtol > 0 and atol > 0 and max_evals >= 1):
        raise ConfigError(f"sampler.rtol={rtol}, sampler.atol={atol} must be > 0 and sampler.max_evals={max_evals} >= 1")
    s = sigmas / (alphas + sigmas)
    evals = [0]

    def slope(s_now: Tensor, z: Tensor) -> Tensor:
        evals[0] += 1
        if evals[0] > max_evals:
            raise SamplerError(f"sampler=dopri5 needed more than sampler.max_evals={max_evals} network evaluations "
                               f"(at s={float(s_now):.4g}); raise max_evals or loosen rtol={rtol}, atol={atol}")
        s_now = s_now.clamp(s[-2], s[0])  # torchdiffeq's first-step selection may probe past the interval
        out = denoiser(z, 1 - s_now, s_now)
        return out.eps - out.x0

    z = x / (alphas[0] + sigmas[0])
    z = odeint(slope, z, torch.stack([s[0], s[-2]]), rtol=rtol, atol=atol, method="dopri5")[-1]
    out = denoiser(z, 1 - s[-2], s[-2])
    report_step(callback, 0, out.x0, out, alphas[-1], sigmas[-1])
    return out.x0
