"""Consistency models (Song et al. 2023, "Consistency Models"; Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models", iCT) in the EDM parameterisation, alpha = 1: x = x_0 + sigma eps, sigma in [sigma_min, sigma_max].

The consistency function maps any point of a probability-flow ODE trajectory to its origin (Song et al., App. C):
    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),  c_out = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),                        c_noise = ln(sigma) / 4 (EDM's, so a student starts from an EDM teacher),
so f(x, sigma_min) = x exactly (the boundary condition). Training pairs adjacent levels sigma_n < sigma_{n+1} of the
rho-spaced discretisation (`karras_sigmas`) and minimises lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}),
f_target(x_hat_n, sigma_n)) with x_{n+1} = x_0 + sigma_{n+1} z and x_hat_n one step back along the ODE:
- consistency distillation (CD, Song et al. Alg. 2): x_hat_n by a Heun step of a teacher (`heun_step`);
- consistency training (CT, Alg. 3; iCT): x_hat_n = x_0 + sigma_n z with the same z (the unbiased estimate).
d is the pseudo-Huber metric sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (iCT, Sec. 3.3), or LPIPS on
images resized to 224 (Song et al. 2023; `lpips_metric`), and lambda = 1 / (sigma_{n+1} - sigma_n) (iCT, Sec. 3.5;
loss_weighting=ict) or lambda = 1 (Song et al. 2023's CD and CT; loss_weighting=uniform).
Sampling: `sampler=consistency` (Alg. 1) over `sampling_grid`.
"""

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.edm import PreconditionedProcess, karras_sigmas
from diffusion_lab.diffusion.paths import broadcast
from diffusion_lab.samplers.denoiser import Denoiser
from diffusion_lab.utils.errors import ConfigError

SPACINGS = ("karras",)
NOISE_SAMPLINGS = ("uniform", "lognormal")
LOSS_WEIGHTINGS = ("ict", "uniform")
EstimatePrevious = Callable[[Tensor, Tensor, Tensor, Tensor, dict], Tensor]  # (x_next, sigma_next, sigma, z, net_kwargs) -> x_hat
Metric = Callable[[Tensor, Tensor], Tensor]  # (prediction, target) -> per-sample distance (B,)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c over all but the batch dimension (iCT, Sec. 3.3), in float32."""
    return ((a.float() - b.float()).pow(2).flatten(1).sum(1) + c**2).sqrt() - c


def lpips_metric(lpips: nn.Module) -> Metric:
    """d(a, b) = LPIPS(up(a), up(b)), up a bilinear resize to 224 x 224 of images narrower than 256 (Song et al. 2023,
    their code's `cm/karras_diffusion.py`); `lpips` takes images in [-1, 1] (`models/components/lpips.py`)."""

    def metric(a: Tensor, b: Tensor) -> Tensor:
        if a.shape[-1] < 256:
            a, b = (F.interpolate(v, size=224, mode="bilinear") for v in (a, b))
        return lpips(a, b)

    return metric


def heun_step(teacher: Denoiser, x: Tensor, sigma_from: Tensor, sigma_to: Tensor) -> Tensor:
    """One Heun step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma_from to sigma_to > 0
    (per-sample (B,)), with the teacher's denoiser D (Karras et al. 2022, Alg. 1; the solver Phi of Song et al.'s CD)."""
    sigma_from, sigma_to = broadcast(sigma_from, x), broadcast(sigma_to, x)
    ones = torch.ones_like(sigma_from)
    d = teacher(x, ones, sigma_from).eps
    x_euler = x + (sigma_to - sigma_from) * d
    return x + (sigma_to - sigma_from) * (d + teacher(x_euler, ones, sigma_to).eps) / 2


