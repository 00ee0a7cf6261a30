"""Sampling a learned flow map (symbols: `samplers.denoiser`)."""

from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.samplers.denoiser import Denoiser, NoiseSampler, report_step


@torch.no_grad()
def flow_map(
    denoiser: Denoiser,
    x: Tensor,
    alphas: Tensor,
    sigmas: Tensor,
    *,
    callback: Callable | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Steps of a learned flow map, one evaluation each (MeanFlow, Geng et al. 2025, Alg. 2; shortcut models, Frans
    et al. 2024, Alg. 2): the denoiser, told the level it steps to (level_to), reads the map's average velocity over
    the step as (x_0, eps), and x_next = alpha_next x_0 + sigma_next eps is the map's point there (on the
    rectified-flow path, z_r = z_t - (t - r) u(z_t, r, t)). Only a flow-map process's denoiser takes level_to."""
    for i in range(len(alphas) - 1):
        out = denoiser(x, alphas[i], sigmas[i], level_to=(alphas[i + 1], sigmas[i + 1]))
        x = alphas[i + 1] * out.x0 + sigmas[i + 1] * out.eps
        report_step(callback, i, x, out, alphas[i + 1], sigmas[i + 1])
    return x
