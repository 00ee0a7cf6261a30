"""Flow maps on the rectified-flow path z_t = (1 - t) x_0 + t eps (t = 0 data, t = 1 noise): a network of two times
u(z_t, r, t), the average velocity over [r, t], so that the map from t to r is one step

    z_r = z_t - (t - r) u(z_t, r, t),   u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,   u(z_t, t, t) = v(z_t, t)

(Geng et al. 2025, "Mean Flows for One-step Generative Modeling", Eq. 3; Frans et al. 2024, "One Step Diffusion via
Shortcut Models", whose step size d is t - r). MeanFlow (`diffusion.meanflow`) and shortcut models
(`diffusion.shortcut`) learn the same u with different losses; both read and sample it through this module:
`FlowMap` (the process part they share), `FlowMapDenoiser` (the sampler's view) and `time_derivative` (the JVP of
MeanFlow's target, written once).
"""

import warnings
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion_lab.diffusion.denoisers import ProcessDenoiser, call_net
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.paths import broadcast
from diffusion_lab.samplers.denoiser import DenoiserOutput
from diffusion_lab.utils.errors import ConfigError

JVP_MODES = ("auto", "exact", "finite_difference")
AverageVelocity = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z, r, t) -> u(z, r, t)


def same_random_numbers(device: torch.device):
    """A context that restores the random state (CPU, and the device's on CUDA) on exit: calls inside it draw the
    same numbers (dropout masks) as the next call after it."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def forward_mode(fn: AverageVelocity, z: Tensor, r: Tensor, t: Tensor, velocity: Tensor,
                 primal_apart: bool) -> tuple[Tensor, Tensor]:
    """(u, du/dt) by torch.func.jvp, attention by the math kernel of scaled_dot_product_attention (the fused CPU
    kernel has no forward-mode rule). primal_apart: u from a plain forward after a JVP without gradients drawing the
    same random numbers, for a network that recomputes its forward in the backward pass (gradient checkpointing),
    which cannot replay a forward-mode one; one more forward than the single pass."""
    tangents = (velocity, torch.zeros_like(r), torch.ones_like(t))
    if not primal_apart:
        with sdpa_kernel(SDPBackend.MATH):
            u, du_dt = torch.func.jvp(fn, (z, r, t), tangents)
        return u, du_dt.detach()
    with same_random_numbers(z.device), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, du_dt = torch.func.jvp(fn, (z, r, t), tangents)
    return fn(z, r, t), du_dt


def time_derivative(fn: AverageVelocity, z: Tensor, r: Tensor, t: Tensor, velocity: Tensor, mode: str = "auto",
                    step: float = 1e-4, primal_apart: bool = False) -> tuple[Tensor, Tensor]:
    """(u, du/dt) of u = fn(z, r, t) along the trajectory dz/dt = velocity, dr/dt = 0: the total derivative
    d/dt u = velocity . grad_z u + d_t u, the JVP of fn with tangent (velocity, 0, 1) (MeanFlow, Eq. 8).
    exact: forward-mode AD (`forward_mode`); finite_difference: (fn(z + h v, r, t + h) - fn(z - h v, r, t - h)) / 2h
    with h = step, the three calls drawing the same random numbers (dropout); auto: exact, or finite differences
    where an operation has no forward-mode rule. u keeps its graph to the parameters; du/dt has none."""
    if mode not in JVP_MODES:
        raise ConfigError(f"process.jvp_mode={mode!r} is not allowed; choose one of {', '.join(JVP_MODES)}")
    if mode != "finite_difference":
        try:
            return forward_mode(fn, z, r, t, velocity, primal_apart)
        except NotImplementedError as error:
            if mode == "exact" or "forward AD" not in str(error):
                raise
            warnings.warn(f"process.jvp_mode=auto: finite differences, as forward-mode AD failed: {str(error).splitlines()[0]}")
    ends = []
    for sign in (1, -1):
        with same_random_numbers(z.device), torch.no_grad():
            ends.append(fn(z + sign * step * velocity, r, t + sign * step))
    return fn(z, r, t), (ends[0] - ends[1]) / (2 * step)


class FlowMapDenoiser(ProcessDenoiser):
    """The denoiser of a flow map: at (x, alpha, sigma) and the level it steps to, level_to = (alpha_to, sigma_to),
    the net gives u over [r, t] (t, r: the path times of the two levels) and the output is (x_0, eps) of that velocity
    (`FlowMatching.x0_eps`), for which alpha_to x_0 + sigma_to eps = c_to (z_t - (t - r) u), the map's point at
    level_to (c_to: the level's scale, `locate`). Without level_to, r = t: the velocity, as flow matching reads it."""

    def forward(self, x: Tensor, alpha: Tensor, sigma: Tensor, level_to: tuple[Tensor, Tensor] | None = None,
                **net_kwargs) -> DenoiserOutput:
        path = self.process.path
        t, scale = path.locate(alpha, sigma)
        r = t if level_to is None else path.locate(*level_to)[0]
        t, r = t.to(x.device).expand(x.shape[0]), r.to(x.device).expand(x.shape[0])
        z = x / broadcast(scale.to(x.device), x)
        return self.process.read_output(z, t, self.process.average_velocity(self.net, z, r, t, **net_kwargs))


class FlowMap(FlowMatching):
    """Flow matching's path, time densities and sampling grid with a network of two times read as the average
    velocity u(z_t, r, t) (see the module docstring): `sampler=flow_map` steps by the map, every other sampler by
    the velocity u(z_t, t, t). Subclasses give the training loss."""

    name = "flow_map"
    needs_second_time = True

    def core_denoiser(self, net: nn.Module) -> FlowMapDenoiser:
        return FlowMapDenoiser(net, self)

    def average_velocity(self, net: nn.Module, z: Tensor, r: Tensor, t: Tensor, **net_kwargs) -> Tensor:
        """u(z, r, t) = net(z, time_scale t, second_time=time_scale (t - r)) in z's dtype, r, t (B,): the net sees
        t and the interval t - r (MeanFlow's (t, t - r) conditioning, their Tab. 1c; the shortcut's step size d)."""
        return call_net(net, z, self.time_scale * t, second_time=self.time_scale * (t - r), **net_kwargs)
