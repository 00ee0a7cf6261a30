"""Variance schedules beta_1..beta_T, computed in float64.

Symbols follow Ho et al. 2020 (DDPM): alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.
"""

import math

import torch

from diffusion_lab.utils.errors import ConfigError

SCHEDULES = ("linear", "cosine", "quadratic", "sigmoid", "dpm2015")


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t evenly spaced from beta_start to beta_end (Ho et al. 2020, Sec. 4)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def quadratic_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """sqrt(beta_t) evenly spaced from sqrt(beta_start) to sqrt(beta_end)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def sigmoid_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t = beta_start + (beta_end - beta_start) * sigmoid(u), u evenly spaced in [-6, 6]."""
    u = torch.linspace(-6, 6, timesteps, dtype=torch.float64)
    return torch.sigmoid(u) * (beta_end - beta_start) + beta_start


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), beta_t = 1 - alpha_bar(t)/alpha_bar(t-1),
    clipped at max_beta (Nichol & Dhariwal 2021, Eq. 17)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def dpm2015_betas(timesteps: int, step1_beta: float = 1e-3) -> torch.Tensor:
    """beta_t = m_t + (1 - m_t - 1e-5) / n_t, n_t evenly spaced from T down to 2, m_t = 1e-6 (+ step1_beta at
    t = 1): each step destroys a fraction ~1/(T - t + 2) of the remaining signal (Sohl-Dickstein et al. 2015,
    reference code `generate_beta_arr`, whose sigmoid(logit(1/n_t) + perturbation) is 1/n_t at zero perturbation)."""
    min_beta = torch.full((timesteps,), 1e-6, dtype=torch.float64)
    min_beta[0] += step1_beta
    return min_beta + (1 - min_beta - 1e-5) / torch.linspace(timesteps, 2, timesteps, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 while sqrt(alpha_bar_1) is kept
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1)."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def beta_schedule(
    name: str,
    timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """The betas of the named schedule, float64, shape (timesteps,)."""
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name={name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ConfigError(f"schedule.timesteps={timesteps} must be an integer >= 1")
    if name == "cosine":
        betas = cosine_betas(timesteps, s=cosine_s)
    elif name == "dpm2015":  # beta_start is the floor on beta_1 (the reference code's step1_beta)
        betas = dpm2015_betas(timesteps, step1_beta=beta_start)
    else:
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(
                f"schedule.beta_start={beta_start}, schedule.beta_end={beta_end}: need 0 < beta_start <= beta_end < 1"
            )
        betas = {"linear": linear_betas, "quadratic": quadratic_betas, "sigmoid": sigmoid_betas}[name](
            timesteps, beta_start, beta_end
        )
    if zero_terminal_snr:
        if timesteps < 2:
            raise ConfigError("schedule.zero_terminal_snr=true needs schedule.timesteps >= 2")
        betas = rescale_zero_terminal_snr(betas)
    return betas


def nonzero_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """alpha_bar with 0, the end of a zero-terminal-SNR schedule (Lin et al. 2024), replaced by 2^-24 so that sigma
    and lambda stay finite there, as diffusers' rescale_betas_zero_snr does; every other value kept, however small."""
    return torch.where(alpha_bar == 0, torch.full_like(alpha_bar, 2.0**-24), alpha_bar)


def log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log sigma_t = 0.5 log((1 - alpha_bar_t) / alpha_bar_t), finite at a zero terminal SNR (`nonzero_alpha_bar`)."""
    alphas_cumprod = nonzero_alpha_bar(alphas_cumprod.to(torch.float64))
    return 0.5 * (torch.log1p(-alphas_cumprod) - alphas_cumprod.log())
