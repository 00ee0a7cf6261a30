"""The EMA update: theta_ema <- d theta_ema + (1 - d) theta, with the warmup d_n = min(decay, (1 + n) / (10 + n))."""

import pytest
import torch

from diffusion_lab.callbacks.ema import EMA
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
