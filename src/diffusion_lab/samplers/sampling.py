"""Samplers: plain functions over a denoiser, in the manner of k-diffusion.

Every sampler has the signature
    sampler(denoiser, x, timesteps, alpha_bars, *, callback=None, noise_sampler=None, **options) -> x_0
where `denoiser(x_t, t) -> DenoiserOutput(x0, eps, log_variance)`, `timesteps` (n,) is the descending list
of timesteps to visit and `alpha_bars` (n + 1,) their alpha_bar with alpha_bars[n] = 1 (the data).
Samplers compute in float64, never look at the schedule table, and know nothing of training.
`callback({"i", "t", "x", "x0"})` is called after each step with the x reached (in the x_t = sqrt(alpha_bar) x_0 +
sqrt(1 - alpha_bar) eps scale) and the x_0 estimate of the step.

Symbols of the ODE solvers: sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et al. 2022) with x / sqrt(alpha_bar)
= x_0 + sigma eps, and lambda = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)) = -log sigma (Lu et al. 2022).
At alpha_bar = 1 (the data), sigma = 0 and lambda = +inf; each solver's last step is first order and returns x0_hat.
"""

from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.diffusion.gaussian import Denoiser, nonzero_alpha_bar
from diffusion_lab.utils.errors import ConfigError

NoiseSampler = Callable[[Tensor], Tensor]


def _batch(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).expand(x.shape[0])


def _check(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"sampler.{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _sigmas(alpha_bars: Tensor) -> Tensor:
    return ((1 - alpha_bars) / alpha_bars).sqrt()


def _lambdas(alpha_bars: Tensor) -> Tensor:
    return 0.5 * (alpha_bars.log() - torch.log1p(-alpha_bars))


@torch.no_grad()
def ddpm(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    alpha_bars: Tensor,
    *,
    variance: str = "auto",
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling from p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), sigma_t^2) (Ho et al. 2020, Alg. 2),
    sigma_t^2 = beta_t ("beta"), beta_tilde_t ("beta_tilde"), or "auto": the network's learned
    exp(v log beta_t + (1 - v) log beta_tilde_t) when it has one, else beta_tilde_t. On a subsequence of
    timesteps, beta_t = 1 - alpha_bar_t / alpha_bar_prev (Nichol & Dhariwal 2021, Sec. 4)."""
    _check("variance", variance, ("auto", "beta", "beta_tilde"))
    noise_sampler = noise_sampler or torch.randn_like
    for i, t in enumerate(timesteps):
        a_t, a_prev = alpha_bars[i], alpha_bars[i + 1]
        out = denoiser(x, _batch(t, x))
        beta_t = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta_t * out.x0 + (1 - beta_t).sqrt() * (1 - a_prev) * x) / (1 - a_t)
        if i < len(timesteps) - 1:
            beta_tilde = beta_t * (1 - a_prev) / (1 - a_t)
            if variance == "auto" and out.variance_interp is not None:
                v = out.variance_interp
                std = (0.5 * (v * beta_t.log() + (1 - v) * beta_tilde.log())).exp()
            else:
                std = (beta_t if variance == "beta" else beta_tilde).sqrt()
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


def _order_at(i: int, n: int, order: int, lower_order_final: bool) -> int:
    """Multistep order at step i of n: warm-up min(order, i + 1); the last step (to sigma = 0) first order; with
    lower_order_final and n < 15, at most second order at the step before (as diffusers, for stability)."""
    if i == n - 1:
        return 1
    if lower_order_final and n < 15 and i == n - 2:
        return min(order, i + 1, 2)
    return min(order, i + 1)


@torch.no_grad()
def dpm_solver_pp(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    alpha_bars: Tensor,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M/3M): multistep exponential integrator of the data-prediction ODE in lambda
    (Lu et al. 2022, "DPM-Solver++", Alg. 2; order 3 as in diffusers). With h = lambda_next - lambda_i, r_k the
    previous steps' h over h, and phi = 1 - e^-h:
    x_next = sigma_next / sigma_i x + alpha_next phi D0 + alpha_next (1 - phi/h) D1 - alpha_next ((h - phi)/h^2 - 1/2) D2."""
    _check("order", order, (1, 2, 3))
    alpha_bars = nonzero_alpha_bar(alpha_bars)
    lambdas, alphas, sigmas = _lambdas(alpha_bars), alpha_bars.sqrt(), (1 - alpha_bars).sqrt()
    n, x0s = len(timesteps), []
    for i, t in enumerate(timesteps):
        out = denoiser(x, _batch(t, x))
        x0s = [out.x0, *x0s[:2]]  # m_i, m_{i-1}, m_{i-2}
        step_order = _order_at(i, n, order, lower_order_final)
        h = lambdas[i + 1] - lambdas[i]
        phi = -torch.expm1(-h)
        x = sigmas[i + 1] / sigmas[i] * x + alphas[i + 1] * phi * x0s[0]
        if step_order >= 2:
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            d1 = (x0s[0] - x0s[1]) / r0
            if step_order == 2:
                x = x + alphas[i + 1] * phi * 0.5 * d1
            else:
                r1 = (lambdas[i - 1] - lambdas[i - 2]) / h
                d1_1 = (x0s[1] - x0s[2]) / r1
                d2 = (d1 - d1_1) / (r0 + r1)
                d1 = d1 + r0 * d2
                x = x + alphas[i + 1] * (1 - phi / h) * d1 - alphas[i + 1] * ((h - phi) / h**2 - 0.5) * d2
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": out.x0})
    return x


