"""Reflow (Liu et al. 2023, "Flow Straight and Fast", Sec. 2.3): flow matching on the couplings (eps, x_0) that a
trained flow's ODE draws, x_0 = ODE(eps), instead of independent pairs; each reflow straightens the flow, so that
few Euler steps follow it. Straightness of a flow Z (their Definition 2.5), with Z_t its ODE trajectories:
    S(Z) = int_0^1 E ||(Z_1 - Z_0) - dZ_t/dt||^2 dt   (0 exactly for straight paths).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.process import broadcast
from diffusion_lab.samplers.sampling import Denoiser


def coupled_losses(process: FlowMatching, net: nn.Module, x0: Tensor, noise: Tensor, generator: torch.Generator,
                   class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample mean ||v_hat(x_t, t) - (eps - x_0)||^2 on x_t = (1 - t) x_0 + t eps for coupled pairs (eps, x_0),
    t from the process's time density (Liu et al. 2023, Eq. 1 with the teacher's coupling). Returns (loss, t)."""
    t = process.sample_time(x0.shape[0], generator, x0.device)
    t_b = broadcast(t, x0)
    x_t = (1 - t_b) * x0 + t_b * noise
    t_in = (process.time_scale * t).to(x0.dtype)
    net_kwargs = process.training_kwargs(net, x_t, t_in, generator, class_labels, lambda v: x_t - t_b * v)
    velocity = net(x_t, t_in, **net_kwargs)
    return F.mse_loss(velocity.float(), (noise - x0).float(), reduction="none").flatten(1).mean(1), t


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
