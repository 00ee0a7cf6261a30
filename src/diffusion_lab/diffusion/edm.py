"""EDM: the design space of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", as a Gaussian process with alpha = 1: x = x_0 + sigma eps, sigma in [sigma_min, sigma_max].

Preconditioning (their Table 1, "Ours"), with sigma_data the data's standard deviation:
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise),
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),  c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),            c_noise = ln(sigma) / 4.
Training: ln sigma ~ N(P_mean, P_std^2) and the loss lambda(sigma) ||D(x_0 + sigma eps; sigma) - x_0||^2 with
lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, so that the network's own target has unit weight.
Sampling: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0 (Eq. 5),
with the EDM sampler (`sampler=edm`, Alg. 2) or any other; spacing `trailing` takes the same ramp at i / N, i = 0..N-1,
then 0, so that the N-step grid is the even half of the 2N-step one (progressive distillation's nested grids).
"""

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.paths import VEPath, broadcast, eps_from_x0
from diffusion_lab.diffusion.process import Process
from diffusion_lab.samplers.denoiser import DenoiserOutput
from diffusion_lab.utils.errors import ConfigError

SPACINGS = ("karras", "trailing")


def karras_sigmas(sigma_min: float, sigma_max: float, rho: float, num_scales: int) -> Tensor:
    """sigma_i = (sigma_min^(1/rho) + (i - 1) / (N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..N, float64
    ascending (Karras et al. 2022, Eq. 5; Song et al. 2023, App. C)."""
    return rho_ramp(sigma_min, sigma_max, rho, torch.linspace(0, 1, num_scales, dtype=torch.float64))


def rho_ramp(sigma_min: float, sigma_max: float, rho: float, ramp: Tensor) -> Tensor:
    """(sigma_min^(1/rho) + ramp (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho: Eq. 5's sigma at ramp in [0, 1]."""
    inv_rho = 1 / rho
    return (sigma_min**inv_rho + ramp * (sigma_max**inv_rho - sigma_min**inv_rho)) ** rho


class PreconditionedProcess(Process):
    """A process on the path alpha = 1, sigma = t (`VEPath`) whose network is preconditioned (Karras et al. 2022,
    Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), with (c_skip, c_out, c_in, c_noise) =
    `preconditioning(sigma)`; EDM's D and the consistency function differ only in c_skip and c_out."""

    def __init__(self, cond_drop_prob: float):
        super().__init__(cond_drop_prob)
        self.path = VEPath()

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(c_in x, c_noise)."""
        _, _, c_in, c_noise = self.preconditioning(sigma)
        return broadcast(c_in, x) * x, c_noise

    def read_output(self, x: Tensor, sigma: Tensor, output: Tensor) -> DenoiserOutput:
        """x_0 = c_skip x + c_out F and eps = (x - x_0) / sigma."""
        c_skip, c_out, _, _ = self.preconditioning(sigma)
        x0 = broadcast(c_skip, x) * x + broadcast(c_out, x) * output
        return DenoiserOutput(x0, eps_from_x0(x, 1, broadcast(sigma, x), x0))


class EDM(PreconditionedProcess):
    """Karras et al. 2022's preconditioned denoiser, training and noise levels; see the module docstring."""

    name = "edm"
    default_spacing = "karras"
    clip_x0 = False

    def __init__(
        self,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        cond_drop_prob: float = 0.1,
    ):
        super().__init__(cond_drop_prob)
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"process.sigma_min={sigma_min}, process.sigma_max={sigma_max}: need 0 < sigma_min < sigma_max")
        for key, value in (("sigma_data", sigma_data), ("rho", rho), ("P_std", P_std)):
            if not value > 0:
                raise ConfigError(f"process.{key}={value} must be > 0")
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.P_mean, self.P_std = P_mean, P_std

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma (Table 1)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Table 1)."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def training_losses(self, net: nn.Module, x0: Tensor, generator: torch.Generator,
                        class_labels: Tensor | None = None, clip_x0: bool | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample lambda(sigma) mean ||D(x_0 + sigma eps; sigma) - x_0||^2 with ln sigma ~ N(P_mean, P_std^2)
        and eps ~ N(0, I) from `generator` (their Sec. 5, Table 1; EDM's `EDMLoss`); label dropout and
        self-conditioning as `Process.training_kwargs`. Returns (loss (B,), u (B,)) with u = Phi((ln sigma - P_mean) /
        P_std), the quantile of sigma under the training density."""
        normal = torch.randn(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64)
        sigma = (self.P_mean + self.P_std * normal).exp()
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x = self.path.sample(x0, sigma, noise)
        denoiser, alpha = self.core_denoiser(net), torch.ones_like(sigma)
        net_kwargs = self.training_kwargs(denoiser, x, alpha, sigma, generator, class_labels, clip_x0)
        denoised = denoiser(x, alpha, sigma, **net_kwargs).x0
        per_sample = ((denoised.float() - x0.float()) ** 2).flatten(1).mean(1) * self.loss_weight(sigma).float()
        return per_sample, torch.special.ndtr(normal)

    def sampling_grid(self, steps: int, spacing: str = "karras") -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) = (1, sigma_i), then (1, 0): karras, the `steps` rho-spaced sigmas of Eq. 5 from sigma_max
        to sigma_min; trailing, the ramp of Eq. 5 at i / steps, i = 0..steps-1 (from sigma_max, never reaching
        sigma_min; as DDPM's trailing timesteps start at T and stop short of the data), whose N-step grid is every
        other point of the 2N-step grid."""
        if spacing not in SPACINGS:
            raise ConfigError(f"sampler.spacing={spacing!r} is not a spacing of process edm; choose one of "
                              f"{', '.join(SPACINGS)} (rho-spaced sigmas, process.rho)")
        least = 2 if spacing == "karras" else 1
        if not isinstance(steps, int) or steps < least:
            raise ConfigError(f"sampler.steps={steps} must be an integer >= {least} for process edm with spacing {spacing}")
        if spacing == "karras":
            sigmas = karras_sigmas(self.sigma_min, self.sigma_max, self.rho, steps).flip(0)
        else:
            ramp = 1 - torch.arange(steps, dtype=torch.float64) / steps
            sigmas = rho_ramp(self.sigma_min, self.sigma_max, self.rho, ramp)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return torch.ones_like(sigmas), sigmas
