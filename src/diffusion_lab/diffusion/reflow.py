"""Reflow (Liu et al. 2023, "Flow Straight and Fast", Sec. 2.3): flow matching on the couplings (eps, x_0) that a
trained flow's ODE draws, x_0 = ODE(eps), instead of independent pairs; each reflow straightens the flow, so that
few Euler steps follow it; its loss is `FlowMatching.training_losses` with the coupled eps given as `noise`.
Straightness of a flow Z (their Definition 2.5), with Z_t its ODE trajectories:
    S(Z) = int_0^1 E ||(Z_1 - Z_0) - dZ_t/dt||^2 dt   (0 exactly for straight paths).
"""

import torch
from torch import Tensor

from diffusion_lab.samplers.denoiser import Denoiser


@torch.no_grad()
def straightness(denoiser: Denoiser, noise: Tensor, steps: int = 100) -> float:
    """S(Z) per dimension by Euler's method on the flow-matching path from t = 1 (noise) to t = 0: the mean over the
    steps of E ||(z_noise - z_data) - v(z_t, t)||^2 / dim, v = eps_hat - x0_hat = dz/dt (Liu et al. 2023, Def. 2.5)."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    z, velocities = noise.to(torch.float64), []
    for i in range(steps):
        out = denoiser(z, 1 - t[i], t[i])
        velocities.append(out.eps - out.x0)
        z = z + (t[i + 1] - t[i]) * velocities[-1]
    displacement = noise.to(torch.float64) - z
    return torch.stack([(displacement - v).pow(2).flatten(1).mean(1) for v in velocities]).mean().item()
