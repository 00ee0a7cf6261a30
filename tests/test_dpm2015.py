"""The Sohl-Dickstein et al. 2015 process: its trajectory against the reference code, the bound against
closed forms, training lowers the bound, and sampling is the ancestral draw from the learned Gaussians."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.diffusion.dpm2015 import DPM2015Diffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.components.dpm2015_net import DPM2015Net
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError

LOG_BIN = math.log(2 / 255)  # log width of one 8-bit level in [-1, 1]



pytestmark = pytest.mark.usefixtures("one_thread")

class FixedOutput(nn.Module):
    """A 'network' whose output [mu_coeff, beta_coeff] is a given tensor: known reverse Gaussians."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = nn.Parameter(output, requires_grad=False)

    def forward(self, x, t, **kwargs):
        return self.output.expand(x.shape[0], *self.output.shape[1:]).to(x.dtype)


def make_process(timesteps: int) -> DPM2015Diffusion:
    return DPM2015Diffusion(beta_schedule("dpm2015", timesteps, beta_start=1e-3))


def test_trajectory_is_the_reference_code():
    """generate_beta_arr: min_beta + sigmoid(logit(1 / linspace(T, 2, T))) (1 - min_beta - 1e-5), min_beta = 1e-6
    plus step1_beta at the first step."""
    T = 1000
    min_beta = np.full(T, 1e-6)
    min_beta[0] += 1e-3
    baseline = 1 / np.linspace(T, 2, T)
    sigmoid_logit = 1 / (1 + np.exp(-np.log(baseline / (1 - baseline))))
    expected = min_beta + sigmoid_logit * (1 - min_beta - 1e-5)
    np.testing.assert_allclose(beta_schedule("dpm2015", T, beta_start=1e-3).numpy(), expected, rtol=1e-12)


