"""Guidance: D_w = D_g + w (D - D_g) applied to a denoiser D, for x_0 and eps alike.

- Classifier-free guidance (Ho & Salimans 2022, Eq. 6): D_g is the same network at the null class.
- Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself", Eq. 2): D_g is a
  weaker network of the same task (smaller, or trained for less), given the same labels; it guides unconditional
  models too.
- Guidance over an interval (Kynkaanniemi et al. 2024, Eq. 2): D_w only where the noise level s = sigma / alpha lies
  in (s_lo, s_hi], the plain D elsewhere, which then costs one network evaluation instead of two.

w = 1 is the plain D, w = 0 the guide alone. x = alpha x_0 + sigma eps holds for the guided pair as for each part;
a learned variance comes from D.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffusion_lab.samplers.denoiser import DenoiserOutput, nonzero_alphas
from diffusion_lab.utils.errors import ConfigError


@dataclass(frozen=True)
class Guidance:
    """How sampling is guided. scale: w; interval: (s_lo, s_hi] in the noise level s = sigma / alpha (the EDM sigma;
    default every level); guide_net: autoguidance's guide network, of the same process and shape (None:
    classifier-free, the main network at the null class)."""

    scale: float = 1.0
    interval: tuple[float, float] = (0.0, math.inf)
    guide_net: nn.Module | None = None

    def __post_init__(self):
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ConfigError(f"guidance_scale={self.scale} must be a finite number (1: no guidance)")
        low, high = self.interval
        if not 0 <= low < high:
            raise ConfigError(f"guidance_interval=[{low}, {high}] must be [s_lo, s_hi] with 0 <= s_lo < s_hi, in the "
                              "noise level s = sigma / alpha")

    @property
    def active(self) -> bool:
        return self.scale != 1

    @property
    def autoguided(self) -> bool:
        return self.guide_net is not None

    @property
    def everywhere(self) -> bool:
        """Whether the interval holds every noise level (the default): no level need be checked."""
        return self.interval == (0.0, math.inf)

    def inside(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Whether each noise level s = sigma / alpha lies in (s_lo, s_hi] (alpha = 0 read as 2^-12)."""
        level = sigma / nonzero_alphas(alpha)
        return (level > self.interval[0]) & (level <= self.interval[1])

    def check_grid(self, alphas: Tensor, sigmas: Tensor) -> None:
        """ConfigError (one line) when the interval holds none of the levels a sampler evaluates on this grid (every
        point but the last, the data): the guidance asked for would never act."""
        if not self.active or bool(self.inside(alphas[:-1], sigmas[:-1]).any()):
            return
        levels = (sigmas[:-1] / nonzero_alphas(alphas[:-1])).tolist()
        raise ConfigError(f"guidance_interval=[{self.interval[0]}, {self.interval[1]}] holds none of the noise levels "
                          f"sigma/alpha this sampler evaluates ({min(levels):.4g} .. {max(levels):.4g}): guidance would "
                          "never act; choose bounds in that range")


def guided(main: DenoiserOutput, guide: DenoiserOutput, scale: float) -> DenoiserOutput:
    """D_g + w (D - D_g) for x_0 and eps; the variance of D."""
    return DenoiserOutput(guide.x0 + scale * (main.x0 - guide.x0), guide.eps + scale * (main.eps - guide.eps),
                          main.variance_interp)


def select(inside: Tensor, a: DenoiserOutput, b: DenoiserOutput) -> DenoiserOutput:
    """Per sample, a where `inside`, else b."""
    def pick(u, v):
        return None if u is None else torch.where(inside.reshape(-1, *([1] * (u.ndim - 1))), u, v)
    return DenoiserOutput(*(pick(u, v) for u, v in zip(a, b)))


class GuidedDenoiser(nn.Module):
    """`denoiser` (labels `class_labels`, None for an unconditional model) guided as `guidance` says: the guide is
    `guide` (autoguidance: the guide network's denoiser, the same labels) or, with guide None, `denoiser` at the
    null class `null_class` in one forward over the batch twice (classifier-free). Outside the interval only
    `denoiser` runs."""

    def __init__(self, denoiser: nn.Module, guidance: Guidance, class_labels: Tensor | None = None,
                 guide: nn.Module | None = None, null_class: int | None = None):
        super().__init__()
        if guide is None and class_labels is None:
            raise ConfigError(f"guidance_scale={guidance.scale} needs class_labels (a class-conditional model) or a "
                              "guide network (autoguidance: guide_ckpt=PATH)")
        self.denoiser, self.guide, self.guidance = denoiser, guide, guidance
        self.class_labels, self.null_class = class_labels, null_class

    def labelled(self, labels: Tensor | None, net_kwargs: dict) -> dict:
        return net_kwargs if labels is None else {**net_kwargs, "class_labels": labels}

    def forward(self, x: Tensor, alpha: Tensor, sigma: Tensor, **net_kwargs) -> DenoiserOutput:
        if not self.guidance.active:
            return self.denoiser(x, alpha, sigma, **self.labelled(self.class_labels, net_kwargs))
        inside = None  # the default interval: guided everywhere, with no host sync per step
        if not self.guidance.everywhere:
            inside = self.guidance.inside(alpha.reshape(-1), sigma.reshape(-1)).expand(x.shape[0])
            if not bool(inside.any()):
                return self.denoiser(x, alpha, sigma, **self.labelled(self.class_labels, net_kwargs))
        if self.guide is not None:
            main = self.denoiser(x, alpha, sigma, **self.labelled(self.class_labels, net_kwargs))
            guide = self.guide(x, alpha, sigma, **self.labelled(self.class_labels, net_kwargs))
        else:
            main, guide = self.conditional_and_null(x, alpha, sigma, net_kwargs)
        out = guided(main, guide, self.guidance.scale)
        return out if inside is None or bool(inside.all()) else select(inside, out, main)

    def conditional_and_null(self, x: Tensor, alpha: Tensor, sigma: Tensor, net_kwargs: dict):
        """D at class_labels and at the null class, from one forward over the batch twice."""
        def twice(value):
            return torch.cat([value, value]) if isinstance(value, Tensor) and value.numel() > 1 else value

        labels = torch.cat([self.class_labels, torch.full_like(self.class_labels, self.null_class)])
        kwargs = {key: twice(value) for key, value in net_kwargs.items()}
        both = self.denoiser(twice(x), twice(alpha.reshape(-1)), twice(sigma.reshape(-1)), class_labels=labels, **kwargs)
        halves = [None if part is None else part.chunk(2) for part in both]
        return (DenoiserOutput(*(None if h is None else h[0] for h in halves)),
                DenoiserOutput(*(None if h is None else h[1] for h in halves)))
