"""Which DDPM timesteps a sampler visits: pure functions from the schedule and a step count to a descending list of
timesteps, possibly fractional (`DiscreteVPPath.alpha_bar` interpolates log sigma between integer steps).

Timestep index t = 0..T-1 holds the paper's t = 1..T; every sampler ends by stepping to alpha_bar = 1.
uniform, leading and trailing follow diffusers' `timestep_spacing` "linspace", "leading", "trailing" (Lin et al.
2024, Table 2); quadratic is the DDIM paper's (Song et al. 2021, App. D.2); karras is Karras et al. 2022, Eq. 5.
"""

import torch

from diffusion_lab.diffusion.schedules import log_sigmas
from diffusion_lab.utils.errors import ConfigError

SPACINGS = ("uniform", "leading", "trailing", "quadratic", "karras")


def uniform_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """round(linspace(0, T-1, steps)), descending: always starts at T-1 and ends at 0."""
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().flip(0)


def leading_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """(0, 1, ..., steps-1) * (T // steps), descending: the DDIM paper's strided spacing."""
    return (torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)).flip(0)


def trailing_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """round(arange(T, 0, -T/steps)) - 1: starts at T-1, ends near T/steps - 1."""
    return (torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64).round() - 1)[:steps]


def quadratic_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """(T-1) * (i / (steps-1))^2, i = steps-1..0: dense near the data. Kept fractional (the DDIM paper rounds,
    which repeats timesteps once steps^2 > T)."""
    return (num_timesteps - 1) * torch.linspace(0, 1, steps, dtype=torch.float64).flip(0) ** 2


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho between the
    schedule's sigma_min = sigma(0) and sigma_max = sigma(T-1) (Karras et al. 2022, Eq. 5), each mapped to the
    fractional timestep where log sigma, interpolated linearly between integer steps, equals it."""
    table = log_sigmas(alphas_cumprod)
    sigma_min, sigma_max = table[0].exp(), table[-1].exp()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64, device=alphas_cumprod.device)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    timesteps = timestep_at_log_sigma(table, sigmas.log())
    timesteps[0], timesteps[-1] = len(table) - 1, 0  # the ends exactly, free of rounding in the power rho
    return timesteps


def timestep_at_log_sigma(table: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """The fractional timestep where log sigma, interpolated linearly between the integer steps of `table`
    (`log_sigmas`, ascending), equals `log_sigma` (clamped to the table's range): the inverse of
    `DiscreteVPPath.alpha_bar`."""
    if len(table) == 1:
        return torch.zeros_like(log_sigma)
    low = (torch.searchsorted(table, log_sigma, right=True) - 1).clamp(0, len(table) - 2)
    w = ((log_sigma - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
    return low + w


def timesteps_for(spacing: str, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """The descending timesteps of the named spacing over a schedule of len(alphas_cumprod) steps, float64."""
    if spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r} is not a spacing of the DDPM process; choose one of {', '.join(SPACINGS)}")
    num_timesteps = len(alphas_cumprod)
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ConfigError(f"sampler.steps={steps} must be an integer in 1..{num_timesteps} (the schedule's timesteps)")
    if spacing in ("quadratic", "karras") and steps < 2:
        raise ConfigError(f"sampler.spacing={spacing} needs sampler.steps >= 2")
    if spacing == "karras":
        return karras_timesteps(alphas_cumprod.to(torch.float64), steps)
    spaced = {
        "uniform": uniform_timesteps,
        "leading": leading_timesteps,
        "trailing": trailing_timesteps,
        "quadratic": quadratic_timesteps,
    }[spacing]
    return spaced(num_timesteps, steps).to(alphas_cumprod.device)
