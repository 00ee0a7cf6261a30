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

from diffusion_lab.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from diffusion_lab.diffusion.paths import DiscreteVPPath, broadcast, eps_from_x0, x0_eps_from_v, x0_from_eps, v_from_x0_eps
from diffusion_lab.diffusion.process import Process
from diffusion_lab.diffusion.timesteps import timesteps_for
from diffusion_lab.samplers.denoiser import DenoiserOutput
from diffusion_lab.utils.errors import ConfigError

OBJECTIVES = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2", "huber", "hybrid")
LOSS_WEIGHTINGS = ("none", "min_snr", "trunc_snr")


def extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] reshaped to (B, 1, ..., 1) so that it broadcasts over a batch of ndim dimensions."""
    return table[t].reshape(-1, *([1] * (ndim - 1)))


def ddpm_tables(betas: Tensor) -> dict[str, Tensor]:
    """The float64 tables of the module docstring for betas (T,)."""
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "posterior_variance": posterior_variance,
        # beta_tilde_1 = 0: clip the log at beta_tilde_2, as Ho et al.'s code does
        "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        "snr": alphas_cumprod / (1 - alphas_cumprod),
    }


def elementwise_loss(prediction: Tensor, target: Tensor, loss_type: str) -> Tensor:
    """l1, l2 or huber (delta = 1) elementwise."""
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    return F.smooth_l1_loss(prediction, target, reduction="none")


class GaussianDiffusion(Process):
    """Forward process q(x_t | x_0) on the path `DiscreteVPPath` of the table, posterior q(x_{t-1} | x_t, x_0) and
    the training loss.

    objective: what the network predicts: eps (Ho et al.), x0, or v = sqrt(alpha_bar) eps - sqrt(1-alpha_bar) x0
    (Salimans & Ho 2022). loss_weighting: per-timestep weight on the loss, see `loss_weight`.
    loss_type=hybrid learns the reverse variance (Improved DDPM): the network outputs twice the image channels,
    the second half being v of `DenoiserOutput.variance_interp` (as (v + 1) / 2), and the loss is
    L_simple + vlb_weight * L_vlb (Nichol & Dhariwal 2021, Sec. 3.1, lambda = 0.001), see `vlb_terms`.
    cond_drop_prob, clip_x0: see `Process`. The network sees the path point of a noise level and its (fractional)
    timestep (`DiscreteVPPath.locate`).
    """

    name = "gaussian"  # as configs/process/gaussian.yaml names it
    default_spacing = "uniform"

    def __init__(self, betas: Tensor, objective: str = "eps", loss_type: str = "l2", loss_weighting: str = "none",
                 min_snr_gamma: float = 5.0, vlb_weight: float = 0.001, cond_drop_prob: float = 0.1):
        super().__init__(cond_drop_prob)
        for key, value, allowed in (
            ("objective", objective, OBJECTIVES),
            ("loss_type", loss_type, LOSS_TYPES),
            ("loss_weighting", loss_weighting, LOSS_WEIGHTINGS),
        ):
            if value not in allowed:
                raise ConfigError(f"process.{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
        self.objective, self.loss_type, self.loss_weighting = objective, loss_type, loss_weighting
        self.min_snr_gamma, self.vlb_weight = min_snr_gamma, vlb_weight
        self.learn_variance = loss_type == "hybrid"
        tables = ddpm_tables(betas.to(torch.float64))
        if tables["alphas_cumprod"][-1] == 0 and objective == "eps":
            # x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) and the eps weights snr^-1 divide by zero
            raise ConfigError(
                "process.objective=eps with schedule.zero_terminal_snr=true: alpha_bar_T = 0, where x_0 cannot be "
                "recovered from an eps prediction; use process.objective=v (or x0)"
            )
        for key, table in tables.items():
            self.register_buffer(key, table, persistent=False)
        self.num_timesteps = len(betas)
        self.path = DiscreteVPPath(tables["alphas_cumprod"])

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

    def to_x0_eps(self, x: Tensor, alpha: Tensor, sigma: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
        """(x_0, eps) from the network output under this objective at x = alpha x_0 + sigma eps (`diffusion.paths`)."""
        if self.objective == "eps":
            return x0_from_eps(x, alpha, sigma, output), output
        if self.objective == "x0":
            return output, eps_from_x0(x, alpha, sigma, output)
        return x0_eps_from_v(x, alpha, sigma, output)

    def network_inputs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The path point and its timestep, as they are."""
        return x, t

    def read_output(self, x: Tensor, t: Tensor, output: Tensor) -> DenoiserOutput:
        """(x_0, eps) by `to_x0_eps` from the first channels; a learned variance's v = (output + 1) / 2 from the rest."""
        alpha_bar, c = broadcast(self.path.alpha_bar(t), x), x.shape[1]
        x0, eps = self.to_x0_eps(x, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), output[:, :c])
        return DenoiserOutput(x0, eps, (output[:, c:] + 1) / 2 if self.learn_variance else None)

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

    def training_losses(self, net: nn.Module, x0: Tensor, generator: torch.Generator,
                        class_labels: Tensor | None = None, clip_x0: bool | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample loss w(t) * mean(loss(prediction, target)) of the denoiser at x_t with t ~ U{0..T-1}, eps ~
        N(0, I) drawn from `generator` and prediction and target in the objective's terms (Ho et al. Alg. 1), plus
        vlb_weight * T * L_t for the learned variance (loss_type=hybrid); label dropout and self-conditioning as
        `Process.training_kwargs`. Returns (loss (B,), t / T (B,))."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        alpha, sigma = self.sqrt_alphas_cumprod[t], self.sqrt_one_minus_alphas_cumprod[t]
        denoiser = self.core_denoiser(net)
        net_kwargs = self.training_kwargs(denoiser, x_t, alpha, sigma, generator, class_labels, clip_x0)
        out = denoiser(x_t, alpha, sigma, **net_kwargs)
        if self.objective == "eps":
            prediction, target = out.eps, noise
        elif self.objective == "x0":
            prediction, target = out.x0, x0
        else:
            a, s = broadcast(alpha, x0), broadcast(sigma, x0)
            prediction, target = v_from_x0_eps(a, s, out.x0, out.eps), v_from_x0_eps(a, s, x0, noise)
        loss_type = "l2" if self.learn_variance else self.loss_type
        per_sample = elementwise_loss(prediction.float(), target.float(), loss_type).flatten(1).mean(1)
        per_sample = per_sample * self.loss_weight(t).float()
        if self.learn_variance:
            vlb = self.vlb_terms(x0, x_t, t, out.x0.detach(), out.variance_interp)
            per_sample = per_sample + self.vlb_weight * self.num_timesteps * vlb.float()
        return per_sample, t.double() / self.num_timesteps

    def vlb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, x0_hat: Tensor, variance_interp: Tensor) -> Tensor:
        """L_t of the variational bound per sample, in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, -log p(x_0|x_1) (discretized Gaussian) at the first step (Ho et al. Eq. 5, 13; Nichol &
        Dhariwal Eq. 4-6), p's mean from x0_hat and its log variance v log beta + (1 - v) log beta_tilde. Pass
        `x0_hat` detached so that L_vlb trains only the variance (their Sec. 3.1)."""
        x0, x_t, frac = x0.double(), x_t.double(), variance_interp.double()
        model_mean, _, _ = self.q_posterior(x0_hat.double(), x_t, t)
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

    def sampling_grid(self, steps: int, spacing: str = "uniform") -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) at the `steps` timesteps of the spacing (diffusion_lab.diffusion.timesteps), then the data:
        alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar); a zero terminal SNR gives alpha = 0 there, which the
        samplers that need a finite log-SNR replace by 2^-12 themselves (alpha_bar = 2^-24, as diffusers)."""
        timesteps = timesteps_for(spacing, self.alphas_cumprod, steps)
        alpha_bars = torch.cat([self.path.alpha_bar(timesteps), timesteps.new_ones(1)])
        return alpha_bars.sqrt(), (1 - alpha_bars).sqrt()
