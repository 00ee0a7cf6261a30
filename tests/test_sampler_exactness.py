"""The pitfalls other libraries' users keep reporting, decided here: where each spacing starts and ends, the
full chain is Ho et al.'s exactly, DDIM ends at alpha_bar = 1, DDIM eta = 1 is DDPM, zero-terminal-SNR works."""

import pytest
import torch
from toy_models import TinyNet, run_sampler

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.sampling import SAMPLERS, SamplerError
from diffusion_lab.diffusion.timesteps import SPACINGS, timesteps_for
from diffusion_lab.utils.errors import ConfigError

T = 20


def process_and_net(objective="eps", **schedule):
    process = GaussianDiffusion(beta_schedule("linear", T, beta_start=1e-3, beta_end=0.3, **schedule), objective=objective)
    noise = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return process, TinyNet(channels=2), noise


@pytest.mark.parametrize("spacing", SPACINGS)
def test_spacing_is_descending_inside_the_schedule(spacing):
    process = GaussianDiffusion(beta_schedule("linear", T))
    for steps in (2, 3, 7, T):
        t = timesteps_for(spacing, process.alphas_cumprod, steps)
        assert len(t) == steps and (t[:-1] > t[1:]).all() and t.min() >= 0 and t.max() <= T - 1


def test_spacing_endpoints():
    """uniform, quadratic and karras span T-1..0; trailing starts at T-1; leading ends at 0 (Lin et al. Table 2)."""
    alphas_cumprod = GaussianDiffusion(beta_schedule("linear", T)).alphas_cumprod
    for spacing in ("uniform", "quadratic", "karras"):
        t = timesteps_for(spacing, alphas_cumprod, 5)
        assert t[0] == T - 1 and t[-1] == 0, spacing
    assert timesteps_for("trailing", alphas_cumprod, 5).tolist() == [19, 15, 11, 7, 3]
    assert timesteps_for("leading", alphas_cumprod, 5).tolist() == [16, 12, 8, 4, 0]


@pytest.mark.parametrize("spacing", ["uniform", "leading", "trailing"])
def test_all_steps_visit_every_timestep(spacing):
    alphas_cumprod = GaussianDiffusion(beta_schedule("linear", T)).alphas_cumprod
    assert timesteps_for(spacing, alphas_cumprod, T).tolist() == list(range(T - 1, -1, -1))


def test_karras_timesteps_reach_the_karras_sigmas():
    """path.alpha_bar on the fractional timesteps gives Karras et al.'s sigmas (Eq. 5, rho = 7)."""
    process = GaussianDiffusion(beta_schedule("linear", 1000))
    t = timesteps_for("karras", process.alphas_cumprod, 10)
    sigma = ((1 - process.path.alpha_bar(t)) / process.path.alpha_bar(t)).sqrt()
    sigmas_table = ((1 - process.alphas_cumprod) / process.alphas_cumprod).sqrt()
    lo, hi = sigmas_table[0] ** (1 / 7), sigmas_table[-1] ** (1 / 7)
    expected = (hi + torch.linspace(0, 1, 10, dtype=torch.float64) * (lo - hi)) ** 7
    assert torch.allclose(sigma, expected, rtol=1e-10)


def test_full_chain_is_ho_et_al_ancestral_sampling():
    """steps = T: x_{t-1} = mu_tilde(x_t, x0_hat) + sqrt(beta_tilde_t) z, from the process's own tables."""
    process, net, noise = process_and_net()
    ours = run_sampler(Sampler("ddpm", T, "uniform", variance="beta_tilde"), process, process.denoiser(net), noise,
                       generator=torch.Generator().manual_seed(1))
    generator, x = torch.Generator().manual_seed(1), noise
    for t in reversed(range(T)):
        tt = torch.full((2,), t)
        x0 = process.to_x0_eps(x, process.sqrt_alphas_cumprod[t], process.sqrt_one_minus_alphas_cumprod[t], net(x, tt.double()))[0].clamp(-1, 1)
        mean, variance, _ = process.q_posterior(x0, x, tt)
        x = mean + (variance.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype) if t > 0 else 0)
    assert (ours - x).abs().max() < 1e-10


@pytest.mark.parametrize("spacing", ["uniform", "leading", "trailing", "quadratic", "karras"])
def test_ddim_last_step_goes_to_alpha_bar_one(spacing):
    """The last step returns x0_hat itself (alpha_bar = 1), not a point at alpha_bar_0 of the table."""
    process, net, noise = process_and_net()
    sampler = Sampler("ddim", 5, spacing)
    alphas, sigmas = process.sampling_grid(sampler.steps, sampler.spacing)
    assert alphas[-1] == 1 and sigmas[-1] == 0
    steps = []
    x = run_sampler(sampler, process, process.denoiser(net), noise, callback=steps.append)
    assert torch.equal(x, steps[-1]["x0"])


def test_ddim_eta_one_full_chain_is_ddpm_beta_tilde():
    process, net, noise = process_and_net()
    ddim = run_sampler(Sampler("ddim", T, "uniform", eta=1.0), process, process.denoiser(net), noise,
                       generator=torch.Generator().manual_seed(3))
    ddpm = run_sampler(Sampler("ddpm", T, "uniform", variance="beta_tilde"), process, process.denoiser(net), noise,
                       generator=torch.Generator().manual_seed(3))
    assert (ddim - ddpm).abs().max() < 1e-10


@pytest.mark.parametrize("algorithm", list(SAMPLERS))
@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_zero_terminal_snr_samples_are_finite(algorithm, spacing):
    """alpha_bar_T = 0 (Lin et al. 2024) with v-prediction: every sampler starts from pure noise without
    dividing by zero."""
    process, net, noise = process_and_net(objective="v", zero_terminal_snr=True)
    assert process.alphas_cumprod[-1] == 0
    if algorithm in ("edm", "flow_map"):  # edm steps in sigma / alpha, infinite at alpha = 0; DDPM learns no flow map
        with pytest.raises(SamplerError, match=f"sampler={algorithm}"):
            run_sampler(Sampler(algorithm, 6, spacing), process, process.denoiser(net), noise)
        return
    x = run_sampler(Sampler(algorithm, 6, spacing), process, process.denoiser(net), noise, generator=torch.Generator())
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("algorithm", list(SAMPLERS))
def test_zero_terminal_snr_at_300_steps_is_finite(algorithm, one_thread):
    """Linear T=1000, 300 trailing steps: the alpha_bar visited after the terminal 0 is 3.9e-8, below the 2^-24
    that the log-SNR solvers put in for the 0 (alpha = 2^-12), so sigma rises on their first step; every sampler stays
    finite."""
    process = GaussianDiffusion(beta_schedule("linear", 1000, zero_terminal_snr=True), objective="v")
    _, net, noise = process_and_net()
    if algorithm in ("edm", "flow_map"):
        pytest.skip(f"sampler={algorithm} refuses this process (test_zero_terminal_snr_samples_are_finite)")
    x = run_sampler(Sampler(algorithm, 300, "trailing"), process, process.denoiser(net), noise,
                    generator=torch.Generator())
    assert torch.isfinite(x).all()


def test_bad_options_raise_config_error():
    process, _, _ = process_and_net()
    with pytest.raises(ConfigError, match="sampler.order"):
        run_sampler(Sampler("dpm_solver_pp", 5, order=4), process, lambda x, alpha, sigma: None, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ConfigError, match="sampler.spacing"):
        process.sampling_grid(5, "cubic")
    with pytest.raises(ConfigError, match="not an option"):
        Sampler("heun", 5, eta=1.0)