def _unipc_coefficients(h: Tensor, rks: Tensor, order: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """UniPC-bh2 in data prediction (Zhao et al. 2023, Alg. 2 and 3 with B(h) = e^h - 1 in -h): returns
    (h phi_1, B(h), rho_p, rho_c) for the previous-step ratios rks = (lambda_{i-k} - lambda_i) / h, k = 1..order-1,
    with rks[-1] = 1. rho solves R rho = b with R_jk = r_k^(j-1), b_j = h phi_(j+1) j! / B(h)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)
    factorial, rows, b = 1, [], []
    for j in range(1, order + 1):
        rows.append(rks ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r, b = torch.stack(rows), torch.stack(b)
    half = torch.full((1,), 0.5, dtype=h.dtype, device=h.device)
    rho_p = half if order == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1]) if order > 2 else b[:0]
    rho_c = half if order == 1 else torch.linalg.solve(r, b)
    return h_phi_1, b_h, rho_p, rho_c


@torch.no_grad()
def unipc(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    alpha_bars: Tensor,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """UniPC-bh2 (Zhao et al. 2023): the multistep predictor UniP-p, then, once the model has been evaluated at
    the predicted point, the corrector UniC raises the order by one at no extra evaluation (the evaluation is
    reused by the next predictor). lower_order_final caps the order at the steps left (as diffusers)."""
    _check("order", order, (1, 2, 3))
    alpha_bars = nonzero_alpha_bar(alpha_bars)
    lambdas, alphas, sigmas = _lambdas(alpha_bars), alpha_bars.sqrt(), (1 - alpha_bars).sqrt()
    n, x0s, previous = len(timesteps), [], None
    for i, t in enumerate(timesteps):
        out = denoiser(x, _batch(t, x))
        if previous is not None:  # UniC: correct x_i with the new evaluation m_i
            x_prev, d1s, h_phi_1, b_h, rho_c = previous
            res = torch.einsum("k,k...->...", rho_c[:-1], d1s) + rho_c[-1] * (out.x0 - x0s[0])
            x = sigmas[i] / sigmas[i - 1] * x_prev - alphas[i] * h_phi_1 * x0s[0] - alphas[i] * b_h * res
        x0s = [out.x0, *x0s[: order - 1]]
        step_order = 1 if i == n - 1 else min(order, i + 1, n - i if lower_order_final else order)
        h = lambdas[i + 1] - lambdas[i]
        rks = torch.stack([*((lambdas[i - k] - lambdas[i]) / h for k in range(1, step_order)), h.new_ones(())])
        d1s = torch.stack([(x0s[k] - x0s[0]) / rks[k - 1] for k in range(1, step_order)] or [torch.zeros_like(x)])
        h_phi_1, b_h, rho_p, rho_c = _unipc_coefficients(h, rks, step_order)
        previous = (x, d1s[: step_order - 1], h_phi_1, b_h, rho_c)
        x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * h_phi_1 * x0s[0]
        if step_order > 1:  # UniP
            x = x - alphas[i + 1] * b_h * torch.einsum("k,k...->...", rho_p, d1s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": out.x0})
    return x


@torch.no_grad()
def heun(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    alpha_bars: Tensor,
    *,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE d(x/sqrt(alpha_bar))/d sigma = eps_hat (Karras et al.
    2022, Alg. 1 without churn): 2 evaluations a step, the last step (to sigma = 0) an Euler step, 2n - 1 in all.
    Use with spacing=karras for the paper's steps; fractional timesteps reach alpha_bar by `alpha_bar_at`."""
    alpha_bars = nonzero_alpha_bar(alpha_bars)
    sigmas, n = _sigmas(alpha_bars), len(timesteps)
    x = x / alpha_bars[0].sqrt()  # = x_0 + sigma eps
    for i, t in enumerate(timesteps):
        out = denoiser(x * alpha_bars[i].sqrt(), _batch(t, x))
        dt = sigmas[i + 1] - sigmas[i]
        x_next = x + dt * out.eps  # Euler step
        if i < n - 1:  # 2nd order correction: average with the slope at the Euler point
            out_next = denoiser(x_next * alpha_bars[i + 1].sqrt(), _batch(timesteps[i + 1], x))
            x_next = x + dt * (out.eps + out_next.eps) / 2
        x = x_next
        if callback is not None:
            callback({"i": i, "t": t, "x": x * alpha_bars[i + 1].sqrt(), "x0": out.x0})
    return x


@torch.no_grad()
def euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    alpha_bars: Tensor,
    *,
    eta: float = 1.0,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral): an Euler step of the probability-flow ODE down to
    sigma_down, then fresh noise of std sigma_up, with sigma_up = min(sigma_next, eta sqrt(sigma_next^2
    (sigma^2 - sigma_next^2) / sigma^2)) and sigma_down = sqrt(sigma_next^2 - sigma_up^2); sigma_up = 0 where sigma
    rises (after the 2^-24 of a zero terminal SNR, `nonzero_alpha_bar`), where diffusers' sqrt gives NaN."""
    noise_sampler = noise_sampler or torch.randn_like
    alpha_bars = nonzero_alpha_bar(alpha_bars)
    sigmas = _sigmas(alpha_bars)
    x = x / alpha_bars[0].sqrt()
    for i, t in enumerate(timesteps):
        out = denoiser(x * alpha_bars[i].sqrt(), _batch(t, x))
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        drop = (sigma**2 - sigma_next**2).clamp(min=0)
        sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * drop / sigma**2).sqrt())
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        x = x + (sigma_down - sigma) * out.eps
        if sigma_up > 0:
            x = x + sigma_up * noise_sampler(x)
        if callback is not None:
            callback({"i": i, "t": t, "x": x * alpha_bars[i + 1].sqrt(), "x0": out.x0})
    return x


SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm_solver_pp": dpm_solver_pp,
    "unipc": unipc,
    "heun": heun,
    "euler_ancestral": euler_ancestral,
}
