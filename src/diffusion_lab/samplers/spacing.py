"""Which timesteps a sampler visits: pure functions from (T, steps) to a descending list of timesteps.

Timestep index t = 0..T-1 holds the paper's t = 1..T; every sampler ends by stepping to alpha_bar = 1.
Definitions follow diffusers' `timestep_spacing` (Lin et al. 2024, Table 2).
"""

import torch

from diffusion_lab.utils.errors import ConfigError

SPACINGS = ("uniform", "leading", "trailing")


def uniform_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """round(linspace(0, T-1, steps)), descending: always starts at T-1 and ends at 0."""
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().flip(0)


def leading_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """(0, 1, ..., steps-1) * (T // steps), descending: the DDIM paper's strided spacing."""
    return (torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps)).flip(0)


def trailing_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """round(arange(T, 0, -T/steps)) - 1: starts at T-1, ends near T/steps - 1."""
    return (torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64).round() - 1)[:steps]


def timesteps_for(spacing: str, num_timesteps: int, steps: int) -> torch.Tensor:
    """The descending timesteps of the named spacing, float64, shape (steps,)."""
    if spacing not in SPACINGS:
        raise ConfigError(f"sampler.spacing={spacing!r} is not a spacing; choose one of {', '.join(SPACINGS)}")
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ConfigError(f"sampler.steps={steps} must be an integer in 1..{num_timesteps} (the schedule's timesteps)")
    return {"uniform": uniform_timesteps, "leading": leading_timesteps, "trailing": trailing_timesteps}[spacing](
        num_timesteps, steps
    )
