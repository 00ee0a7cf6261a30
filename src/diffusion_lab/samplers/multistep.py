"""Multistep exponential integrators in the half log-SNR lambda = log(alpha / sigma): DPM-Solver++ and UniPC
(symbols: `samplers.denoiser`)."""

from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.samplers.denoiser import Denoiser, NoiseSampler, check_option, half_log_snr, nonzero_alphas, report_step


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
    check_option("order", order, (1, 2) if sde else (1, 2, 3))
    noise_sampler = noise_sampler or torch.randn_like
    alphas = nonzero_alphas(alphas)
    lambdas = half_log_snr(alphas, sigmas)
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
        report_step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
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
    check_option("order", order, (1, 2, 3))
    alphas = nonzero_alphas(alphas)
    lambdas = half_log_snr(alphas, sigmas)
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
        report_step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x
