"""The samplers by name (`sampler.algorithm`): plain functions over a denoiser and a grid of noise levels, with one
signature (`samplers.denoiser` describes it):
    sampler(denoiser, x, alphas, sigmas, *, callback=None, noise_sampler=None, **options) -> x_0
"""

from diffusion_lab.samplers.ancestral import consistency, ddim, ddpm, euler_ancestral
from diffusion_lab.samplers.denoiser import Denoiser, DenoiserOutput, SamplerError  # noqa: F401 (the interface)
from diffusion_lab.samplers.flow_map import flow_map
from diffusion_lab.samplers.multistep import dpm_solver_pp, unipc
from diffusion_lab.samplers.ode import check_edm_grid, dopri5, edm, euler, heun

GRID_CHECKS = {"edm": check_edm_grid}  # samplers that cannot run on every grid: the check they make first

SAMPLERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "dpm_solver_pp": dpm_solver_pp,
    "unipc": unipc,
    "heun": heun,
    "euler": euler,
    "edm": edm,
    "euler_ancestral": euler_ancestral,
    "dopri5": dopri5,
    "consistency": consistency,
    "flow_map": flow_map,
}
