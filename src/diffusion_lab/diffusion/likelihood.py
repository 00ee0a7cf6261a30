"""Gaussian log-likelihood terms of the variational bound, elementwise, in nats (Ho et al. 2020; Nichol & Dhariwal
2021)."""

import torch
from torch import Tensor


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (-1 + log_var2 - log_var1 + (log_var1 - log_var2).exp() + (mean1 - mean2) ** 2 * (-log_var2).exp())


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log of the N(mean, e^log_var) mass of the 8-bit bin [x - 1/255, x + 1/255] of x in [-1, 1], the outer bins
    reaching to -inf and +inf (Ho et al. 2020, Eq. 13), elementwise, in nats."""
    inv_std = (-0.5 * log_var).exp()
    upper, lower = (x - mean + 1 / 255) * inv_std, (x - mean - 1 / 255) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin))
