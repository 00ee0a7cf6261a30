"""Samplers over a denoiser and a grid of noise levels (`sampling`), and `Sampler`, the configured sampler that
`sampler=` selects. Nothing here imports a process or Lightning."""

from diffusion_lab.samplers.sampler import Sampler

__all__ = ["Sampler"]
