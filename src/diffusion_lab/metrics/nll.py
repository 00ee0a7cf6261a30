"""The variational bound on the negative log-likelihood of Gaussian diffusion, in bits per dimension.

L = KL(q(x_T | x_0) || N(0, I)) + sum_{t=2}^T KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) - log p(x_0 | x_1)
(Ho et al. 2020, Eq. 5), with the discretized Gaussian decoder p(x_0 | x_1) over the 256 pixel bins of [-1, 1]
(Ho et al., Eq. 13). Every timestep is evaluated (no sampling of t). The reverse variance is the model's own
when it learns one (exp(v log beta_t + (1 - v) log beta_tilde_t), Nichol & Dhariwal 2021, Eq. 15), else
beta_tilde_t ("small") or beta_t ("large", with beta_tilde_2 at t = 1), Nichol & Dhariwal's fixed variances.
The reverse mean comes from the process's denoiser (clipping, guidance and self-conditioning included).
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.gaussian import GaussianDiffusion, extract
from diffusion_lab.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.utils.errors import ConfigError

VARIANCES = ("small", "large")


class BoundTerms(NamedTuple):
    """Per-image terms of the bound in bits/dim."""

    total: Tensor  # (B,)
    prior: Tensor  # (B,) KL(q(x_T | x_0) || N(0, I))
    timesteps: Tensor  # (B, T): index 0 holds -log p(x_0 | x_1), index t >= 1 the KL at paper step t + 1


def reverse_log_variance(process: GaussianDiffusion, variance: str) -> Tensor:
    """log sigma_t^2 for every timestep index: beta_tilde_t (small, clipped at t = 1) or beta_t (large)."""
    if variance == "small":
        return process.posterior_log_variance_clipped
    if variance == "large":
        return torch.log(torch.cat([process.posterior_variance[1:2], process.betas[1:]]))
    raise ConfigError(f"metrics.nll.variance={variance!r} is not allowed; choose one of {', '.join(VARIANCES)}")


@torch.no_grad()
def variational_bound(
    process: GaussianDiffusion,
    net: nn.Module,
    x0: Tensor,
    generator: torch.Generator,
    variance: str = "large",
    clip_denoised: bool = True,
    class_labels: Tensor | None = None,
) -> BoundTerms:
    """The bound for images x0 in [-1, 1] (on the 8-bit grid), one network evaluation per timestep, in float64.
    x_t ~ q(x_t | x_0) is drawn independently at each t from `generator`."""
    x0 = x0.to(torch.float64)
    batch, dims = x0.shape[0], x0[0].numel()
    denoise = process.denoiser(net, clip_denoised=clip_denoised, class_labels=class_labels)
    log_variances = reverse_log_variance(process, variance)
    terms = []
    for index in range(process.num_timesteps):
        t = torch.full((batch,), index, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = process.q_sample(x0, t, noise)
        out = denoise(x_t, process.sqrt_alphas_cumprod[index], process.sqrt_one_minus_alphas_cumprod[index])
        model_mean, _, _ = process.q_posterior(out.x0, x_t, t)
        if out.variance_interp is None:
            model_log_var = extract(log_variances, t, x0.ndim).expand_as(x0)
        else:
            v = out.variance_interp
            model_log_var = v * extract(process.betas.log(), t, x0.ndim) + (1 - v) * extract(
                process.posterior_log_variance_clipped, t, x0.ndim
            )
        if index == 0:
            nats = -discretized_gaussian_log_likelihood(x0, model_mean, model_log_var)
        else:
            true_mean, _, true_log_var = process.q_posterior(x0, x_t, t)
            nats = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
        terms.append(nats.flatten(1).sum(1))
    alpha_bar_T = process.alphas_cumprod[-1]
    prior_mean, prior_log_var = alpha_bar_T.sqrt() * x0, torch.log1p(-alpha_bar_T).expand_as(x0)
    prior = normal_kl(prior_mean, prior_log_var, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).sum(1)
    to_bits = 1 / (dims * math.log(2))
    timesteps = torch.stack(terms, dim=1) * to_bits
    return BoundTerms(timesteps.sum(1) + prior * to_bits, prior * to_bits, timesteps)


def bits_per_dim(
    model: DiffusionModel,
    x0: Tensor,
    generator: torch.Generator,
    variance: str = "large",
    clip_denoised: bool = True,
    class_labels: Tensor | None = None,
) -> Tensor:
    """The bound (B,) in bits/dim of the model's process: a process that defines its own bound (`bits_per_dim`,
    dpm2015's learned reverse Gaussians) reports that one, any other DDPM-family process Ho et al.'s
    (`variational_bound` with the fixed `variance` or its learned one). Every consumer (sample.py metrics=[nll], the
    FID callback) calls this, so one model has one bound everywhere; `check_bound` says where there is none."""
    check_bound(model)
    process, net = model.process, model.net
    class_labels = class_labels if model.conditional else None
    own_bound = getattr(process, "bits_per_dim", None)
    if own_bound is not None:
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        return own_bound(net, x0.to(next(net.parameters()).dtype), generator, **kwargs).to(torch.float64)
    return variational_bound(process, net, x0, generator, variance, clip_denoised, class_labels).total


def check_bound(model: DiffusionModel) -> None:
    """ConfigError (one line) where the model has no likelihood bound on images: latent diffusion (a bound on the
    latents says nothing of the images' likelihood without the decoder's) and processes other than DDPM's."""
    if model.latent:
        raise ConfigError("metrics=[nll] bounds the likelihood of images; this is a latent-diffusion model, whose bound "
                          "would be on latents; it is not reported")
    if not isinstance(model.process, GaussianDiffusion):
        raise ConfigError(f"metrics=[nll]: process {model.process.name} has no variational bound here (its exact ODE "
                          "likelihood is not implemented); the bound exists for ddpm and dpm2015")


def bound_protocol(process: GaussianDiffusion, variance: str, clip_denoised: bool) -> dict:
    """What `bits_per_dim` computes for this process, to write beside the score."""
    if getattr(process, "bits_per_dim", None) is not None:
        return {"bound": f"{type(process).__name__}.bits_per_dim"}
    return {"bound": "Ho et al. 2020 variational bound", "variance": variance, "clip_denoised": clip_denoised}
