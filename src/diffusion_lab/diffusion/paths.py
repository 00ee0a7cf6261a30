"""Gaussian probability paths x_t = alpha_t x_0 + sigma_t eps and the conversions between what a network predicts,
in the manner of facebookresearch/flow_matching (`path/scheduler/scheduler.py`, `path/affine.py`).

| code                | symbol                                                                          |
|---------------------|---------------------------------------------------------------------------------|
| alpha, sigma        | alpha_t, sigma_t of x_t = alpha_t x_0 + sigma_t eps                             |
| d_alpha, d_sigma    | d alpha_t / dt, d sigma_t / dt                                                  |
| v                   | v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, Sec. 4; variance preserving) |
| velocity            | u_t = dx_t / dt = d_alpha x_0 + d_sigma eps (Lipman et al. 2023, Eq. 20)        |

Three paths, one per process family: `DiscreteVPPath` (DDPM's table, t the possibly fractional timestep),
`VEPath` (EDM and consistency models: alpha = 1, sigma = t) and `RectifiedFlowPath` (alpha = 1 - t, sigma = t).
A path also maps any noise level (alpha, sigma) to its own point of the same signal-to-noise ratio (`locate`), so
that a sampler may step in another frame than the path's. The conversions below are written once, for all paths.
"""

import math

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.schedules import log_sigmas
from diffusion_lab.diffusion.timesteps import timestep_at_log_sigma


def broadcast(value: Tensor, like: Tensor) -> Tensor:
    """A scalar or per-sample (B,) value reshaped to broadcast over a batch like `like`, in its dtype."""
    return value.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def vp_norm(alpha: Tensor, sigma: Tensor) -> Tensor:
    """sqrt(alpha^2 + sigma^2) (B,) or (1,): the std of x = alpha x_0 + sigma eps for data of unit variance, and the
    factor between x at the level (alpha, sigma) and the variance-preserving path's point of the same SNR; taken as
    exactly 1 within 1e-12 of it, so that the points of a variance-preserving path pass unchanged."""
    norm = (alpha.to(torch.float64) ** 2 + sigma.to(torch.float64) ** 2).sqrt().reshape(-1)
    return torch.where((norm - 1).abs() < 1e-12, torch.ones_like(norm), norm)


# Conversions: each written once; alpha, sigma (and their derivatives) broadcast over x. ------------------------------

