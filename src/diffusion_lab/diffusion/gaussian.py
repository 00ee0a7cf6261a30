"""Gaussian diffusion (DDPM, Ho et al. 2020): the forward process q and the quantities the
reverse process needs, written with the paper's symbols.

| code                       | symbol                                                   |
|----------------------------|----------------------------------------------------------|
| betas                      | beta_t                                                   |
| alphas_cumprod             | alpha_bar_t = prod_{s<=t} (1 - beta_s)                   |
| alphas_cumprod_prev        | alpha_bar_{t-1} (alpha_bar_0 = 1)                        |
| posterior_variance         | beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)  (Eq. 7) |
| posterior_mean_coef1/2     | mu_tilde_t = coef1 * x_0 + coef2 * x_t                   (Eq. 7) |
| snr                        | alpha_bar_t / (1 - alpha_bar_t)                          |
| posterior_log_variance_clipped | log beta_tilde_t, with beta_tilde_1 replaced by beta_tilde_2 |

Timestep index t = 0..T-1 holds the paper's t = 1..T. All tables are computed in float64 and kept
as float64 buffers (they are small), so every formula is exact to float64 on any device.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.paths import DiscreteVPPath, broadcast, eps_from_x0, x0_eps_from_v, x0_from_eps
from diffusion_lab.diffusion.process import GuidedNetwork, Process
from diffusion_lab.diffusion.timesteps import timesteps_for
from diffusion_lab.samplers.sampling import Denoiser, DenoiserOutput
from diffusion_lab.utils.errors import ConfigError

OBJECTIVES = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2", "huber", "hybrid")
LOSS_WEIGHTINGS = ("none", "min_snr", "trunc_snr")


def extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] reshaped to (B, 1, ..., 1) so that it broadcasts over a batch of ndim dimensions."""
    return table[t].reshape(-1, *([1] * (ndim - 1)))


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (-1 + log_var2 - log_var1 + (log_var1 - log_var2).exp() + (mean1 - mean2) ** 2 * (-log_var2).exp())


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log of the N(mean, e^log_var) mass of the 8-bit bin [x - 1/255, x + 1/255] of x in [-1, 1], the outer bins
    reaching to -inf and +inf (Ho et al. 2020, Eq. 13), elementwise, in nats."""
    inv_std = (-0.5 * log_var).exp()
    upper, lower = (x - mean + 1 / 255) * inv_std, (x - mean - 1 / 255) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin))


class GaussianDiffusion(Process):
    """Forward process q(x_t | x_0), posterior q(x_{t-1} | x_t, x_0) and the training loss.

    objective: what the network predicts: eps (Ho et al.), x0, or v = sqrt(alpha_bar) eps - sqrt(1-alpha_bar) x0
    (Salimans & Ho 2022). loss_weighting: per-timestep weight on the loss, see `loss_weight`.
    loss_type=hybrid learns the reverse variance (Improved DDPM): the network outputs twice the image channels,
    the second half being v of `DenoiserOutput.variance_interp` (as (v + 1) / 2), and the loss is
    L_simple + vlb_weight * L_vlb (Nichol & Dhariwal 2021, Sec. 3.1, lambda = 0.001), see `vlb_terms`.
    cond_drop_prob, clip_x0: see `Process`. On the (alpha, sigma) path of the samplers, alpha = sqrt(alpha_bar_t) and
    sigma = sqrt(1 - alpha_bar_t) at the timestep t, fractional between the table's steps (`alpha_bar_at`).
    """

    name = "ddpm"
    default_spacing = "uniform"

    def __init__(
        self,
        betas: Tensor,
        objective: str = "eps",
        loss_type: str = "l2",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        vlb_weight: float = 0.001,
        cond_drop_prob: float = 0.1,
    ):
        super().__init__(cond_drop_prob)
        for key, value, allowed in (
            ("objective", objective, OBJECTIVES),
            ("loss_type", loss_type, LOSS_TYPES),
            ("loss_weighting", loss_weighting, LOSS_WEIGHTINGS),
        ):
            if value not in allowed:
                raise ConfigError(f"process.{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
        self.objective, self.loss_type, self.loss_weighting = objective, loss_type, loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.learn_variance = loss_type == "hybrid"
        self.vlb_weight = vlb_weight

        betas = betas.to(torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        if alphas_cumprod[-1] == 0 and objective == "eps":
            # x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) and the eps weights snr^-1 divide by zero
            raise ConfigError(
                "process.objective=eps with schedule.zero_terminal_snr=true: alpha_bar_T = 0, where x_0 cannot be "
                "recovered from an eps prediction; use process.objective=v (or x0)"
            )
        self.num_timesteps = len(betas)
        self.path = DiscreteVPPath(alphas_cumprod)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_buffer("alphas_cumprod_prev", alphas_cumprod_prev, persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt(), persistent=False)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        self.register_buffer("posterior_variance", posterior_variance, persistent=False)
        # beta_tilde_1 = 0: clip the log at beta_tilde_2, as Ho et al.'s code does
        self.register_buffer(
            "posterior_log_variance_clipped",
            torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            persistent=False,
        )
        self.register_buffer(
            "posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod), persistent=False
        )
        self.register_buffer(
            "posterior_mean_coef2",
            (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
            persistent=False,
        )
        self.register_buffer("snr", alphas_cumprod / (1 - alphas_cumprod), persistent=False)

    # Forward process --------------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (Ho et al. Eq. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.ndim).to(x0.dtype) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim).to(x0.dtype) * noise
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)   (Ho et al. Eq. 6-7)."""
        mean = extract(self.posterior_mean_coef1, t, x_t.ndim) * x0 + extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        return (
            mean,
            extract(self.posterior_variance, t, x_t.ndim),
            extract(self.posterior_log_variance_clipped, t, x_t.ndim),
        )

    # Conversions between parameterizations ----------------------------------------------------

    def predict_v(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0   (Salimans & Ho 2022, Sec. 4)."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.ndim).to(x0.dtype) * eps
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim).to(x0.dtype) * x0
        )

    def to_x0_eps(self, x_t: Tensor, alpha_bar: Tensor, model_output: Tensor) -> tuple[Tensor, Tensor]:
        """(x_0, eps) from the network output under this objective, at noise level alpha_bar (broadcastable), by the
        path's conversions (`diffusion.paths`) with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)."""
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.objective == "eps":
            return x0_from_eps(x_t, a, s, model_output), model_output
        if self.objective == "x0":
            return model_output, eps_from_x0(x_t, a, s, model_output)
        return x0_eps_from_v(x_t, a, s, model_output)

    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """alpha_bar at a possibly fractional timestep (`DiscreteVPPath.alpha_bar`)."""
        return self.path.alpha_bar(t)

    # Training -----------------------------------------------------------------------------------

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight w(t) on the objective's loss. With snr = alpha_bar/(1-alpha_bar), the x_0-space
        weights are min(snr, gamma) for min_snr (Hang et al. 2023, Eq. 10) and max(snr, 1) for trunc_snr
        (Salimans & Ho 2022, Sec. 4); they are divided by c(snr), where ||target error||^2 = c ||x_0 error||^2:
        c = snr (eps), 1 (x0), snr + 1 (v)."""
        snr = self.snr[t]
        if self.loss_weighting == "none":
            return torch.ones_like(snr)
        x0_weight = snr.clamp(max=self.min_snr_gamma) if self.loss_weighting == "min_snr" else snr.clamp(min=1)
        c = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[self.objective]
        return x0_weight / c

    @staticmethod
    def elementwise_loss(prediction: Tensor, target: Tensor, loss_type: str) -> Tensor:
        if loss_type == "l1":
            return F.l1_loss(prediction, target, reduction="none")
        if loss_type == "l2":
            return F.mse_loss(prediction, target, reduction="none")
        return F.smooth_l1_loss(prediction, target, reduction="none")  # huber, delta = 1

    def training_losses(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-sample loss w(t) * mean(loss(net(x_t, t), target)) with t ~ U{0..T-1}, eps ~ N(0, I) drawn from
        `generator` and the target set by the objective (Ho et al. Alg. 1), plus vlb_weight * T * L_t for the
        learned variance (loss_type=hybrid); label dropout and self-conditioning as `Process.training_kwargs`.
        Returns (loss (B,), t / T (B,))."""
        b, channels = x0.shape[0], x0.shape[1]
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        t_in = t.to(x0.dtype)
        alpha_bar = extract(self.alphas_cumprod, t, x0.ndim).to(x0.dtype)
        net_kwargs = self.training_kwargs(net, x_t, t_in, generator, class_labels,
                                          lambda output: self.to_x0_eps(x_t, alpha_bar, output)[0])
        target = {"eps": noise, "x0": x0, "v": self.predict_v(x0, noise, t)}[self.objective]
        output = net(x_t, t_in, **net_kwargs)
        prediction = output[:, :channels]
        loss_type = "l2" if self.learn_variance else self.loss_type
        per_sample = self.elementwise_loss(prediction.float(), target.float(), loss_type).flatten(1).mean(1)
        per_sample = per_sample * self.loss_weight(t).float()
        if self.learn_variance:
            vlb = self.vlb_terms(x0, x_t, t, prediction.detach(), output[:, channels:])
            per_sample = per_sample + self.vlb_weight * self.num_timesteps * vlb.float()
        return per_sample, t.double() / self.num_timesteps

    def vlb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, prediction: Tensor, variance_output: Tensor) -> Tensor:
        """L_t of the variational bound per sample, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, -log p(x_0|x_1) (discretized Gaussian) at the first step (Ho et al. Eq. 5, 13; Nichol &
        Dhariwal Eq. 4-6). Pass `prediction` detached so that L_vlb trains only the variance (their Sec. 3.1)."""
        x0, x_t = x0.double(), x_t.double()
        alpha_bar = extract(self.alphas_cumprod, t, x0.ndim)
        x0_hat = self.to_x0_eps(x_t, alpha_bar, prediction.double())[0]
        model_mean, _, _ = self.q_posterior(x0_hat, x_t, t)
        frac = (variance_output.double() + 1) / 2
        model_log_var = frac * extract(self.betas.log(), t, x0.ndim) + (1 - frac) * extract(
            self.posterior_log_variance_clipped, t, x0.ndim
        )
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, model_log_var).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2)

    def output_channels(self, channels: int) -> int:
        """How many channels the network must output for images of `channels` channels (twice as many with the
        learned variance)."""
        return 2 * channels if self.learn_variance else channels

    # Sampling -----------------------------------------------------------------------------------

    def timestep_at(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The fractional timestep of the noise level (alpha, sigma) (`DiscreteVPPath.timestep_at`)."""
        return self.path.timestep_at(alpha, sigma)

    def sampling_grid(self, steps: int, spacing: str = "uniform") -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) at the `steps` timesteps of the spacing (diffusion_lab.diffusion.timesteps), then the data:
        alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar); a zero terminal SNR gives alpha = 0 there, which the
        samplers that need a finite log-SNR replace by 2^-12 themselves (alpha_bar = 2^-24, as diffusers)."""
        timesteps = timesteps_for(spacing, self.alphas_cumprod, steps)
        alpha_bars = torch.cat([self.alpha_bar_at(timesteps), timesteps.new_ones(1)])
        return alpha_bars.sqrt(), (1 - alpha_bars).sqrt()

    def denoiser(
        self, net: nn.Module, clip_denoised: bool | None = None, guidance_scale: float = 1.0,
        class_labels: Tensor | None = None,
    ) -> Denoiser:
        """A function (x, alpha, sigma) -> DenoiserOutput over the network (guidance and self-conditioning by
        `GuidedNetwork`). The network sees the timestep of the noise level (`timestep_at`) and x rescaled to this
        process's point of that level, x_p = x / sqrt(alpha^2 + sigma^2) (`vp_norm`); x_0 and eps do not depend on the
        scale.
        x may be float64 (samplers compute in float64); the network runs in its own dtype. Clipping x_0 to
        [-1, 1] (clip_denoised; None: the process's `clip_x0`) recomputes eps from the clipped x_0."""
        clip_denoised = self.clip_x0 if clip_denoised is None else clip_denoised
        network = GuidedNetwork(net, guidance_scale, class_labels)

        def denoise(x: Tensor, alpha: Tensor, sigma: Tensor) -> DenoiserOutput:
            t, scale = self.path.locate(alpha, sigma)
            x_p = x / broadcast(scale, x)
            alpha_bar = broadcast(self.alpha_bar_at(t), x)
            output = network(x_p, t)
            c = x.shape[1]
            x0, eps = self.to_x0_eps(x_p, alpha_bar, output[:, :c])
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = eps_from_x0(x_p, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), x0)
            network.remember(x0)
            variance_interp = (output[:, c:] + 1) / 2 if self.learn_variance else None
            return DenoiserOutput(x0, eps, variance_interp)

        return denoise
