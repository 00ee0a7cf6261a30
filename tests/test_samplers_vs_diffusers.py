"""Each sampler against the diffusers scheduler with the same discretization: identical schedule, inputs, fixed
random network and noise; max abs difference < 1e-5 in float64, for one step and a short full trajectory."""

import inspect

import diffusers
import pytest
import torch
from toy_models import TinyNet, run_sampler

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import beta_schedule
from diffusion_lab.samplers import Sampler
from diffusion_lab.diffusion.timesteps import timesteps_for

T, STEPS, TOL = 40, 8, 1e-5  # T % STEPS == 0: diffusers DDIM takes prev = t - T // STEPS, not the next listed step
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction"}


def make_scheduler(cls, process: GaussianDiffusion, **config):
    """A diffusers scheduler over our betas, with its float32 tables replaced by our float64 ones (and, with
    rescale_betas_zero_snr, alpha_bar_T = 0 replaced by 2^-24 as its __init__ does)."""
    scheduler = cls(num_train_timesteps=process.num_timesteps, trained_betas=process.betas.numpy(), **config)
    scheduler.betas = process.betas.clone()
    scheduler.alphas = 1 - process.betas
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    if config.get("rescale_betas_zero_snr"):
        scheduler.alphas_cumprod[-1] = 2.0**-24
    return scheduler


def run_diffusers(scheduler, net, process, noise, steps, generator, first_only=False, **step_kwargs):
    """The standard diffusers loop, started from our x_T = noise (in the scheduler's scaling)."""
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas"):
        scheduler.sigmas = scheduler.sigmas.double()
    # our x_T = noise is x / sqrt(alpha_bar) in the sigma (VE) samplers' variable
    sigma_max = scheduler.sigmas[0].double() if hasattr(scheduler, "sigmas") else None
    x = noise * (1 + sigma_max**2).sqrt() if scheduler.init_noise_sigma != 1 else noise.clone()
    sde = str(getattr(scheduler.config, "algorithm_type", "")).startswith("sde")
    for i, t in enumerate(scheduler.timesteps):
        model_output = net(scheduler.scale_model_input(x, t), t.double().expand(x.shape[0]))
        if sde:  # diffusers draws its SDE noise in float32: give it our float64 draw (none on the last step, to sigma 0)
            if i < len(scheduler.timesteps) - 1:
                step_kwargs["variance_noise"] = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        elif "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = generator
        x = scheduler.step(model_output, t, x, **step_kwargs).prev_sample
        if first_only and getattr(scheduler, "state_in_first_order", True):  # Heun: after its 2nd evaluation
            return x
    return x


def run_ours(sampler, net, process, noise, generator, clip_denoised, first_only=False):
    first = []
    callback = (lambda info: first.append(info["x"])) if first_only else None
    x = run_sampler(sampler, process, process.denoiser(net, clip_denoised=clip_denoised), noise, callback=callback,
                    generator=generator)
    return first[0] if first_only else x


def sigma_scaled_first_step(sampler, x, process):
    """The VE samplers' state after one step is x / alpha = x / sqrt(alpha_bar) of ours."""
    alphas, _ = process.sampling_grid(sampler.steps, sampler.spacing)
    return x / alphas[1]


