"""The denoiser as a module, D(x, alpha, sigma, **net_kwargs) -> DenoiserOutput, with its state in the open
(k-diffusion's `layers.Denoiser`, EDM's `EDMPrecond`), and guidance, self-conditioning and clipping as wrappers of it.

`ProcessDenoiser` maps x at any noise level (alpha, sigma) to its process's path point of the same SNR
(`GaussianPath.locate`), feeds the network what the process says (`process.network_inputs`: the preconditioning) and
reads x_0 and eps from its output (`process.read_output`). `build_denoiser` stacks, outermost first: `ClipX0`,
`SelfConditioning`, `GuidedDenoiser` (diffusion.guidance), then the `ProcessDenoiser`.
"""

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.guidance import Guidance, GuidedDenoiser
from diffusion_lab.diffusion.paths import broadcast, eps_from_x0
from diffusion_lab.samplers.denoiser import DenoiserOutput, SamplerError


class ProcessDenoiser(nn.Module):
    """net read under a process: x -> x_path = x / c at the path time t of (alpha, sigma) (`locate`), then
    net(*network_inputs(x_path, t), **net_kwargs) in the net's dtype, read as (x_0, eps) by `read_output`; x_0 and eps
    are the same in every frame, eps consistent with x_path = alpha_t x_0 + sigma_t eps."""

    def __init__(self, net: nn.Module, process: nn.Module):
        super().__init__()
        self.net, self.process = net, process

    @property
    def self_condition(self) -> bool:
        return getattr(self.net, "self_condition", False)

    def forward(self, x: Tensor, alpha: Tensor, sigma: Tensor, level_to: tuple[Tensor, Tensor] | None = None,
                **net_kwargs) -> DenoiserOutput:
        if level_to is not None:
            raise SamplerError(f"sampler=flow_map steps along a learned flow map, which process {self.process.name} "
                               "does not learn; use process=meanflow or process=shortcut, or another sampler")
        t, scale = self.process.path.locate(alpha, sigma)
        t = t.to(x.device).expand(x.shape[0])
        x_path = x / broadcast(scale.to(x.device), x)
        x_in, t_in = self.process.network_inputs(x_path, t)
        return self.process.read_output(x_path, t, call_net(self.net, x_in, t_in, **net_kwargs))


def call_net(net: nn.Module, x: Tensor, t: Tensor, **net_kwargs) -> Tensor:
    """net(x, t, **net_kwargs) with x, t and the floating-point arguments in the net's dtype, the output in x's."""
    dtype = next(net.parameters()).dtype
    kwargs = {key: value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value
              for key, value in net_kwargs.items()}
    return net(x.to(dtype), t.to(dtype), **kwargs).to(x.dtype)


def self_condition_input(x0: Tensor, clip_x0: bool) -> Tensor:
    """The x_0 estimate fed back to a self-conditioned network (Chen et al. 2023, "Analog Bits", Sec. 3), the same
    function of x_0 in training and sampling: clamped to [-1, 1] where the model's x_0 lies there (`clip_x0`: pixels
    under a clipping process), else as it is (latents, EDM, flow matching, consistency)."""
    return x0.clamp(-1, 1) if clip_x0 else x0


class SelfConditioning(nn.Module):
    """Feeds the network its previous x_0 estimate as x_self_cond (none on the first call), through
    `self_condition_input`; `previous_x0` is the state, cleared by `reset_sampling_state` (the Sampler does, per run)."""

    def __init__(self, denoiser: nn.Module, clip_x0: bool):
        super().__init__()
        self.denoiser, self.clip_x0 = denoiser, clip_x0
        self.previous_x0: Tensor | None = None

    def reset_sampling_state(self) -> None:
        self.previous_x0 = None

    def forward(self, x: Tensor, alpha: Tensor, sigma: Tensor, **net_kwargs) -> DenoiserOutput:
        out = self.denoiser(x, alpha, sigma, x_self_cond=self.previous_x0, **net_kwargs)
        self.previous_x0 = self_condition_input(out.x0, self.clip_x0)
        return out


class ClipX0(nn.Module):
    """x_0 clamped to [-1, 1] and eps recomputed from it, eps = (x - alpha x_0) / sigma (Ho et al. 2020's sampling)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: Tensor, alpha: Tensor, sigma: Tensor, **net_kwargs) -> DenoiserOutput:
        out = self.denoiser(x, alpha, sigma, **net_kwargs)
        x0 = out.x0.clamp(-1, 1)
        return out._replace(x0=x0, eps=eps_from_x0(x, broadcast(alpha, x), broadcast(sigma, x), x0))


def build_denoiser(net: nn.Module, process: nn.Module, clip_denoised: bool | None = None,
                   guidance: Guidance | None = None, class_labels: Tensor | None = None,
                   clip_x0: bool | None = None) -> nn.Module:
    """The denoiser of net under process for sampling: labelled and guided (`GuidedDenoiser`: classifier-free with
    the null class `net.num_classes`, or autoguided by `guidance.guide_net`, over `guidance.interval`),
    self-conditioned for a net with `self_condition`, x_0 clipped when clip_denoised. clip_x0: whether the model's x_0
    lies in [-1, 1] (None: `process.clip_x0`), the default of clip_denoised and the rule of self-conditioning's
    input."""
    guidance = Guidance() if guidance is None else guidance
    clip_x0 = process.clip_x0 if clip_x0 is None else clip_x0
    denoiser = process.core_denoiser(net)
    if class_labels is not None or guidance.active:
        guide = None if guidance.guide_net is None else process.core_denoiser(guidance.guide_net)
        denoiser = GuidedDenoiser(denoiser, guidance, class_labels, guide, getattr(net, "num_classes", None))
    if getattr(net, "self_condition", False):
        denoiser = SelfConditioning(denoiser, clip_x0)
    if clip_x0 if clip_denoised is None else clip_denoised:
        denoiser = ClipX0(denoiser)
    return denoiser
