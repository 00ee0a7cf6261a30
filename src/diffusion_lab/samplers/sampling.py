"""Samplers: plain functions over a denoiser and a grid of noise levels, in the manner of k-diffusion.

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
from torch import Tensor

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


def _check(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"sampler.{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _nonzero(alphas: Tensor) -> Tensor:
    """alphas with 0 replaced by 2^-12 (alpha_bar = 2^-24, as diffusers' rescale_betas_zero_snr), every other value
    kept, so that lambda and sigma / alpha stay finite."""
    return torch.where(alphas == 0, torch.full_like(alphas, ALPHA_FLOOR), alphas)


def _lambdas(alphas: Tensor, sigmas: Tensor) -> Tensor:
    return alphas.log() - sigmas.log()


def _step(callback: Callable | None, i: int, x: Tensor, out: DenoiserOutput, alpha: Tensor, sigma: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "x0": out.x0, "alpha": alpha, "sigma": sigma})


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
    _check("variance", variance, ("auto", "beta", "beta_tilde"))
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
        _step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
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
        _step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
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
    alphas: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    sde: bool = False,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M/3M): multistep exponential integrator of the data-prediction ODE in lambda
    (Lu et al. 2022, "DPM-Solver++", Alg. 2; order 3 as in diffusers). With h = lambda_next - lambda_i, r_k the
    previous steps' h over h, and phi = 1 - e^-h:
    x_next = sigma_next / sigma_i x + alpha_next phi D0 + alpha_next (1 - phi/h) D1 - alpha_next ((h - phi)/h^2 - 1/2) D2.
    sde=True: DPM-Solver++(2M) SDE (their Sec. 5; diffusers' sde-dpmsolver++ with the midpoint solver), orders 1-2:
    x_next = sigma_next / sigma_i e^-h x + alpha_next (1 - e^-2h) (D0 + D1 / 2) + sigma_next sqrt(1 - e^-2h) z."""
    _check("order", order, (1, 2) if sde else (1, 2, 3))
    noise_sampler = noise_sampler or torch.randn_like
    alphas = _nonzero(alphas)
    lambdas = _lambdas(alphas, sigmas)
    n, x0s = len(alphas) - 1, []
    for i in range(n):
        out = denoiser(x, alphas[i], sigmas[i])
        x0s = [out.x0, *x0s[:2]]  # m_i, m_{i-1}, m_{i-2}
        step_order = _order_at(i, n, order, lower_order_final)
        h = lambdas[i + 1] - lambdas[i]
        d1 = (x0s[0] - x0s[1]) / ((lambdas[i] - lambdas[i - 1]) / h) if step_order >= 2 else None
        if sde:
            phi_2h = -torch.expm1(-2 * h)
            x = sigmas[i + 1] / sigmas[i] * (-h).exp() * x + alphas[i + 1] * phi_2h * x0s[0]
            if d1 is not None:
                x = x + 0.5 * alphas[i + 1] * phi_2h * d1
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * phi_2h.sqrt() * noise_sampler(x)
        else:
            phi = -torch.expm1(-h)
            x = sigmas[i + 1] / sigmas[i] * x + alphas[i + 1] * phi * x0s[0]
            if step_order == 2:
                x = x + alphas[i + 1] * phi * 0.5 * d1
            elif step_order == 3:
                r0, r1 = (lambdas[i] - lambdas[i - 1]) / h, (lambdas[i - 1] - lambdas[i - 2]) / h
                d2 = (d1 - (x0s[1] - x0s[2]) / r1) / (r0 + r1)
                d1 = d1 + r0 * d2
                x = x + alphas[i + 1] * (1 - phi / h) * d1 - alphas[i + 1] * ((h - phi) / h**2 - 0.5) * d2
        _step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
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
    alphas: Tensor,
    sigmas: Tensor,
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
    alphas = _nonzero(alphas)
    lambdas = _lambdas(alphas, sigmas)
    n, x0s, previous = len(alphas) - 1, [], None
    for i in range(n):
        out = denoiser(x, alphas[i], sigmas[i])
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
        _step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x


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
        _step(callback, i, y * scale[i + 1], out, alphas[i + 1], sigmas[i + 1])
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
        _step(callback, i, y * alphas[i + 1], out, alphas[i + 1], sigmas[i + 1])
    return y * alphas[-1]


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
        _step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x


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
    _step(callback, 0, out.x0, out, alphas[-1], sigmas[-1])
    return out.x0


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
        _step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x


GRID_CHECKS = {"edm": check_edm_grid}  # samplers that cannot run on every grid: the check they make first

SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm_solver_pp": dpm_solver_pp,
    "unipc": unipc,
    "heun": heun,
    "euler": euler,
    "edm": edm,
    "euler_ancestral": euler_ancestral,
    "dopri5": dopri5,
    "consistency": consistency,
}
