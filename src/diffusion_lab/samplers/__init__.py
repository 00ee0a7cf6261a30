"""Samplers over a denoiser (`sampling`), the timesteps they visit (`spacing`), and `Sampler`,
the configured pairing of the two that `sampler=` selects."""

from diffusion_lab.samplers.sampler import Sampler

__all__ = ["Sampler"]
