"""Objectives, loss weightings against hand values, the learned-variance bound, class dropout and
self-conditioning in training."""

import math

import pytest
import torch
from toy_models import TinyNet

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.paths import eps_from_x0, v_from_x0_eps
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError


def hand_process(**kwargs):
    """alpha_bar = (0.9, 0.5, 0.1), so snr = (9, 1, 1/9)."""
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    betas = 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return GaussianDiffusion(betas, **kwargs)


@pytest.mark.parametrize(
    "objective, weighting, expected",
    [
        ("eps", "none", [1, 1, 1]),
        ("eps", "min_snr", [5 / 9, 1, 1]),  # min(snr, 5) / snr
        ("x0", "min_snr", [5, 1, 1 / 9]),  # min(snr, 5)
        ("v", "min_snr", [5 / 10, 1 / 2, (1 / 9) / (10 / 9)]),  # min(snr, 5) / (snr + 1)
        ("eps", "trunc_snr", [1, 1, 9]),  # max(snr, 1) / snr
        ("x0", "trunc_snr", [9, 1, 1]),
        ("v", "trunc_snr", [9 / 10, 1 / 2, 1 / (10 / 9)]),
    ],
)
def test_loss_weight_hand_values(objective, weighting, expected):
    process = hand_process(objective=objective, loss_weighting=weighting, min_snr_gamma=5.0)
    assert torch.allclose(process.loss_weight(torch.arange(3)), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("weighting", ["min_snr", "trunc_snr"])
def test_weighted_losses_agree_in_x0_space(weighting):
    """For the same x_0 error, every objective's weighted l2 loss is the same x_0-space weighted loss."""
    x0, noise = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64).unbind(0)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    t = torch.tensor([0, 1, 2])
    losses = []
    for objective in ("eps", "x0", "v"):
        process = hand_process(objective=objective, loss_weighting=weighting)
        x_t = process.q_sample(x0, t, noise)
        a = process.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps_hat = eps_from_x0(x_t, a.sqrt(), (1 - a).sqrt(), x0_hat)
        prediction = {"eps": eps_hat, "x0": x0_hat, "v": v_from_x0_eps(a.sqrt(), (1 - a).sqrt(), x0_hat, eps_hat)}[objective]
        target = {"eps": noise, "x0": x0, "v": v_from_x0_eps(a.sqrt(), (1 - a).sqrt(), x0, noise)}[objective]
        losses.append(((prediction - target) ** 2).flatten(1).mean(1) * process.loss_weight(t))
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(losses[1], losses[2])


class Converted(torch.nn.Module):
    """An eps network's prediction expressed in another objective's parameterization."""

    def __init__(self, net, process, objective):
        super().__init__()
        self.net, self.process, self.objective = net, process, objective

    def forward(self, x, t, **kwargs):
        eps = self.net(x, t, **kwargs)
        a = self.process.path.alpha_bar(t).reshape(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return x0 if self.objective == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0


@pytest.mark.parametrize("algorithm, spacing", [("ddpm", "uniform"), ("ddim", "trailing"), ("dpm_solver_pp", "karras"),
                                                ("unipc", "quadratic"), ("heun", "karras"), ("euler", "uniform"),
                                                ("edm", "karras"), ("euler_ancestral", "leading")])
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_objectives_sample_identically(algorithm, spacing, clip_denoised):
    betas = beta_schedule("linear", 30, beta_start=1e-3, beta_end=0.2)
    net = TinyNet(channels=2)
    noise = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    samples = []
    for objective in ("eps", "x0", "v"):
        process = GaussianDiffusion(betas, objective=objective)
        model = net if objective == "eps" else Converted(net, process, objective)
        samples.append(DiffusionModel(model, process, (2, 4, 4)).sample(
            noise, Sampler(algorithm, 5, spacing), clip_denoised=clip_denoised, generator=torch.Generator().manual_seed(1)))
    assert (samples[0] - samples[1]).abs().max() < 1e-6 and (samples[0] - samples[2]).abs().max() < 1e-6


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_clipping_recomputes_eps(objective):
    process = GaussianDiffusion(beta_schedule("linear", 30), objective=objective)
    x_t = 3 * torch.randn(4, 2, 4, 4, dtype=torch.float64)
    a = process.path.alpha_bar(torch.tensor([0.0, 7.5, 20.0, 29.0], dtype=torch.float64))
    out = process.denoiser(TinyNet(channels=2), clip_denoised=True)(x_t, a.sqrt(), (1 - a).sqrt())
    a = a.reshape(-1, 1, 1, 1)
    assert out.x0.abs().max() <= 1
    assert torch.allclose(a.sqrt() * out.x0 + (1 - a).sqrt() * out.eps, x_t)


def test_zero_terminal_snr_with_eps_is_a_config_error():
    with pytest.raises(ConfigError, match="objective=eps"):
        GaussianDiffusion(beta_schedule("linear", 30, zero_terminal_snr=True), objective="eps")
    process = GaussianDiffusion(beta_schedule("linear", 30, zero_terminal_snr=True), objective="v",
                                loss_weighting="min_snr")
    assert torch.isfinite(process.loss_weight(torch.arange(30))).all()


# Learned variance (Improved DDPM) ------------------------------------------------------------------

def test_learned_variance_doubles_the_output():
    assert GaussianDiffusion(beta_schedule("cosine", 30), loss_type="hybrid").output_channels(3) == 6
    assert GaussianDiffusion(beta_schedule("cosine", 30)).output_channels(3) == 3


def test_vlb_terms_against_torch_distributions():
    """L_t = KL of two Gaussians for t > 0 and the discretized Gaussian -log likelihood at t = 0, in bits."""
    process = GaussianDiffusion(beta_schedule("cosine", 30), loss_type="hybrid")
    x0 = (torch.randint(0, 256, (2, 1, 3, 3)).double() / 127.5 - 1)
    noise, error, v = torch.randn(3, 2, 1, 3, 3, dtype=torch.float64).unbind(0)
    t = torch.tensor([0, 17])
    x_t, prediction = process.q_sample(x0, t, noise), noise + 0.3 * error
    alpha, sigma = (table[t].reshape(-1, 1, 1, 1) for table in (process.sqrt_alphas_cumprod, process.sqrt_one_minus_alphas_cumprod))
    x0_hat = process.to_x0_eps(x_t, alpha, sigma, prediction)[0]
    got = process.vlb_terms(x0, x_t, t, x0_hat, (v + 1) / 2)

    mean, _, _ = process.q_posterior(x0_hat, x_t, t)
    frac = (v + 1) / 2
    log_var = frac * process.betas[t].log().reshape(-1, 1, 1, 1) + (1 - frac) * process.posterior_log_variance_clipped[
        t].reshape(-1, 1, 1, 1)
    model = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    true_mean, true_var, _ = process.q_posterior(x0, x_t, t)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(true_mean[1:], true_var[1:].sqrt()),
                                           torch.distributions.Normal(mean[1:], (0.5 * log_var[1:]).exp()))
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), model.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), model.cdf(x0 - 1 / 255))
    nll = -torch.log(upper - lower)
    assert torch.allclose(got[1], kl.mean() / math.log(2))
    assert torch.allclose(got[0], nll[0].mean() / math.log(2), rtol=1e-6)


