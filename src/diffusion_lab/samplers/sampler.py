"""`Sampler`: one configured sampler (algorithm, steps, spacing, options), as the `sampler` config group builds it."""

import inspect
from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.diffusion.gaussian import Denoiser, GaussianDiffusion
from diffusion_lab.samplers.sampling import SAMPLERS
from diffusion_lab.samplers.spacing import timesteps_for
from diffusion_lab.utils.errors import ConfigError


class Sampler:
    """Runs `SAMPLERS[algorithm]` over `steps` timesteps of the given spacing, from noise to x_0."""

    def __init__(self, algorithm: str, steps: int, spacing: str = "uniform", **options):
        if algorithm not in SAMPLERS:
            raise ConfigError(f"sampler.algorithm={algorithm!r} is not a sampler; choose one of {', '.join(SAMPLERS)}")
        fn = SAMPLERS[algorithm]
        allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        allowed = [name for name in allowed if name not in ("callback", "noise_sampler")]
        for key in options:
            if key not in allowed:
                raise ConfigError(
                    f"sampler.{key} is not an option of sampler {algorithm}; its options are: {', '.join(allowed) or 'none'}"
                )
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"sampler.steps={steps} must be an integer >= 1")
        self.algorithm, self.steps, self.spacing, self.options = algorithm, steps, spacing, options

    @property
    def evaluations(self) -> int:
        """Network evaluations per sample (heun: two a step but one on the last)."""
        return 2 * self.steps - 1 if self.algorithm == "heun" else self.steps

    def schedule(self, process: GaussianDiffusion) -> tuple[Tensor, Tensor]:
        """(timesteps, alpha_bars): the steps to visit and their alpha_bar, with alpha_bar = 1 appended."""
        timesteps = timesteps_for(self.spacing, process.alphas_cumprod, self.steps)
        alpha_bars = torch.cat([process.alpha_bar_at(timesteps), timesteps.new_ones(1)])
        return timesteps, alpha_bars

    @torch.no_grad()
    def __call__(
        self,
        denoiser: Denoiser,
        noise: Tensor,
        process: GaussianDiffusion,
        callback: Callable | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x_0 from x_T = noise; float64 throughout the sampler's own arithmetic."""
        timesteps, alpha_bars = self.schedule(process)
        x = noise.to(torch.float64)
        timesteps, alpha_bars = timesteps.to(x.device), alpha_bars.to(x.device)

        def noise_sampler(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

        return SAMPLERS[self.algorithm](
            denoiser, x, timesteps, alpha_bars, callback=callback, noise_sampler=noise_sampler, **self.options
        )

    def __repr__(self) -> str:
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.algorithm}(steps={self.steps}, spacing={self.spacing}{options})"
