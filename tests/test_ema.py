"""The EMA update: theta_ema <- d theta_ema + (1 - d) theta, with the warmup d_n = min(decay, (1 + n) / (10 + n)), or
the power-function profile of a sigma_rel (EDM2)."""

import pytest
import torch

from diffusion_lab.callbacks.ema import EMA
from diffusion_lab.ema.power_ema import sigma_rel_to_gamma
from diffusion_lab.utils.errors import ConfigError


@pytest.mark.parametrize("warmup", [True, False])
def test_update_follows_the_formula(warmup):
    ema = EMA(decay=0.9, warmup=warmup)
    averaged, current = [torch.zeros(3), torch.zeros(2, dtype=torch.float64)], [torch.ones(3), torch.ones(2, dtype=torch.float64)]
    expected = 0.0
    for n in range(6):
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        expected = d * expected + (1 - d)
        for a, c in zip(averaged, current):  # AveragedModel calls once per (device, dtype) group
            ema._ema_update([a], [c], torch.tensor(n))
        assert torch.allclose(averaged[0], torch.full((3,), expected), atol=1e-6)
        assert torch.allclose(averaged[1], torch.full((2,), expected, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.15])
def test_a_sigma_rel_averages_the_history_with_the_power_function_profile(sigma_rel):
    """After t updates with weights theta_1..theta_t the average is sum_tau w_tau theta_tau with the profile's mass
    per update, w_tau = (tau^(gamma + 1) - (tau - 1)^(gamma + 1)) / t^(gamma + 1) (EDM2 Eq. 2 integrated)."""
    ema, gamma = EMA(decay=None, sigma_rel=sigma_rel), sigma_rel_to_gamma(sigma_rel)
    history = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    averaged = [history[0].clone()]  # AveragedModel copies the first weights, then calls the update with n = 1, 2, ..
    for n, theta in enumerate(history[1:], start=1):
        ema._ema_update(averaged, [theta], torch.tensor(n))
    t = torch.arange(1, len(history) + 1, dtype=torch.float64)
    weights = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / len(history) ** (gamma + 1)
    torch.testing.assert_close(averaged[0], weights @ history)


def test_integer_buffers_are_copied_not_averaged():
    ema = EMA(decay=0.5)
    averaged, current = [torch.tensor([3])], [torch.tensor([7])]
    ema._ema_update(averaged, current, torch.tensor(4))
    assert averaged[0].item() == 7


def test_bad_settings():
    with pytest.raises(ConfigError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ConfigError, match="update_every_n_steps"):
        EMA(update_every_n_steps=0)
    with pytest.raises(ConfigError, match="give one of them"):
        EMA(decay=0.999, sigma_rel=0.05)
    with pytest.raises(ConfigError, match="give one of them"):
        EMA(decay=None)
    with pytest.raises(ConfigError, match=r"callbacks.ema.sigma_rel=0.3 must be in"):
        EMA(decay=None, sigma_rel=0.3)
    with pytest.raises(ConfigError, match="warmup=false has no meaning"):
        EMA(decay=None, sigma_rel=0.05, warmup=False)
