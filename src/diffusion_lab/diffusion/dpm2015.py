"""The diffusion probabilistic model of Sohl-Dickstein et al. 2015, "Deep Unsupervised Learning using
Nonequilibrium Thermodynamics" (tutorial 002), as its own process.

Its forward process q is a Gaussian diffusion (their Eq. 19 with the `dpm2015` beta schedule), so the tables,
q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0) are `GaussianDiffusion`'s. What differs:
- the reverse step p(x_{t-1} | x_t) = N(mu, sigma^2) is learned directly (their Sec. 2.2 and reference code
  `get_mu_sigma`): the network outputs mu_coeff and beta_coeff per pixel (2 x channels), and
      mu = sqrt(1 - beta_t) x_t + sqrt(beta_t) mu_coeff,   sigma^2 = sigmoid(beta_coeff / sqrt(T) + logit(beta_t));
- the loss is the bound on the negative log-likelihood itself (their Eq. 14), per dimension,
      -L <= sum_{t=2}^T E_q KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) + H_q(X^1|X^0) - H_q(X^T|X^0) + H_p(X^T),
  on data dequantized by uniform noise of one 8-bit bin (2/255 in [-1, 1]) and reported in bits per dimension of
  the 8-bit data: (-L + log(255/2)) / log 2 (Theis et al. 2016, Sec. 3.1). Training estimates the sum by
  (T - 1) KL at one t ~ U{2..T} per sample.

Timestep index t = 0..T-1 holds the paper's t = 1..T; the bound's KL terms are t = 1..T-1. The first step
(index 0) is not learned: as in the reference code, a sample is x at index 0 (the paper's x^(1)).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.gaussian import GaussianDiffusion, extract
from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.diffusion.likelihood import normal_kl
from diffusion_lab.diffusion.paths import eps_from_x0
from diffusion_lab.samplers.denoiser import DenoiserOutput
from diffusion_lab.utils.errors import ConfigError

BIN_WIDTH = 2 / 255  # one 8-bit level in [-1, 1]


class DPM2015Diffusion(GaussianDiffusion):
    """Sohl-Dickstein et al. 2015: learned reverse mean and variance, trained on the likelihood bound. Sampling
    draws from the learned reverse Gaussians as they are: x_0 estimates are not clipped unless asked."""

    name = "dpm2015"
    clip_x0 = False

    def __init__(self, betas: Tensor):
        if len(betas) < 2:
            raise ConfigError(f"process=dpm2015 needs schedule.timesteps >= 2, got {len(betas)}")
        super().__init__(betas)

    def output_channels(self, channels: int) -> int:
        """mu_coeff and beta_coeff for every channel."""
        return 2 * channels

    def p_mean_log_variance(self, output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from the network output [mu_coeff, beta_coeff], in x_t's dtype."""
        mu_coeff, beta_coeff = output.to(x_t.dtype).chunk(2, dim=1)
        beta = extract(self.betas, t, x_t.ndim).to(x_t.dtype)
        mean = (1 - beta).sqrt() * x_t + beta.sqrt() * mu_coeff
        log_variance = F.logsigmoid(beta_coeff / math.sqrt(self.num_timesteps) + torch.logit(beta))
        return mean, log_variance

    def kl_term(self, net: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, **net_kwargs) -> Tensor:
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) at x_t = q_sample(x0, t, noise), mean over dimensions, in
        nats, per sample (B,); t >= 1. Computed in float64."""
        x_t = self.q_sample(x0, t, noise)
        output = net(x_t, t.to(x0.dtype), **net_kwargs)
        mean, log_variance = self.p_mean_log_variance(output, x_t.double(), t)
        true_mean, _, true_log_variance = self.q_posterior(x0.double(), x_t.double(), t)
        return normal_kl(true_mean, true_log_variance, mean, log_variance).flatten(1).mean(1)

    def entropy_terms(self) -> float:
        """H_q(X^1|X^0) - H_q(X^T|X^0) + H_p(X^T) per dimension, in nats: with H(N(., s^2)) = (1 + log 2 pi s^2) / 2,
        s^2 = beta_1, 1 - alpha_bar_T and 1 (their Eq. 14)."""
        return 0.5 * (1 + math.log(2 * math.pi)) + 0.5 * (self.betas[0].log() - (1 - self.alphas_cumprod[-1]).log()).item()

    @staticmethod
    def to_bits_per_dim(nll: Tensor) -> Tensor:
        """-log2 P(8-bit x) <= (-log p(x + u) + log(255/2)) / log 2 for the density p of the dequantized data."""
        return (nll - math.log(BIN_WIDTH)) / math.log(2)

    def dequantize(self, x0: Tensor, generator: torch.Generator) -> Tensor:
        """x_0 + u, u ~ U(-1/255, 1/255): uniform noise of one 8-bit bin."""
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return x0 + (u - 0.5) * BIN_WIDTH

    def training_losses(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None,
        clip_x0: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The bound in bits/dim per sample, estimated at one t ~ U{1..T-1} (index) per sample; u, t and the noise
        are drawn from `generator` (no self-conditioning, so clip_x0 plays no part). Returns (loss (B,), t / T (B,))."""
        net_kwargs = {} if class_labels is None else {"class_labels": class_labels}
        t = torch.randint(1, self.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        x0 = self.dequantize(x0, generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        nll = (self.num_timesteps - 1) * self.kl_term(net, x0, t, noise, **net_kwargs) + self.entropy_terms()
        return self.to_bits_per_dim(nll).float(), t.double() / self.num_timesteps

    @torch.no_grad()
    def bits_per_dim(self, net: nn.Module, x0: Tensor, generator: torch.Generator, **net_kwargs) -> Tensor:
        """The bound in bits/dim per sample (B,) with every KL term evaluated (T - 1 network calls); one draw of
        the dequantization noise and of x_t per term, from `generator`. For evaluation (the test-set bound)."""
        x0 = self.dequantize(x0, generator)
        kl = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
        for step in range(1, self.num_timesteps):
            t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            kl += self.kl_term(net, x0, t, noise, **net_kwargs)
        return self.to_bits_per_dim(kl + self.entropy_terms())

    # Sampling -----------------------------------------------------------------------------------

    def network_inputs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The path point and the nearest integer timestep (the net knows no others)."""
        return x, t.round()

    def read_output(self, x: Tensor, t: Tensor, output: Tensor) -> DenoiserOutput:
        """The learned p(x_{t-1} | x_t) = N(mu, sigma^2) in the samplers' terms: x_0 such that the posterior mean
        mu_tilde(x_t, x_0) = mu, and v such that sigma^2 = exp(v log beta_t + (1 - v) log beta_tilde_t). So
        sampler=ddpm with variance=auto over all T steps draws exactly from the learned Gaussians (the paper's
        sampling); other samplers and fewer steps use the same x_0 and v as they would a DDPM's. At t = 0 (not
        learned) x_0 = x_t. Clipping x_0 (clip_denoised=true; off by default, `clip_x0`) moves mu accordingly."""
        step = t.round().long()
        mean, log_variance = self.p_mean_log_variance(output, x, step)
        coef1 = extract(self.posterior_mean_coef1, step, x.ndim).to(x.dtype)
        coef2 = extract(self.posterior_mean_coef2, step, x.ndim).to(x.dtype)
        first = (step == 0).reshape(-1, *([1] * (x.ndim - 1)))
        x0 = torch.where(first, x, (mean - coef2 * x) / coef1)
        alpha_bar = extract(self.alphas_cumprod, step, x.ndim).to(x.dtype)
        log_beta = extract(self.betas.log(), step, x.ndim).to(x.dtype)
        log_beta_tilde = extract(self.posterior_log_variance_clipped, step, x.ndim).to(x.dtype)
        v = torch.where(first, torch.ones_like(x), (log_variance - log_beta_tilde) / (log_beta - log_beta_tilde))
        return DenoiserOutput(x0, eps_from_x0(x, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), x0), v)

    def denoiser(self, net: nn.Module, clip_denoised: bool | None = None, guidance: Guidance | None = None,
                 class_labels: Tensor | None = None, clip_x0: bool | None = None) -> nn.Module:
        """`Process.denoiser`, without guidance (the bound is trained on the labels as given)."""
        if guidance is not None and guidance.active:
            raise ConfigError(f"guidance_scale={guidance.scale}: process=dpm2015 has no guidance; use 1")
        return super().denoiser(net, clip_denoised, None, class_labels, clip_x0)
