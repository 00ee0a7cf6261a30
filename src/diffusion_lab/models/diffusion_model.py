"""`DiffusionModel`: the model as one object — backbone, process, first stage, sample shape and classes.

Built once from a config (`builders.build_model`) and owned by the LightningModule; `generate`, sample.py, the
callbacks, the metrics and the benchmarks take it as it is. Pixel diffusion has the identity first stage; latent
diffusion (Rombach et al. 2022) a frozen autoencoder, so `encode` maps images to what the process diffuses and
`decode` maps samples back to images, for every consumer alike.
"""

from typing import Callable

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.process import vp_norm
from diffusion_lab.samplers import Sampler
from diffusion_lab.samplers.sampling import Denoiser
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

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What the process diffuses for images in [-1, 1]: the images, or scale_factor * z, z ~ q(z | x)."""
        return images if self.first_stage is None else self.first_stage.encode(images, generator)

    @torch.no_grad()
    def decode(self, samples: Tensor) -> Tensor:
        """Images for what the process samples: the samples, or D(z / scale_factor)."""
        return samples if self.first_stage is None else self.first_stage.decode(samples)

    def loss(self, x0: Tensor, generator: torch.Generator, class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The process's per-sample training loss on x0 (already encoded; see `encode`) and where along the path
        (u in [0, 1]) each sample was drawn."""
        return self.process.training_losses(self.net, x0, generator, class_labels if self.conditional else None)

    def denoiser(self, clip_denoised: bool | None = None, guidance_scale: float = 1.0,
                 class_labels: Tensor | None = None) -> Denoiser:
        """The process's denoiser (x, alpha, sigma) -> DenoiserOutput over the backbone."""
        if (class_labels is not None or guidance_scale != 1) and not self.conditional:
            raise ConfigError("class_labels and guidance_scale need a class-conditional model (data.conditional=true)")
        return self.process.denoiser(self.net, clip_denoised, guidance_scale, class_labels)

    def sampling_grid(self, sampler: Sampler) -> tuple[Tensor, Tensor]:
        """(alphas, sigmas) of the sampler's steps and spacing on this process."""
        return self.process.sampling_grid(sampler.steps, sampler.spacing)

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        sampler: Sampler,
        callback: Callable | None = None,
        generator: torch.Generator | None = None,
        clip_denoised: bool | None = None,
        guidance_scale: float = 1.0,
        class_labels: Tensor | None = None,
        noise_sampler: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """x_0 (float32, in the process's space: latents for latent diffusion) from noise ~ N(0, I) by the sampler
        over a fresh denoiser, started at x = sqrt(alpha^2 + sigma^2) noise of the grid's first point (the marginal
        std for data of unit variance: 1 for DDPM and flow matching, sqrt(1 + sigma_max^2) for EDM, as diffusers'
        init_noise_sigma); clamped to [-1, 1] when clip_denoised (None: the process's `clip_x0`; never for latents,
        which are not confined to [-1, 1]). noise_sampler(like): the stochastic samplers' N(0, I) draws (default: from
        `generator`)."""
        if self.latent:
            clip_denoised = False
        clip = self.process.clip_x0 if clip_denoised is None else clip_denoised
        alphas, sigmas = self.sampling_grid(sampler)
        denoiser = self.denoiser(clip, guidance_scale, class_labels)
        x_T = noise.to(torch.float64) * vp_norm(alphas[0], sigmas[0]).to(noise.device)
        x0 = sampler(denoiser, x_T, alphas, sigmas, callback=callback, generator=generator,
                     noise_sampler=noise_sampler).float()
        return x0.clamp(-1, 1) if clip else x0