def test_kl_term_against_closed_form_gaussians():
    """KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) with q's posterior by precision weighting (reference code
    `generate_forward_diffusion_sample`) and p = N(sqrt(1-beta) x_t + sqrt(beta) mu_coeff,
    sigmoid(beta_coeff / sqrt(T) + logit(beta))), by torch.distributions."""
    T = 10
    process = make_process(T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 5, 5, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    output = torch.randn(1, 2, 5, 5, generator=g)
    t = torch.tensor([1, 3, 6, 9])

    betas = beta_schedule("dpm2015", T, beta_start=1e-3)
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    beta = betas[t].view(-1, 1, 1, 1)
    x0d, noised = x0.double(), noise.double()
    x_t = alpha_bar.sqrt() * x0d + (1 - alpha_bar).sqrt() * noised
    cov1, cov2 = 1 - alpha_bar / (1 - beta), beta / (1 - beta)
    lam = 1 / cov1 + 1 / cov2
    q = Normal((x0d * (alpha_bar / (1 - beta)).sqrt() / cov1 + x_t / (1 - beta).sqrt() / cov2) / lam, (1 / lam).sqrt())
    mu_coeff, beta_coeff = output.double().chunk(2, dim=1)
    p = Normal((1 - beta).sqrt() * x_t + beta.sqrt() * mu_coeff,
               torch.sigmoid(beta_coeff / math.sqrt(T) + torch.logit(beta)).sqrt())
    expected = kl_divergence(q, p).flatten(1).mean(1)

    actual = process.kl_term(FixedOutput(output), x0, t, noise)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def expected_bound_zero_output(process: DPM2015Diffusion, x0: torch.Tensor) -> float:
    """E over the dequantization u and x_t of the bound (bits/dim) when p(x_{t-1}|x_t) = N(sqrt(alpha_t) x_t, beta_t)
    (network output 0). mu_q - mu_p = A x~_0 + B eps is linear in x~_0 = x_0 + u and eps, so
    E (mu_q - mu_p)^2 = A^2 (x_0^2 + bin^2/12) + B^2, and the KL of two Gaussians is closed form."""
    betas = process.betas
    alpha_bar = torch.cumprod(1 - betas, 0)
    x0_sq = (x0.double() ** 2 + (2 / 255) ** 2 / 12).mean()
    nll = 0.0
    for t in range(1, len(betas)):
        beta, ab, ab_prev = betas[t], alpha_bar[t], alpha_bar[t - 1]
        c1, c2 = ab_prev.sqrt() * beta / (1 - ab), (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        beta_tilde = beta * (1 - ab_prev) / (1 - ab)
        a = c1 + (c2 - (1 - beta).sqrt()) * ab.sqrt()
        b = (c2 - (1 - beta).sqrt()) * (1 - ab).sqrt()
        mean_sq = a**2 * x0_sq + b**2
        nll += 0.5 * torch.log(beta / beta_tilde) + (beta_tilde + mean_sq) / (2 * beta) - 0.5
    nll += 0.5 * (1 + math.log(2 * math.pi)) + 0.5 * torch.log(betas[0]) - 0.5 * torch.log(1 - alpha_bar[-1])
    return float((nll - LOG_BIN) / math.log(2))


def assert_mean_within_4_standard_errors(per_sample: torch.Tensor, expected: float) -> None:
    """The Monte Carlo bound (independent u and x_t per sample) against its expectation."""
    standard_error = per_sample.std().item() / math.sqrt(len(per_sample))
    assert abs(per_sample.mean().item() - expected) < 4 * standard_error, (per_sample.mean().item(), expected, standard_error)


def test_bound_in_bits_per_dim_matches_hand_computation():
    T = 8
    process = make_process(T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (256, 1, 4, 4), generator=g).float() / 127.5 - 1
    net = FixedOutput(torch.zeros(1, 2, 4, 4))
    assert_mean_within_4_standard_errors(process.bits_per_dim(net, x0, torch.Generator().manual_seed(1)),
                                         expected_bound_zero_output(process, x0))


def test_bound_is_the_gaussian_entropy_for_gaussian_data():
    """For data x_0 ~ N(0, I) the forward chain is stationary and its time reversal is p(x_{t-1}|x_t) =
    N(sqrt(alpha_t) x_t, beta_t): the bound is then E -log N(x_0; 0, I) = (1 + log 2 pi) / 2 nats per dimension (the
    check in the reference code's `get_mu_sigma`). The entropy end-point terms make this exact on average over
    the data, so the (dequantized) sample is scaled to a second moment of exactly 1."""
    process = make_process(50)
    x0 = torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = (x0 * ((1 - (2 / 255) ** 2 / 12) / (x0**2).mean()).sqrt()).float()
    gaussian_entropy_bits = (0.5 * (1 + math.log(2 * math.pi)) - LOG_BIN) / math.log(2)
    assert expected_bound_zero_output(process, x0) == pytest.approx(gaussian_entropy_bits, abs=1e-6)
    net = FixedOutput(torch.zeros(1, 2, 4, 4))
    assert_mean_within_4_standard_errors(process.bits_per_dim(net, x0, torch.Generator().manual_seed(1)),
                                         gaussian_entropy_bits)


def test_training_lowers_the_bound():
    torch.manual_seed(0)
    T = 20
    process = make_process(T)
    net = DPM2015Net(1, 8, timesteps=T, n_hidden_conv=8, n_layers_conv=2, n_hidden_dense_lower=32, n_layers_dense_lower=2)
    # tiny data: vertical bars at random positions, on 8-bit levels
    g = torch.Generator().manual_seed(0)
    x0 = -torch.ones(64, 1, 8, 8)
    x0[torch.arange(64), :, :, torch.randint(0, 8, (64,), generator=g)] = 1.0

    def bound() -> float:
        return process.bits_per_dim(net, x0, torch.Generator().manual_seed(123)).mean().item()

    before = bound()
    optimizer = torch.optim.RMSprop(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        loss, _ = process.training_losses(net, x0, g)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    after = bound()
    assert after < before - 0.5, (before, after)


def test_ddpm_sampler_over_all_steps_is_the_learned_ancestral_draw():
    """sampler=ddpm (variance auto) with steps = T: x_{t-1} = mu + sigma z at t = T-1..1 (the learned Gaussians,
    reference code `generate_samples`), the sample being x at index 0 (the paper's x^(1)); by default, as sample.py
    runs it (clip_denoised=null), with no clipping of x_0."""
    torch.manual_seed(0)
    T = 12
    process = make_process(T)
    net = DPM2015Net(1, 8, timesteps=T, n_hidden_conv=8, n_layers_conv=2, n_hidden_dense_lower=16).eval()
    noise = torch.randn(3, 1, 8, 8)
    sampler = Sampler("ddpm", T, variance="auto")
    model = DiffusionModel(net, process, (1, 8, 8))
    sample = model.sample(noise, sampler, generator=torch.Generator().manual_seed(5))  # the default: no clipping
    clipped = model.sample(noise, sampler, generator=torch.Generator().manual_seed(5), clip_denoised=True)
    assert (sample - clipped).abs().max() > 1e-3  # clipping x_0 would change this draw: the test can tell them apart

    g = torch.Generator().manual_seed(5)
    x = noise.double()
    with torch.no_grad():
        for step in range(T - 1, 0, -1):
            t = torch.full((3,), step)
            mean, log_variance = process.p_mean_log_variance(net(x.float(), t.float()), x, t)
            x = mean + (0.5 * log_variance).exp() * torch.randn(x.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sample, x.float(), atol=1e-5, rtol=0)
    from omegaconf import OmegaConf

    assert OmegaConf.load(Path(__file__).parents[1] / "configs" / "sample.yaml").clip_denoised is None


def test_configuration_errors():
    with pytest.raises(ConfigError, match="timesteps"):
        make_process(1)
    process = make_process(5)
    with pytest.raises(ConfigError, match="guidance_scale"):
        process.denoiser(FixedOutput(torch.zeros(1, 2, 4, 4)), guidance=Guidance(3.0))


def test_nll_metric_reports_the_processes_own_bound():
    """sample.py metrics=[nll] on a dpm2015 model gives the paper's bound (bits_per_dim), not Ho et al.'s."""
    from diffusion_lab.metrics.evaluate import nll_bits_per_dim

    process = make_process(8)
    net = FixedOutput(torch.randn(1, 2, 4, 4) * 0.1)
    images = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    options = {"nll": {"variance": "large", "clip_denoised": True}, "batch_size": 8, "real_split": "test"}
    scores = nll_bits_per_dim(DiffusionModel(net, process, (1, 4, 4)), images, options, torch.device("cpu"), seed=5)
    direct = process.bits_per_dim(net, images.float() / 127.5 - 1, torch.Generator().manual_seed(5))
    assert scores["nll_bpd"] == pytest.approx(direct.double().mean().item(), rel=1e-6)
    assert scores["protocol"]["bound"] == "DPM2015Diffusion.bits_per_dim"


def test_fid_callback_reports_the_processes_own_bound(tmp_path):
    """The FID callback's val/nll_bpd on a dpm2015 model is the paper's bound (bits_per_dim), as metrics=[nll] is,
    not Ho et al.'s discretized-decoder bound."""
    from types import SimpleNamespace

    from diffusion_lab.callbacks.fid import FID
    from diffusion_lab.utils.seeding import step_seed
    from diffusion_lab.metrics.nll import variational_bound

    process = make_process(8)
    net = FixedOutput(torch.randn(1, 2, 4, 4) * 0.1)
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    split = SimpleNamespace(images=images, labels=torch.zeros(5))
    datamodule = SimpleNamespace(setup=lambda stage: None, train_set=split, val_set=split, test_set=split)
    trainer = SimpleNamespace(datamodule=datamodule, global_rank=0, world_size=1,
                              lightning_module=SimpleNamespace(device=torch.device("cpu")),
                              strategy=SimpleNamespace(reduce=lambda value, reduce_op: value))
    callback = FID(str(tmp_path), nll_images=5, batch_size=8, seed=3)
    logged = callback._nll(trainer, DiffusionModel(net, process, (1, 4, 4)))

    x0 = images.float() / 127.5 - 1
    own = process.bits_per_dim(net, x0, torch.Generator().manual_seed(step_seed(3, 0, "nll")))
    ho = variational_bound(process, net, x0.double(), torch.Generator().manual_seed(step_seed(3, 0, "nll"))).total
    assert logged == pytest.approx(own.double().mean().item(), rel=1e-6)
    assert abs(logged - ho.mean().item()) > 1e-3