CASES = [
    # (name, our sampler, diffusers class and config, step kwargs, clip)
    ("ddpm_beta_tilde", Sampler("ddpm", STEPS, "uniform", variance="beta_tilde"), diffusers.DDPMScheduler,
     {"variance_type": "fixed_small", "timestep_spacing": "linspace"}, {}, True),
    ("ddpm_beta", Sampler("ddpm", STEPS, "uniform", variance="beta"), diffusers.DDPMScheduler,
     {"variance_type": "fixed_large", "timestep_spacing": "linspace", "clip_sample": False}, {}, False),
    ("ddim_leading", Sampler("ddim", STEPS, "leading"), diffusers.DDIMScheduler,
     {"timestep_spacing": "leading"}, {"eta": 0.0, "use_clipped_model_output": True}, True),
    ("ddim_trailing_eta", Sampler("ddim", STEPS, "trailing", eta=0.7), diffusers.DDIMScheduler,
     {"timestep_spacing": "trailing"}, {"eta": 0.7, "use_clipped_model_output": True}, True),
    ("dpm_solver_pp_2", Sampler("dpm_solver_pp", STEPS, "trailing", order=2), diffusers.DPMSolverMultistepScheduler,
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"}, {}, False),
    ("dpm_solver_pp_3", Sampler("dpm_solver_pp", STEPS, "trailing", order=3), diffusers.DPMSolverMultistepScheduler,
     {"algorithm_type": "dpmsolver++", "solver_order": 3, "timestep_spacing": "trailing"}, {}, False),
    ("dpm_solver_pp_3_no_lof", Sampler("dpm_solver_pp", STEPS, "trailing", order=3, lower_order_final=False),
     diffusers.DPMSolverMultistepScheduler,
     {"algorithm_type": "dpmsolver++", "solver_order": 3, "timestep_spacing": "trailing",
      "lower_order_final": False}, {}, False),
    ("unipc_2", Sampler("unipc", STEPS, "trailing", order=2), diffusers.UniPCMultistepScheduler,
     {"solver_type": "bh2", "solver_order": 2, "timestep_spacing": "trailing"}, {}, False),
    ("unipc_3", Sampler("unipc", STEPS, "trailing", order=3), diffusers.UniPCMultistepScheduler,
     {"solver_type": "bh2", "solver_order": 3, "timestep_spacing": "trailing"}, {}, False),
    ("dpm_solver_pp_2_sde", Sampler("dpm_solver_pp", STEPS, "trailing", order=2, sde=True),
     diffusers.DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing"}, {}, False),
    ("heun_karras", Sampler("heun", STEPS, "karras"), diffusers.HeunDiscreteScheduler,
     {"use_karras_sigmas": True, "timestep_spacing": "linspace"}, {}, False),
    ("euler_leading", Sampler("euler", STEPS, "leading"), diffusers.EulerDiscreteScheduler,
     {"timestep_spacing": "leading"}, {}, False),
    ("euler_trailing", Sampler("euler", STEPS, "trailing"), diffusers.EulerDiscreteScheduler,
     {"timestep_spacing": "trailing"}, {}, False),
    ("euler_ancestral_leading", Sampler("euler_ancestral", STEPS, "leading"), diffusers.EulerAncestralDiscreteScheduler,
     {"timestep_spacing": "leading"}, {}, False),
    ("euler_ancestral_trailing", Sampler("euler_ancestral", STEPS, "trailing"),
     diffusers.EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}, {}, False),
]


@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize("name, sampler, cls, config, step_kwargs, clip", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(name, sampler, cls, config, step_kwargs, clip, objective):
    process = GaussianDiffusion(beta_schedule("linear", T, beta_start=1e-3, beta_end=0.2), objective=objective)
    net = TinyNet(channels=2)
    noise = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    config = {"prediction_type": PREDICTION_TYPE[objective], **config}
    if "clip_sample" in cls.__init__.__code__.co_varnames and "clip_sample" not in config:
        config["clip_sample"] = clip
    sigma_space = cls in (diffusers.HeunDiscreteScheduler, diffusers.EulerDiscreteScheduler,
                          diffusers.EulerAncestralDiscreteScheduler)
    for first_only in (True, False):
        theirs = run_diffusers(make_scheduler(cls, process, **config), net, process, noise, STEPS,
                               torch.Generator().manual_seed(2), first_only=first_only, **step_kwargs)
        ours = run_ours(sampler, net, process, noise, torch.Generator().manual_seed(2), clip, first_only=first_only)
        if first_only and sigma_space:
            ours = sigma_scaled_first_step(sampler, ours, process)
        assert (ours - theirs).abs().max() < TOL, (first_only, (ours - theirs).abs().max().item())


def test_learned_variance_matches_diffusers_learned_range():
    """DDPM with the network's interpolated variance (Improved DDPM) over respaced steps."""
    process = GaussianDiffusion(beta_schedule("cosine", T), loss_type="hybrid")
    net = TinyNet(channels=2, out_channels=process.output_channels(2))
    noise = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scheduler = make_scheduler(diffusers.DDPMScheduler, process, variance_type="learned_range",
                               timestep_spacing="linspace", clip_sample=True)
    theirs = run_diffusers(scheduler, net, process, noise, STEPS, torch.Generator().manual_seed(2))
    ours = run_ours(Sampler("ddpm", STEPS, "uniform"), net, process, noise, torch.Generator().manual_seed(2), True)
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.parametrize("algorithm, cls", [("dpm_solver_pp", diffusers.DPMSolverMultistepScheduler),
                                            ("unipc", diffusers.UniPCMultistepScheduler)])
def test_zero_terminal_snr_at_300_steps_matches_diffusers(algorithm, cls, one_thread):
    """Linear T=1000, zero terminal SNR, v, 300 trailing steps: the second visited alpha_bar (3.9e-8) is below
    2^-24, so only the terminal 0 may be replaced (diffusers' rescale_betas_zero_snr), or h = 0 and the solvers
    divide by it. Finite, and diffusers' trajectory."""
    process = GaussianDiffusion(beta_schedule("linear", 1000, zero_terminal_snr=True), objective="v")
    net = TinyNet(channels=2)
    noise = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scheduler = make_scheduler(cls, process, prediction_type="v_prediction", solver_order=2,
                               timestep_spacing="trailing", rescale_betas_zero_snr=True)
    theirs = run_diffusers(scheduler, net, process, noise, 300, None)
    ours = run_ours(Sampler(algorithm, 300, "trailing"), net, process, noise, None, False)
    assert torch.isfinite(theirs).all() and torch.isfinite(ours).all(), (~torch.isfinite(ours)).sum().item()
    # diffusers' multistep solvers cast the sample to float32 at every step: over 300 steps their rounding
    # reaches ~1e-5 (the grid with alpha_bar_T = 2^-24 or 0 gives 1.28e-5 alike), so 3e-5 here, 1e-5 at 8 steps
    assert (ours - theirs).abs().max() < 3 * TOL


def test_karras_spacing_below_two_to_the_minus_24_matches_diffusers():
    """Plain cosine, T=1000: alpha_bar_T = 2.4e-9 < 2^-24. sigma_max is sigma(T-1) = 2.0e4 (Karras et al. Eq. 5,
    unclamped): the sigmas and fractional timesteps of diffusers' use_karras_sigmas."""
    process = GaussianDiffusion(beta_schedule("cosine", 1000))
    scheduler = make_scheduler(diffusers.EulerDiscreteScheduler, process, use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    timesteps = timesteps_for("karras", process.alphas_cumprod, 10)
    alpha_bars = process.path.alpha_bar(timesteps)
    assert torch.allclose(((1 - alpha_bars) / alpha_bars).sqrt(), scheduler.sigmas[:-1].double(), rtol=1e-5)
    assert torch.allclose(timesteps, scheduler.timesteps.double(), atol=1e-3), timesteps.tolist()
