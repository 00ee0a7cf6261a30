"""Convergence order of the ODE samplers on discretizations that are ours alone (quadratic and karras spacing,
fractional timesteps), on Gaussian data N(mean, std^2) whose exact denoiser and ODE solution are closed forms:
doubling the steps divides the error by about 2^order."""

import math

import pytest
import torch
from toy_models import gaussian_denoiser, gaussian_ode_solution, run_sampler

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.samplers import Sampler

MEAN, STD = 0.3, 0.5


def ode_error(process, sampler, x_T):
    """Max error of x at the last noisy step (before the final jump to x0_hat, which is exact only for
    sigma -> 0) against the exact probability-flow ODE solution."""
    alphas, sigmas = process.sampling_grid(sampler.steps, sampler.spacing)
    xs = []
    run_sampler(sampler, process, gaussian_denoiser(MEAN, STD), x_T, callback=lambda info: xs.append(info["x"]))
    exact = gaussian_ode_solution(x_T, alphas[0], sigmas[0], alphas[-2], sigmas[-2], MEAN, STD)
    return (xs[-2] - exact).abs().max().item()


@pytest.mark.parametrize(
    "algorithm, options, order",
    [
        ("ddim", {}, 1),
        ("euler", {}, 1),
        ("euler_ancestral", {"eta": 0.0}, 1),  # eta = 0: the Euler method
        ("heun", {}, 2),
        ("edm", {}, 2),  # S_churn = 0: Heun's method
        ("dpm_solver_pp", {"order": 2, "lower_order_final": False}, 2),
        ("unipc", {"order": 1, "lower_order_final": False}, 2),  # UniC raises the order by one
        ("unipc", {"order": 2, "lower_order_final": False}, 3),
    ],
)
@pytest.mark.parametrize("spacing", ["quadratic", "karras"])
def test_convergence_order(algorithm, options, order, spacing):
    process = GaussianDiffusion(beta_schedule("linear", 1000))
    x_T = torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # n steps = n - 1 intervals before the final jump: 16, 32, 64 intervals
    errors = [ode_error(process, Sampler(algorithm, n, spacing, **options), x_T) for n in (17, 33, 65)]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(o - order) < 0.3 for o in observed), (errors, observed)