class Consistency(PreconditionedProcess):
    """The consistency function and its training losses; see the module docstring. num_scales: N of the
    discretisation that plain `training_losses` (consistency training at a fixed N) uses; noise_sampling: how the
    pair index n is drawn: uniform (Song et al. 2023) or lognormal, p(n) proportional to erf((ln sigma_{n+1} - P_mean)
    / (sqrt(2) P_std)) - erf((ln sigma_n - P_mean) / (sqrt(2) P_std)) (iCT, Sec. 3.5); loss_weighting: lambda(sigma_n),
    ict (1 / (sigma_{n+1} - sigma_n)) or uniform (1)."""

    name = "consistency"
    default_spacing = "karras"
    clip_x0 = False

    def __init__(
        self,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        num_scales: int = 18,
        noise_sampling: str = "uniform",
        P_mean: float = -1.1,
        P_std: float = 2.0,
        huber_c: float | None = None,
        loss_weighting: str = "ict",
        cond_drop_prob: float = 0.1,
    ):
        super().__init__(cond_drop_prob)
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"process.sigma_min={sigma_min}, process.sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
        for key, value in (("sigma_data", sigma_data), ("rho", rho), ("P_std", P_std)):
            if not value > 0:
                raise ConfigError(f"process.{key}={value} must be > 0")
        if not isinstance(num_scales, int) or num_scales < 2:
            raise ConfigError(f"process.num_scales={num_scales} must be an integer >= 2 (noise levels sigma_min..sigma_max)")
        if noise_sampling not in NOISE_SAMPLINGS:
            raise ConfigError(f"process.noise_sampling={noise_sampling!r} is not allowed; choose one of {', '.join(NOISE_SAMPLINGS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"process.loss_weighting={loss_weighting!r} is not allowed; choose one of "
                              f"{', '.join(LOSS_WEIGHTINGS)}")
        if huber_c is not None and not huber_c > 0:
            raise ConfigError(f"process.huber_c={huber_c} must be > 0, or null for 0.00054 sqrt(dim) (iCT)")
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.num_scales, self.noise_sampling, self.P_mean, self.P_std = num_scales, noise_sampling, P_mean, P_std
        self.huber_c, self.loss_weighting = huber_c, loss_weighting

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma (Song et al. 2023, App. C; c_in and c_noise of EDM)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = self.sigma_data * (sigma - self.sigma_min) / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def consistency_function(self, net: nn.Module, x: Tensor, sigma: Tensor, **net_kwargs) -> Tensor:
        """f(x, sigma) = c_skip x + c_out F(c_in x, c_noise) for per-sample sigma (B,) float64, in x's dtype: the x_0 of
        the process's denoiser over net."""
        return self.core_denoiser(net)(x, torch.ones_like(sigma), sigma, **net_kwargs).x0

    def sample_index(self, sigmas: Tensor, batch: int, generator: torch.Generator) -> Tensor:
        """n (B,) in 0..N-2, the lower level of the pair (sigma_n, sigma_{n+1}), by `noise_sampling`."""
        if self.noise_sampling == "uniform":
            return torch.randint(0, len(sigmas) - 1, (batch,), generator=generator, device=generator.device)
        cdf = torch.erf((sigmas.log() - self.P_mean) / (math.sqrt(2) * self.P_std))
        return torch.multinomial(cdf[1:] - cdf[:-1], batch, replacement=True, generator=generator)

    def training_losses(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None,
        clip_x0: bool | None = None, num_scales: int | None = None, target_net: nn.Module | None = None,
        estimate_previous: EstimatePrevious | None = None, metric: Metric | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample lambda(sigma_n) d(f_net(x_{n+1}, sigma_{n+1}), f_target(x_hat_n, sigma_n)) over N = num_scales
        levels (None: process.num_scales), the target network (None: net itself, iCT's mu = 0) without gradient;
        x_hat_n = estimate_previous(x_{n+1}, sigma_{n+1}, sigma_n, z, net_kwargs) (CD: a teacher's ODE step) or, when
        None, x_0 + sigma_n z (CT); d = metric, or pseudo-Huber when None; label dropout and self-conditioning as
        `Process.training_kwargs`. The curriculum of iCT is `ConsistencyTrainingModule`'s. Returns (loss (B,),
        n / (N - 2))."""
        num_scales = self.num_scales if num_scales is None else num_scales
        target_net = net if target_net is None else target_net
        sigmas = self.training_levels(num_scales).to(x0.device)
        n = self.sample_index(sigmas, x0.shape[0], generator)
        sigma, sigma_next = sigmas[n], sigmas[n + 1]
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_next = self.path.sample(x0, sigma_next, z)
        student, ones = self.core_denoiser(net), torch.ones_like(sigma)
        net_kwargs = self.training_kwargs(student, x_next, ones, sigma_next, generator, class_labels, clip_x0)
        with torch.no_grad():
            if estimate_previous is None:
                x_hat = self.path.sample(x0, sigma, z)
            else:
                x_hat = estimate_previous(x_next, sigma_next, sigma, z, net_kwargs).to(x0.dtype)
            target = self.consistency_function(target_net, x_hat, sigma, **net_kwargs)
        prediction = student(x_next, ones, sigma_next, **net_kwargs).x0
        weight = (1 / (sigma_next - sigma)).float() if self.loss_weighting == "ict" else torch.ones_like(sigma).float()
        if metric is None:
            c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x0[0].numel())
            distance = pseudo_huber(prediction, target, c)
        else:
            distance = metric(prediction, target)
        return weight * distance, n.double() / max(num_scales - 2, 1)

    def training_levels(self, num_scales: int) -> Tensor:
        """sigma_1 < ... < sigma_N, the rho-spaced levels from sigma_min to sigma_max whose adjacent pairs training
        draws (`karras_sigmas`)."""
        return karras_sigmas(self.sigma_min, self.sigma_max, self.rho, num_scales)

    def sampling_grid(self, steps: int, spacing: str = "karras") -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) = (1, tau): sigma_max and then the rho-spaced levels of Eq. 5 over steps + 1 points from
        sigma_max to sigma_min less the last (f is the identity at sigma_min), then 0: the time points of
        multistep consistency sampling (Song et al. 2023, Alg. 1)."""
        if spacing not in SPACINGS:
            raise ConfigError(f"sampler.spacing={spacing!r} is not a spacing of process consistency; choose one of "
                              f"{', '.join(SPACINGS)} (rho-spaced sigmas, process.rho)")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"sampler.steps={steps} must be an integer >= 1")
        taus = karras_sigmas(self.sigma_min, self.sigma_max, self.rho, steps + 1).flip(0)[:-1]
        sigmas = torch.cat([taus, taus.new_zeros(1)])
        return torch.ones_like(sigmas), sigmas
