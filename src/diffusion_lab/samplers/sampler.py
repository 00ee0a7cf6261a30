"""`Sampler`: one configured sampler (algorithm, steps, spacing, options), as the `sampler` config group builds it."""

import inspect
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.samplers.denoiser import CountedDenoiser, Denoiser, reset_state
from diffusion_lab.samplers.sampling import GRID_CHECKS, SAMPLERS
from diffusion_lab.utils.errors import ConfigError


def gaussian_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N(0, I) of like's shape, device and dtype, drawn from `generator`."""
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


class Sampler:
    """Runs `SAMPLERS[algorithm]` over the grid of `steps` noise levels that a process lays out with `spacing`
    (`process.sampling_grid`), from noise to x_0. `evaluations_used` counts the network evaluations of the last run
    (the adaptive dopri5 reports its own count here)."""

    def __init__(self, algorithm: str, steps: int, spacing: str = "uniform", **options):
        if algorithm not in SAMPLERS:
            raise ConfigError(f"sampler.algorithm={algorithm!r} is not a sampler; choose one of {', '.join(SAMPLERS)}")
        fn = SAMPLERS[algorithm]
        allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        allowed = [name for name in allowed if name not in ("callback", "noise_sampler")]
        for key in options:
            if key not in allowed:
                raise ConfigError(
                    f"sampler.{key} is not an option of sampler {algorithm}; its options are: {', '.join(['steps', 'spacing', *allowed])}"
                )
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"sampler.steps={steps} must be an integer >= 1")
        eta = options.get("eta", 0.0)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
            raise ConfigError(f"sampler.eta={eta} must be a number >= 0 (0: no fresh noise a step, 1: DDPM-like)")
        self.algorithm, self.steps, self.spacing, self.options = algorithm, steps, spacing, options
        self.evaluations_used = 0

    @property
    def evaluations(self) -> int:
        """Network evaluations per sample of a fixed-step sampler (heun and edm: two a step but one on the last);
        for dopri5, see `evaluations_used`."""
        return 2 * self.steps - 1 if self.algorithm in ("heun", "edm") else self.steps

    def check(self, alphas: Tensor, sigmas: Tensor) -> None:
        """SamplerError (one line) when this sampler cannot run on the grid (alphas, sigmas) of a process."""
        if self.algorithm in GRID_CHECKS:
            GRID_CHECKS[self.algorithm](alphas, sigmas)

    @torch.no_grad()
    def __call__(
        self,
        denoiser: Denoiser,
        noise: Tensor,
        alphas: Tensor,
        sigmas: Tensor,
        callback: Callable | None = None,
        generator: torch.Generator | None = None,
        noise_sampler: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """x_0 from x = noise at the first point of the grid (alphas, sigmas); float64 throughout the sampler's own
        arithmetic. The denoiser's state (self-conditioning) starts afresh (`reset_state`). noise_sampler(like): the
        N(0, I) draws of a stochastic sampler (default: torch.randn from `generator`; generate.py passes per-sample
        draws)."""
        x = noise.to(torch.float64)
        alphas, sigmas = alphas.to(x.device, torch.float64), sigmas.to(x.device, torch.float64)
        reset_state(denoiser)
        counted = CountedDenoiser(denoiser)
        if noise_sampler is None:
            noise_sampler = partial(gaussian_noise, generator=generator)
        x0 = SAMPLERS[self.algorithm](counted, x, alphas, sigmas, callback=callback, noise_sampler=noise_sampler,
                                      **self.options)
        self.evaluations_used = counted.evaluations
        return x0

    def __repr__(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.algorithm}(steps={self.steps}, spacing={self.spacing}{options})"
