"""Flow matching and EDM against closed forms and diffusers; every sampler on every process; bad input in one line.

Gaussian data x_0 ~ N(MEAN, STD^2) has the exact denoiser of `toy_models.gaussian_denoiser` at any (alpha, sigma), and
its probability-flow ODE keeps (x - alpha MEAN) / sqrt(alpha^2 STD^2 + sigma^2) constant."""

import math

import diffusers
import pytest
import torch
from toy_models import TinyNet, gaussian_denoiser, gaussian_ode_solution

from diffusion_lab.diffusion.edm import EDM
from diffusion_lab.diffusion.flow_matching import FlowMatching
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.sampling import SAMPLERS, SamplerError
from diffusion_lab.utils.errors import ConfigError

MEAN, STD = 0.3, 0.5
PROCESSES = {
    "ddpm": lambda: GaussianDiffusion(beta_schedule("linear", 1000), objective="v"),
    "flow_matching": lambda: FlowMatching(shift=3.0),
    "edm": lambda: EDM(),
}
SPACING = {"ddpm": "karras", "flow_matching": "uniform", "edm": "karras"}


def noise(n: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def error_at_last_noisy_point(sampler: Sampler, process) -> float:
    """Max error of x at the last noisy point (before the final jump to x0_hat, exact only as sigma -> 0) against
    the exact ODE solution, from x_T = sqrt(alpha^2 + sigma^2) noise as DiffusionModel.sample starts."""
    alphas, sigmas = process.sampling_grid(sampler.steps, sampler.spacing)
    x_T = noise() * (alphas[0] ** 2 + sigmas[0] ** 2).sqrt()
    xs = []
    sampler(gaussian_denoiser(MEAN, STD), x_T, alphas, sigmas, callback=lambda info: xs.append(info["x"]))
    exact = gaussian_ode_solution(x_T, alphas[0], sigmas[0], alphas[-2], sigmas[-2], MEAN, STD)
    return (xs[-2] - exact).abs().max().item()


@pytest.mark.parametrize("process_name, algorithm, order", [
    ("flow_matching", "euler", 1), ("flow_matching", "heun", 2),
    ("edm", "euler", 1), ("edm", "heun", 2), ("edm", "dpm_solver_pp", 2), ("edm", "unipc", 3),
])
def test_ode_samplers_converge_at_their_order(process_name, algorithm, order):
    """Doubling the steps divides the error by about 2^order, on flow matching (from alpha = 0, in the
    rectified-flow frame; no time shift, whose error is not yet asymptotic at these steps) and EDM. The log-SNR
    multistep solvers on flow matching start at lambda(alpha = 2^-12) and measure order ~1.7 (README)."""
    process = FlowMatching() if process_name == "flow_matching" else EDM()
    options = {"lower_order_final": False} if algorithm in ("dpm_solver_pp", "unipc") else {}
    errors = [error_at_last_noisy_point(Sampler(algorithm, n, SPACING[process_name], **options), process)
              for n in (33, 65, 129)]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(o - order) < 0.35 for o in observed), (errors, observed)


def test_flow_matching_euler_step_is_x_plus_dt_velocity():
    """On x_t = (1 - t) x_0 + t eps the Euler step is x + (t_next - t) v with v = eps - x_0 (Liu et al. 2023)."""
    process = FlowMatching(shift=2.0)
    alphas, sigmas = process.sampling_grid(3)
    x = noise(8)
    denoise = gaussian_denoiser(MEAN, STD)
    steps = []
    SAMPLERS["euler"](denoise, x, alphas, sigmas, callback=steps.append)
    out = denoise(x, alphas[0], sigmas[0])
    assert torch.allclose(steps[0]["x"], x + (sigmas[1] - sigmas[0]) * (out.eps - out.x0), atol=1e-12)


def test_adaptive_solver_is_within_its_tolerance():
    """dopri5 on flow matching ends near the exact ODE's x_0 estimate: torchdiffeq bounds the local (per-step, RMS
    over the batch) error by the tolerance, so the global RMS error is within (steps taken) x tolerance, falls with
    it, and costs more evaluations at the tighter one, which the sampler counts."""
    process = FlowMatching()
    alphas, sigmas = process.sampling_grid(1000)
    x_T = noise()
    at_end = gaussian_ode_solution(x_T, alphas[0], sigmas[0], alphas[-2], sigmas[-2], MEAN, STD)
    exact = gaussian_denoiser(MEAN, STD)(at_end, alphas[-2], sigmas[-2]).x0
    errors, evaluations = [], []
    for tolerance in (1e-5, 1e-7):
        sampler = Sampler("dopri5", 1000, rtol=tolerance, atol=tolerance)
        x0 = sampler(gaussian_denoiser(MEAN, STD), x_T, alphas, sigmas)
        errors.append((x0 - exact).pow(2).mean().sqrt().item())
        evaluations.append(sampler.evaluations_used)
        assert errors[-1] < 3 * sampler.evaluations_used / 6 * tolerance  # 6 evaluations a step; 3: error growth
    assert errors[1] < errors[0] / 5 and evaluations[0] < evaluations[1] < 1000


