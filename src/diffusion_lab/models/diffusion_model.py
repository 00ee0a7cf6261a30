"""`DiffusionModel`: the model as one object — backbone, process, first stage, sample shape and classes.

Built once from a config (`builders.build_model`) and owned by the LightningModule; `generate`, sample.py, the
callbacks, the metrics and the benchmarks take it as it is. Pixel diffusion has the identity first stage; latent
diffusion (Rombach et al. 2022) a frozen autoencoder, so `encode` maps images to what the process diffuses and
`decode` maps samples back to images, for every consumer alike.
"""

import copy
import math
from typing import Callable

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.guidance import Guidance
from diffusion_lab.diffusion.paths import vp_norm
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError


class DiffusionModel(nn.Module):
    """net under process, over the latents of first_stage (None: pixels). sample_shape: (C, H, W) of what the
    process diffuses; num_classes: the classes of a class-conditional model (None: unconditional)."""

    def __init__(
        self,
        net: nn.Module,
        process: nn.Module,
        sample_shape: tuple[int, int, int],
        first_stage: nn.Module | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.net, self.process, self.first_stage = net, process, first_stage
        self.sample_shape, self.num_classes = tuple(sample_shape), num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def latent(self) -> bool:
        return self.first_stage is not None

    @property
    def process_name(self) -> str:
        return self.process.name

    def describe(self) -> str:
        """How a message names the process's parameterisation: "process edm", "process gaussian objective=v"."""
        objective = getattr(self.process, "objective", None)
        return f"process {self.process.name}" + (f" objective={objective}" if objective else "")

    def setting(self, name: str):
        """A setting of the process as configured (process.<name>: sigma_data, sigma_min, num_timesteps, ...)."""
        if not hasattr(self.process, name):
            raise ConfigError(f"process {self.process.name} has no setting {name}")
        return getattr(self.process, name)

    @property
    def output_channels(self) -> int:
        """The channels the backbone outputs for this model's samples (twice as many for a learned variance)."""
        return self.process.output_channels(self.sample_shape[0])

    def level_range(self) -> tuple[float, float]:
        """(smallest, largest) noise level sigma / alpha the denoiser is defined at (`GaussianPath.level_range`)."""
        return self.process.path.level_range()

    def backbone_state(self) -> dict[str, Tensor]:
        return self.net.state_dict()

    def copy_backbone_from(self, other: "DiffusionModel") -> None:
        """Load the other model's backbone weights into this one's (RuntimeError for a backbone of another shape)."""
        self.net.load_state_dict(other.backbone_state())

    def backbone_copy(self) -> nn.Module:
        """A copy of the backbone without gradients: a target network, or a teacher for the next distillation stage."""
        return copy.deepcopy(self.net).requires_grad_(False)

    @torch.no_grad()
    def update_average(self, average: nn.Module, decay: float) -> None:
        """average <- decay average + (1 - decay) backbone, parameter by parameter (a target network's EMA)."""
        torch._foreach_lerp_(list(average.parameters()), list(self.net.parameters()), 1 - decay)

    def drop_labels(self, class_labels: Tensor, generator: torch.Generator) -> Tensor:
        """Class labels with the process's training dropout to the null class `num_classes`."""
        return self.process.drop_labels(class_labels, generator, self.num_classes)

    @property
    def clip_x0(self) -> bool:
        """Whether x_0 estimates lie in [-1, 1]: pixels under a process that clips (`process.clip_x0`), never latents.
        Sampling clips x_0 by default where this holds, and self-conditioning feeds the clamped x_0 in training and
        sampling alike where it holds (`diffusion.denoisers.self_condition_input`)."""
        return self.process.clip_x0 and not self.latent

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the process diffuses for images in [-1, 1]: the images, or scale_factor * z, z ~ q(z | x)."""
        return images if self.first_stage is None else self.first_stage.encode(images, generator)

    @torch.no_grad()
    def decode(self, samples: Tensor) -> Tensor:
        """Images for what the process samples: the samples, or D(z / scale_factor)."""
        return samples if self.first_stage is None else self.first_stage.decode(samples)

    def loss(self, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None,
             **options) -> tuple[Tensor, Tensor]:
        """The process's per-sample training loss on x0 (already encoded; see `encode`) and where along the path
        (u in [0, 1]) each sample was drawn; options: the process's own (flow matching's coupled `noise`, the
        consistency losses' `num_scales`, `target_net`, `estimate_previous`, `metric`)."""
        return self.process.training_losses(self.net, x0, generator, class_labels if self.conditional else None,
                                            clip_x0=self.clip_x0, **options)

    def denoiser(self, clip_denoised: bool | None = None, guidance: Guidance | None = None,
                 class_labels: Tensor | None = None, net: nn.Module | None = None) -> nn.Module:
        """The process's denoiser module (x, alpha, sigma) -> DenoiserOutput over the backbone, or over `net`, another
        network of its shape (a distillation stage's teacher) (`build_denoiser`): labelled and guided as `guidance`
        says, self-conditioned for a self-conditioned backbone, x_0 clipped when clip_denoised (None: `clip_x0`)."""
        classifier_free = guidance is not None and guidance.active and not guidance.autoguided
        if (class_labels is not None or classifier_free) and not self.conditional:
            raise ConfigError("class_labels and classifier-free guidance need a class-conditional model "
                              "(data.conditional=true); an unconditional one is guided by a guide network (guide_ckpt)")
        return self.process.denoiser(self.net if net is None else net, clip_denoised, guidance, class_labels,
                                     clip_x0=self.clip_x0)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """D(x; sigma): the x_0 estimate for x = x_0 + sigma eps (alpha = 1, Karras et al. 2022's frame), one network
        evaluation, unclipped (the evaluation Lightning's model summary counts the FLOPs of)."""
        return self.denoiser(clip_denoised=False, class_labels=class_labels)(x, torch.ones_like(sigma), sigma).x0

    def autoguidance(self, guide: "DiffusionModel", scale: float, interval: tuple[float, float] = (0.0, math.inf)
                     ) -> Guidance:
        """Guidance of this model by `guide`, a weaker model of the same task (Karras et al. 2024): ConfigError
        (one line) unless it has this model's process, noise levels, sample shape, classes and first stage."""
        mine, theirs = guide_signature(self), guide_signature(guide)
        different = "; ".join(f"{key} ({theirs[key]} there, {mine[key]} here)" for key in mine if mine[key] != theirs[key])
        if different:
            raise ConfigError(f"the guide differs from the model in {different}: autoguidance needs the same task")
        return Guidance(scale, interval, guide.net)

    def grid(self, steps: int, spacing: str) -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) (steps + 1,) of `steps` noise levels with this spacing on the process, then the data."""
        return self.process.sampling_grid(steps, spacing)

    def sampling_grid(self, sampler: Sampler) -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) of the sampler's steps and spacing on this process."""
        return self.grid(sampler.steps, sampler.spacing)

    @torch.no_grad()
    def sample(self, noise: Tensor, sampler: Sampler, callback: Callable | None = None,
               generator: torch.Generator | None = None, clip_denoised: bool | None = None,
               guidance: Guidance | None = None, class_labels: Tensor | None = None,
               noise_sampler: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """x_0 (float32, in the process's space: latents for latent diffusion) from noise ~ N(0, I) by the sampler
        over a fresh denoiser, started at x = sqrt(alpha^2 + sigma^2) noise of the grid's first point (the marginal
        std for data of unit variance: 1 for DDPM and flow matching, sqrt(1 + sigma_max^2) for EDM, as diffusers'
        init_noise_sigma); clamped to [-1, 1] when clip_denoised (None: `clip_x0`; never for latents,
        which are not confined to [-1, 1]). noise_sampler(like): the stochastic samplers' N(0, I) draws (default: from
        `generator`)."""
        clip = self.clip_x0 if clip_denoised is None or self.latent else clip_denoised
        alphas, sigmas = self.sampling_grid(sampler)
        if guidance is not None:
            guidance.check_grid(alphas, sigmas)
        denoiser = self.denoiser(clip, guidance, class_labels)
        x_T = noise.to(torch.float64) * vp_norm(alphas[0], sigmas[0]).to(noise.device)
        x0 = sampler(denoiser, x_T, alphas, sigmas, callback=callback, generator=generator,
                     noise_sampler=noise_sampler).float()
        return x0.clamp(-1, 1) if clip else x0


def guide_signature(model: DiffusionModel) -> dict:
    """What an autoguidance guide must share with the model it guides."""
    alphas, sigmas = model.grid(8, model.process.default_spacing)
    return {"process": model.describe(), "noise levels": [float(f"{s / a:.4g}") for a, s in zip(alphas[:-1], sigmas[:-1])],
            "sample shape": model.sample_shape, "classes": model.num_classes, "latent": model.latent,
            "self-conditioning": getattr(model.net, "self_condition", False)}
