"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
Alg. 2): a student learns to take in one DDIM step what its teacher takes in two, on any (alpha, sigma) grid.

With the teacher's grid of 2N points (even points the student's N-step grid), a student step from t to t'' and the
teacher's midpoint t':
    z_t = alpha_t x + sigma_t eps,  z_t' = DDIM_teacher(z_t; t -> t'),  z_t'' = DDIM_teacher(z_t'; t' -> t''),
    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),
the x_0 that makes one DDIM step from z_t land on z_t''; the loss is max(SNR_t, 1) ||x_hat(z_t) - x_tilde||^2
("truncated SNR" weighting, their Sec. 4), the student predicting v (objective=v) as in the paper.
"""

import torch
from torch import Tensor

from diffusion_lab.samplers.denoiser import Denoiser


def ddim_step(denoiser: Denoiser, z: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """z_s = alpha_s x_hat + sigma_s eps_hat at (alpha_t, sigma_t) (Song et al. 2021, Eq. 12 with eta = 0)."""
    out = denoiser(z, alpha_t, sigma_t)
    return alpha_s * out.x0 + sigma_s * out.eps


def distillation_target(teacher: Denoiser, z: Tensor, alphas: Tensor, sigmas: Tensor) -> Tensor:
    """x_tilde from two teacher DDIM steps over (alphas, sigmas) = the levels (t, t', t''), each (3, B, 1, ...) (Alg. 2)."""
    z_mid = ddim_step(teacher, z, alphas[0], sigmas[0], alphas[1], sigmas[1])
    z_end = ddim_step(teacher, z_mid, alphas[1], sigmas[1], alphas[2], sigmas[2])
    ratio = sigmas[2] / sigmas[0]
    return (z_end - ratio * z) / (alphas[2] - ratio * alphas[0])


def distillation_losses(student: Denoiser, teacher: Denoiser, x0: Tensor, alphas: Tensor, sigmas: Tensor,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample max(SNR_t, 1) mean (x_hat - x_tilde)^2 at a student step drawn uniformly from the N of the teacher's
    grid (alphas, sigmas) (2N + 1,) (descending in noise, last the data). Returns (loss (B,), u = 1 - i / N)."""
    steps = (len(alphas) - 1) // 2
    i = torch.randint(0, steps, (x0.shape[0],), generator=generator, device=x0.device)
    index = torch.stack([2 * i, 2 * i + 1, 2 * i + 2])
    a, s = (table.to(x0.device, torch.float64)[index].reshape(3, -1, *[1] * (x0.ndim - 1)) for table in (alphas, sigmas))
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    z = a[0] * x0 + s[0] * eps
    with torch.no_grad():
        target = distillation_target(teacher, z, a, s)
    prediction = student(z, a[0], s[0]).x0
    snr = (a[0] / s[0]).reshape(-1) ** 2
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1) * snr.clamp(min=1).float()
    return per_sample, 1 - i.double() / steps