def test_adaptive_solver_over_its_evaluation_cap_is_an_error():
    process = FlowMatching()
    alphas, sigmas = process.sampling_grid(1000)
    with pytest.raises(SamplerError, match="max_evals=5"):
        Sampler("dopri5", 1000, rtol=1e-9, atol=1e-9, max_evals=5)(gaussian_denoiser(MEAN, STD), noise(), alphas, sigmas)


def test_edm_preconditioning_matches_the_papers_formulas():
    """Karras et al. 2022, Table 1: at sigma = sigma_data, c_skip = 1/2, c_out = sigma_data / sqrt 2,
    c_in = 1 / (sigma_data sqrt 2); in general c_skip + c_out^2 / sigma_data^2 = 1, lambda = 1 / c_out^2,
    c_noise = ln(sigma) / 4."""
    process = EDM(sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = process.preconditioning(torch.tensor([0.5], dtype=torch.float64))
    assert torch.allclose(torch.cat([c_skip, c_out, c_in]), torch.tensor([0.5, 0.5 / 2**0.5, 1 / (0.5 * 2**0.5)],
                                                                          dtype=torch.float64))
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = process.preconditioning(sigma)
    assert torch.allclose(c_skip + c_out**2 / 0.25, torch.ones_like(sigma))
    assert torch.allclose(c_in, 1 / (sigma**2 + 0.25).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    assert torch.allclose(process.loss_weight(sigma), 1 / c_out**2)


class IdealF(torch.nn.Module):
    """The F for which D(x; sigma) = x_0 of one fixed batch: F = (x_0 - c_skip x) / c_out, recovered from the net's
    inputs c_in x and c_noise."""

    num_classes, self_condition = None, False

    def __init__(self, x0: torch.Tensor, process: EDM):
        super().__init__()
        self.x0, self.process, self.weight = x0, process, torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_in, c_noise, **kwargs):
        sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = self.process.preconditioning(sigma)
        return (self.x0 - c_skip * x_in / c_in) / c_out


def test_edm_training_loss_is_zero_for_the_ideal_network_and_weighted_as_the_paper():
    process = EDM()
    x0 = torch.randn(64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss, u = process.training_losses(IdealF(x0, process), x0, torch.Generator().manual_seed(2))
    assert loss.abs().max() < 1e-10 and ((0 < u) & (u < 1)).all()
    # a network off by delta: lambda(sigma) c_out^2 delta^2 = delta^2 for every sigma (unit weight on F's target)
    off = IdealF(x0, process)
    off.forward = lambda x_in, c_noise, **kw: IdealF.forward(off, x_in, c_noise) + 0.1
    loss, _ = process.training_losses(off, x0, torch.Generator().manual_seed(2))
    assert torch.allclose(loss, torch.full_like(loss, 0.01), atol=1e-6)


@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_edm_sampler_with_the_exact_denoiser_recovers_mean_and_variance(churn):
    """Alg. 2 from x_T ~ N(0, sigma_max^2 + 1) with the exact denoiser of N(MEAN, STD^2) data: the samples' mean
    within 4 standard errors, their std within 3%."""
    process = EDM()
    alphas, sigmas = process.sampling_grid(64)
    sampler = Sampler("edm", 64, "karras", S_churn=churn, S_min=0.05, S_max=50.0, S_noise=1.003)
    x_T = noise(20000, seed=3) * (1 + sigmas[0] ** 2).sqrt()
    x0 = sampler(gaussian_denoiser(MEAN, STD), x_T, alphas, sigmas, generator=torch.Generator().manual_seed(4))
    assert abs(x0.mean().item() - MEAN) < 4 * STD / 20000**0.5
    assert abs(x0.std().item() / STD - 1) < 0.03


@pytest.mark.parametrize("process_name", list(PROCESSES))
@pytest.mark.parametrize("algorithm", ["ddpm", "ddim", "dpm_solver_pp", "unipc", "heun", "euler", "euler_ancestral"])
def test_every_sampler_runs_on_every_process_to_the_data(process_name, algorithm):
    """The same sampler functions, unchanged, on DDPM, flow matching and EDM: with the exact denoiser, 200 steps land
    on N(MEAN, STD^2) (mean within 5 standard errors, std within 5%)."""
    process = PROCESSES[process_name]()
    sampler = Sampler(algorithm, 200, SPACING[process_name])
    alphas, sigmas = process.sampling_grid(200, SPACING[process_name])
    x_T = noise(8000, seed=5) * (alphas[0] ** 2 + sigmas[0] ** 2).sqrt()
    x0 = sampler(gaussian_denoiser(MEAN, STD), x_T, alphas, sigmas, generator=torch.Generator().manual_seed(6))
    assert abs(x0.mean().item() - MEAN) < 5 * STD / 8000**0.5
    assert abs(x0.std().item() / STD - 1) < 0.05


# diffusers, on identical inputs, in float64 -----------------------------------------------------------------------


def diffusers_loop(scheduler, model_output, x):
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model_output(x_in, t), t, x).prev_sample
    return x


def test_flow_matching_euler_matches_diffusers_flow_match_euler():
    net = TinyNet(channels=2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(12)
    scheduler.sigmas = scheduler.sigmas.double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = diffusers_loop(scheduler, lambda x_in, t: net(x_in, t.double().expand(len(x_in))), x.clone())
    sigmas = scheduler.sigmas.double()
    ours = Sampler("euler", 12)(FlowMatching().denoiser(net), x, 1 - sigmas, sigmas)
    assert (ours - expected).abs().max() < 1e-5  # diffusers steps in float32


@pytest.mark.parametrize("cls, algorithm, options", [
    (diffusers.EDMEulerScheduler, "euler", {}),
    (diffusers.EDMDPMSolverMultistepScheduler, "dpm_solver_pp", {"order": 2}),
])
def test_edm_samplers_match_diffusers_edm_schedulers(cls, algorithm, options):
    net = TinyNet(channels=2)
    process = EDM(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    scheduler = cls(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
    scheduler.set_timesteps(10)
    scheduler.sigmas = scheduler.sigmas.double()
    alphas, sigmas = process.sampling_grid(10)
    assert torch.allclose(sigmas, scheduler.sigmas, rtol=1e-6)
    noise_ = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_T = noise_ * scheduler.init_noise_sigma
    expected = diffusers_loop(scheduler, lambda x_in, t: net(x_in, t.double().expand(len(x_in))), x_T.clone())
    model = DiffusionModel(net, process, (2, 4, 4))
    ours = Sampler(algorithm, 10, "karras", **options)(model.denoiser(), x_T, scheduler.sigmas * 0 + 1, scheduler.sigmas)
    assert (ours - expected).abs().max() < 1e-5
    assert torch.allclose(model.sample(noise_.float(), Sampler(algorithm, 10, "karras", **options)).double(), ours,
                          atol=1e-4)  # the model object starts from sqrt(1 + sigma_max^2) noise, as diffusers


# bad input: one clear line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, fragment", [
    (lambda: EDM(sigma_min=1.0, sigma_max=1.0), "sigma_min=1.0, process.sigma_max=1.0"),
    (lambda: FlowMatching(logit_std=0.0), "process.logit_std=0.0 must be > 0"),
    (lambda: FlowMatching(shift=-1.0), "process.shift=-1.0 must be > 0"),
    (lambda: FlowMatching(time_sampling="cosine"), "process.time_sampling='cosine'"),
    (lambda: FlowMatching().sampling_grid(10, "trailing"), "not a spacing of process flow_matching"),
    (lambda: Sampler("edm", 10).check(*FlowMatching().sampling_grid(10)), "sampler=edm"),
])
def test_bad_process_input_is_one_config_error_line(build, fragment):
    with pytest.raises(ConfigError) as error:
        build()
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_dpm_solver_pp_sde_matches_diffusers_sde_dpmsolver_pp():
    """sampler.sde=true against DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") on a DDPM table, the
    same x_T and the same noise at every step (diffusers' variance_noise), to diffusers' float32 steps."""
    process = GaussianDiffusion(beta_schedule("linear", 40))
    net = TinyNet(channels=2)
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=40, trained_betas=process.betas.numpy(),
                                                      algorithm_type="sde-dpmsolver++", solver_order=2,
                                                      timestep_spacing="trailing")
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    scheduler.set_timesteps(8)
    x_T = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noises = list(torch.randn(8, 3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    x = x_T.clone()
    with torch.no_grad():
        for t, z in zip(scheduler.timesteps, noises):
            x = scheduler.step(net(x, t.double().expand(3)), t, x, variance_noise=z).prev_sample
    drawn = iter(noises)
    ours = SAMPLERS["dpm_solver_pp"](process.denoiser(net, clip_denoised=False), x_T,
                                     *process.sampling_grid(8, "trailing"), order=2, sde=True,
                                     noise_sampler=lambda like: next(drawn))
    assert (ours - x).abs().max() < 1e-5