def test_hybrid_loss_is_simple_plus_weighted_vlb_with_frozen_mean():
    process = GaussianDiffusion(beta_schedule("cosine", 30), loss_type="hybrid", vlb_weight=0.001)
    net = TinyNet(channels=2, out_channels=4)
    x0 = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 2 - 1
    loss, u = process.training_losses(net, x0, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    t_ = torch.randint(0, 30, (3,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = process.q_sample(x0, t_, noise)
    alpha, sigma = (table[t_].reshape(-1, 1, 1, 1) for table in (process.sqrt_alphas_cumprod, process.sqrt_one_minus_alphas_cumprod))
    out = net(x_t, t_.double())
    simple = ((out[:, :2] - noise) ** 2).flatten(1).mean(1)
    vlb = process.vlb_terms(x0, x_t, t_, process.to_x0_eps(x_t, alpha, sigma, out[:, :2])[0].detach(), (out[:, 2:] + 1) / 2)
    assert torch.equal(u, t_.double() / 30)
    assert torch.allclose(loss.double(), simple + 0.001 * 30 * vlb, rtol=1e-5)
    # the bound trains the variance only: its gradient on the mean channels is zero
    out = net(x_t, t_.double()).detach().requires_grad_()
    x0_hat = process.to_x0_eps(x_t, alpha, sigma, out[:, :2])[0]
    process.vlb_terms(x0, x_t, t_, x0_hat.detach(), (out[:, 2:] + 1) / 2).sum().backward()
    assert out.grad[:, :2].abs().max() == 0 and out.grad[:, 2:].abs().max() > 0


# Class dropout and self-conditioning in training ------------------------------------------------------

class Spy(TinyNet):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append(kwargs)
        return super().forward(x, t, **kwargs)


@pytest.mark.parametrize("p", [0.0, 1.0, 0.5])
def test_class_labels_are_dropped_to_the_null_class(p):
    process = GaussianDiffusion(beta_schedule("linear", 30), cond_drop_prob=p)
    net = Spy(channels=2, num_classes=3)
    labels = torch.randint(0, 3, (400,), generator=torch.Generator().manual_seed(0))
    process.training_losses(net, torch.zeros(400, 2, 2, 2, dtype=torch.float64), torch.Generator().manual_seed(1),
                            class_labels=labels)
    seen = net.calls[0]["class_labels"]
    dropped = seen == 3
    assert torch.equal(seen[~dropped], labels[~dropped])
    assert abs(dropped.double().mean().item() - p) < 0.08


def test_self_conditioning_in_training_half_of_the_batches():
    process = GaussianDiffusion(beta_schedule("linear", 30), objective="v")
    net = Spy(channels=2, self_condition=True)
    x0 = torch.rand(2, 2, 4, 4, dtype=torch.float64) * 2 - 1
    used = 0
    for seed in range(100):
        net.calls.clear()
        process.training_losses(net, x0, torch.Generator().manual_seed(seed))
        if len(net.calls) == 2:  # a first pass without, then the loss pass with its clipped x_0 estimate
            used += 1
            assert "x_self_cond" not in net.calls[0]
            assert net.calls[1]["x_self_cond"].abs().max() <= 1
    assert 25 < used < 75  # Binomial(100, 1/2): 5 standard deviations
