"""Schedules: closed forms against step-by-step noising, and against diffusers' betas."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.utils.errors import ConfigError

SCHEDULES = ["linear", "cosine", "quadratic", "sigmoid"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_closed_form_equals_step_by_step_noising(name):
    """Composing q(x_t | x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t) t times gives N(sqrt(alpha_bar_t) x0, 1-alpha_bar_t)."""
    process = GaussianDiffusion(beta_schedule(name, 300))
    scale, variance = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for t, beta in enumerate(process.betas):
        scale, variance = (1 - beta).sqrt() * scale, (1 - beta) * variance + beta
        assert torch.allclose(scale, process.sqrt_alphas_cumprod[t], rtol=1e-12, atol=0)
        assert torch.allclose(variance, 1 - process.alphas_cumprod[t], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_matches_sequential_noising_in_distribution(name):
    """Monte Carlo: noising a fixed x0 step by step and in one jump give the same mean and variance."""
    process = GaussianDiffusion(beta_schedule(name, 50))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((20000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for beta in process.betas:
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    t = torch.full((len(x0),), 49)
    jump = process.q_sample(x0, t, torch.randn(x0.shape, generator=generator, dtype=torch.float64))
    for sample in (x, jump):
        assert abs(sample.mean() - 0.7 * process.sqrt_alphas_cumprod[49]) < 0.02
        assert abs(sample.var() - (1 - process.alphas_cumprod[49])) < 0.03


@pytest.mark.parametrize(
    "name, diffusers_name", [("linear", "linear"), ("quadratic", "scaled_linear"), ("sigmoid", "sigmoid"), ("cosine", "squaredcos_cap_v2")]
)
def test_betas_equal_diffusers(name, diffusers_name):
    ours = beta_schedule(name, 1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name).betas.double()
    assert torch.allclose(ours, theirs, atol=1e-6)  # diffusers builds its betas in float32


def test_zero_terminal_snr_equals_diffusers_and_ends_at_zero():
    ours = beta_schedule("linear", 1000, zero_terminal_snr=True)
    theirs = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True).betas.double()
    assert torch.allclose(ours, theirs, atol=1e-6)
    alphas_cumprod = torch.cumprod(1 - ours, 0)
    assert alphas_cumprod[-1] == 0
    assert torch.allclose(alphas_cumprod[0], torch.cumprod(1 - beta_schedule("linear", 1000), 0)[0])


@pytest.mark.parametrize(
    "kwargs, key",
    [({"name": "nope", "timesteps": 10}, "schedule.name"), ({"name": "linear", "timesteps": 0}, "schedule.timesteps"),
     ({"name": "linear", "timesteps": 10, "beta_start": 0.5, "beta_end": 0.1}, "schedule.beta_start")],
)
def test_bad_schedule_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        beta_schedule(**kwargs)
