"""The Gaussian paths (diffusion.paths) against their closed forms: the conversions between x_0, eps, v and the
velocity round-trip in float64 on every path, the derivatives of alpha and sigma match finite differences, and
`locate` maps a noise level to the path's point of the same signal-to-noise ratio."""

import pytest
import torch

from diffusion_lab.diffusion import paths
from diffusion_lab.diffusion.schedules import beta_schedule

PATHS = {
    "ddpm": (paths.DiscreteVPPath(torch.cumprod(1 - beta_schedule("linear", 50), 0)), torch.tensor([0.0, 3.0, 17.25, 42.5, 49.0])),
    "edm": (paths.VEPath(), torch.tensor([0.002, 0.3, 1.0, 7.5, 80.0])),
    "flow_matching": (paths.RectifiedFlowPath(), torch.tensor([0.0, 0.1, 0.5, 0.73, 0.99])),
}


def draws(t):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, len(t), 2, 3, 3, dtype=torch.float64, generator=generator).unbind(0)
    return x0, eps


@pytest.mark.parametrize("name", PATHS)
def test_conversions_round_trip_in_float64(name):
    path, t = PATHS[name]
    t = t.double()
    x0, eps = draws(t)
    alpha, sigma, d_alpha, d_sigma = (paths.broadcast(f(t), x0) for f in (path.alpha, path.sigma, path.d_alpha, path.d_sigma))
    x = path.sample(x0, t, eps)
    assert torch.allclose(x, alpha * x0 + sigma * eps, rtol=0, atol=0)
    noisy = (sigma > 0).reshape(-1)
    assert torch.allclose(paths.eps_from_x0(x, alpha, sigma, x0)[noisy], eps[noisy], rtol=1e-12, atol=1e-12)
    assert torch.allclose(paths.x0_from_eps(x, alpha, sigma, eps), x0, rtol=1e-12, atol=1e-10)
    velocity = paths.velocity_from_x0_eps(d_alpha, d_sigma, x0, eps)
    for got, want in zip(paths.x0_eps_from_velocity(x, alpha, sigma, d_alpha, d_sigma, velocity), (x0, eps)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    if name == "ddpm":  # v is the variance-preserving paths' parameterisation (Salimans & Ho 2022)
        v = paths.v_from_x0_eps(alpha, sigma, x0, eps)
        for got, want in zip(paths.x0_eps_from_v(x, alpha, sigma, v), (x0, eps)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", PATHS)
def test_derivatives_match_finite_differences(name):
    path, t = PATHS[name]
    t = t.double()
    if name == "ddpm":  # piecewise in t: differentiate inside a step of the table
        t = torch.tensor([0.5, 3.25, 17.5, 42.75, 48.5], dtype=torch.float64)
    else:
        t = t.clamp(1e-3, t.max() - 1e-3)
    h = 1e-6
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        finite = (f(t + h) - f(t - h)) / (2 * h)
        assert torch.allclose(df(t), finite, rtol=1e-6, atol=1e-8), (f.__name__, df(t), finite)


@pytest.mark.parametrize("name", PATHS)
def test_locate_finds_the_point_of_the_same_snr(name):
    """x at (c alpha_t, c sigma_t) for any scale c > 0 is located at t with scale c."""
    path, t = PATHS[name]
    t = t.double()[1:-1]
    c = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    found, scale = path.locate(c * path.alpha(t), c * path.sigma(t))
    assert torch.allclose(found, t, rtol=1e-9) and torch.allclose(scale, c, rtol=1e-12)
