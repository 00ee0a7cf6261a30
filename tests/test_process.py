"""The Gaussian process: posterior coefficients against Bayes' rule, q_sample against its formula, the loss types."""

import pytest
import torch
import torch.nn.functional as F

from diffusion_lab.diffusion.gaussian import GaussianDiffusion, elementwise_loss
from diffusion_lab.diffusion.schedules import beta_schedule


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_bayes_rule(name):
    """q(x_{t-1} | x_t, x0) from prior N(sqrt(a_prev) x0, 1 - a_prev) and likelihood N(sqrt(alpha_t) x_{t-1}, beta_t)."""
    p = GaussianDiffusion(beta_schedule(name, 200))
    beta, a_prev = p.betas[1:], p.alphas_cumprod_prev[1:]
    precision = 1 / (1 - a_prev) + (1 - beta) / beta
    variance = 1 / precision
    assert torch.allclose(p.posterior_variance[1:], variance, rtol=1e-10)
    assert torch.allclose(p.posterior_mean_coef1[1:], variance * a_prev.sqrt() / (1 - a_prev), rtol=1e-10)
    assert torch.allclose(p.posterior_mean_coef2[1:], variance * (1 - beta).sqrt() / beta, rtol=1e-10)
    # t = 1 (index 0): x_0 is known exactly given x0
    assert p.posterior_variance[0] == 0 and p.posterior_mean_coef2[0] == 0
    assert torch.allclose(p.posterior_mean_coef1[0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-12)
    # q_posterior puts them together
    x0, x_t = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 5, 199])
    mean, var, log_var = p.q_posterior(x0, x_t, t)
    expected = p.posterior_mean_coef1[t].view(-1, 1, 1, 1) * x0 + p.posterior_mean_coef2[t].view(-1, 1, 1, 1) * x_t
    assert torch.allclose(mean, expected)
    assert torch.allclose(log_var[1:].flatten(), p.posterior_variance[t[1:]].log())


class ConstantNet(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(value))

    def forward(self, x, t, **kwargs):
        return torch.zeros_like(x) + self.value


@pytest.mark.parametrize(
    "loss_type, fn",
    [("l1", F.l1_loss), ("l2", F.mse_loss), ("huber", lambda a, b: F.smooth_l1_loss(a, b, beta=1.0))],
)
def test_loss_types_on_eps(loss_type, fn):
    process = GaussianDiffusion(beta_schedule("linear", 100), loss_type=loss_type)
    x0 = torch.randn(4, 1, 3, 3)
    losses, u = process.training_losses(ConstantNet(1.5), x0, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    t_again = torch.randint(0, 100, (4,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    assert u.dtype == torch.float64 and torch.equal(u, t_again.double() / 100)  # u = t / T
    expected = torch.stack([fn(torch.full_like(noise[i], 1.5), noise[i]) for i in range(4)])
    assert torch.allclose(losses, expected, atol=1e-6)


def test_huber_differs_from_l2_only_for_large_errors():
    loss = elementwise_loss
    small, big, zero = torch.full((5,), 0.1), torch.full((5,), 3.0), torch.zeros(5)
    assert torch.allclose(loss(small, zero, "huber"), loss(small, zero, "l2") / 2)  # 0.5 e^2 for |e| < 1
    assert torch.allclose(loss(big, zero, "huber"), loss(big, zero, "l1") - 0.5)  # |e| - 0.5 beyond


def test_q_sample_formula():
    p = GaussianDiffusion(beta_schedule("cosine", 50))
    x0, noise = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([7, 42])
    a = torch.cumprod(1 - beta_schedule("cosine", 50), 0)[t].view(-1, 1, 1, 1)
    assert torch.allclose(p.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