def eps_from_x0(x: Tensor, alpha: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """eps = (x - alpha x_0) / sigma."""
    return (x - alpha * x0) / sigma


def x0_from_eps(x: Tensor, alpha: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """x_0 = (x - sigma eps) / alpha (Ho et al. 2020, Eq. 15)."""
    return (x - sigma * eps) / alpha


def v_from_x0_eps(alpha: Tensor, sigma: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4)."""
    return alpha * eps - sigma * x0


def x0_eps_from_v(x: Tensor, alpha: Tensor, sigma: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(x_0, eps) = (alpha x - sigma v, sigma x + alpha v) on a variance-preserving path, alpha^2 + sigma^2 = 1
    (Salimans & Ho 2022, Sec. 4)."""
    return alpha * x - sigma * v, sigma * x + alpha * v


def velocity_from_x0_eps(d_alpha: Tensor, d_sigma: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """u = d_alpha x_0 + d_sigma eps, the velocity of the path through x_0 and eps (Lipman et al. 2023, Eq. 20)."""
    return d_alpha * x0 + d_sigma * eps


def x0_eps_from_velocity(x: Tensor, alpha: Tensor, sigma: Tensor, d_alpha: Tensor, d_sigma: Tensor,
                         velocity: Tensor) -> tuple[Tensor, Tensor]:
    """(x_0, eps) solving x = alpha x_0 + sigma eps and u = d_alpha x_0 + d_sigma eps:
    x_0 = (d_sigma x - sigma u) / det, eps = (alpha u - d_alpha x) / det, det = alpha d_sigma - sigma d_alpha
    (flow_matching's `AffineProbPath.velocity_to_target`)."""
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x - sigma * velocity) / det, (alpha * velocity - d_alpha * x) / det


# Paths ---------------------------------------------------------------------------------------------------------------

class GaussianPath(nn.Module):
    """alpha(t), sigma(t), their derivatives, and `locate`: the path's time t of a noise level (alpha, sigma) and the
    scale c with which x at that level is the path's point x_t = x / c. Subclasses give the four functions of t."""

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def locate(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def level_range(self) -> tuple[float, float]:
        """(smallest, largest) noise level sigma / alpha that the path's time reaches: all of (0, inf) for a
        continuous path."""
        return 0.0, math.inf

    def sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha_t x_0 + sigma_t eps for per-sample t (B,), in x0's dtype."""
        return broadcast(self.alpha(t), x0) * x0 + broadcast(self.sigma(t), x0) * eps


class VEPath(GaussianPath):
    """alpha = 1, sigma = t (Karras et al. 2022, Eq. 4 with s(t) = 1, sigma(t) = t; Song et al. 2021's VE SDE)."""

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def locate(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """t = sigma / alpha, c = alpha (the EDM frame)."""
        alpha, sigma = alpha.to(torch.float64).reshape(-1), sigma.to(torch.float64).reshape(-1)
        return sigma / alpha, alpha


class RectifiedFlowPath(GaussianPath):
    """alpha = 1 - t, sigma = t, t in [0, 1] (Liu et al. 2023; Lipman et al. 2023's conditional OT path)."""

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def locate(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """t = sigma / (alpha + sigma), c = alpha + sigma."""
        alpha, sigma = alpha.to(torch.float64).reshape(-1), sigma.to(torch.float64).reshape(-1)
        return sigma / (alpha + sigma), alpha + sigma


class DiscreteVPPath(GaussianPath):
    """DDPM's table: alpha = sqrt(alpha_bar(t)), sigma = sqrt(1 - alpha_bar(t)) at the timestep t = 0..T-1, possibly
    fractional: log(sigma / alpha) interpolated linearly between integer steps (as k-diffusion's DiscreteSchedule),
    exact at integers. alphas_cumprod (T,) is kept as a float64 buffer (not saved)."""

    def __init__(self, alphas_cumprod: Tensor):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def _interpolation(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(low, high, w, log sigma/alpha at t) for t clamped to the table."""
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        table = log_sigmas(self.alphas_cumprod)
        return low, high, w, (1 - w) * table[low] + w * table[high]

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar(t) = sigmoid(-2 log(sigma / alpha)(t)), the table's own value at integer t."""
        low, _, w, log_ratio = self._interpolation(t)
        return torch.where(w == 0, self.alphas_cumprod[low], torch.sigmoid(-2 * log_ratio))

    def d_alpha_bar(self, t: Tensor) -> Tensor:
        """d alpha_bar / dt = -2 alpha_bar (1 - alpha_bar) (L[high] - L[low]) with L = log(sigma / alpha), between the
        integer steps (the slope of the step above at an integer t)."""
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        table = log_sigmas(self.alphas_cumprod)
        alpha_bar = self.alpha_bar(t)
        return -2 * alpha_bar * (1 - alpha_bar) * (table[low + 1] - table[low])

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        return (1 - self.alpha_bar(t)).sqrt()

    def d_alpha(self, t: Tensor) -> Tensor:
        return self.d_alpha_bar(t) / (2 * self.alpha(t))

    def d_sigma(self, t: Tensor) -> Tensor:
        return -self.d_alpha_bar(t) / (2 * self.sigma(t))

    def timestep_at(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The fractional timestep of the noise level sigma / alpha (`timestep_at_log_sigma`), snapped to the integer
        step within 1e-9 of it, so that a level of the table maps back to its own step exactly. alpha = 0 is the last
        step of a zero-terminal-SNR table; the other levels are looked up among the steps before it (the 2^-24 that
        `log_sigmas` puts in for that step's 0 would break the table's order). Levels outside the table clamp to
        its ends (see `level_range`)."""
        log_sigma = (sigma.to(torch.float64).log() - alpha.to(torch.float64).log()).reshape(-1)
        table = log_sigmas(self.alphas_cumprod)
        zero_terminal = self.zero_terminal_snr
        t = timestep_at_log_sigma(table[:-1] if zero_terminal and len(table) > 1 else table, log_sigma)
        t = torch.where((t - t.round()).abs() < 1e-9, t.round(), t)
        return torch.where(torch.isinf(log_sigma) & zero_terminal, torch.full_like(t, self.num_timesteps - 1), t)

    def level_range(self) -> tuple[float, float]:
        """(smallest, largest) sigma / alpha of the table: the levels a network trained on it has seen."""
        table = log_sigmas(self.alphas_cumprod)
        return float(table[0].exp()), float(table[-1].exp())

    def locate(self, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """t = `timestep_at`, c = sqrt(alpha^2 + sigma^2) (`vp_norm`)."""
        return self.timestep_at(alpha, sigma), vp_norm(alpha, sigma)
