"""`LatentDiffusionModule`: diffusion in the latent space of a frozen autoencoder (Rombach et al. 2022, Sec. 3.2).

    python train.py experiment=latent_ddpm_fashion_mnist first_stage_ckpt=PATH

Each batch x is mapped to z = scale_factor * E(x) (a sample of the encoder posterior) before the process's
training loss; sampling draws latents and decodes them with D(z / scale_factor) (`generate(decode=...)`). The
backbone sees the latent shape (`builders.backbone_shape`); the first stage's weights are frozen, saved in every
checkpoint under `first_stage.`, and its config under `config.first_stage`, so a checkpoint alone samples.
"""

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from diffusion_lab.models.autoencoder_module import load_first_stage
from diffusion_lab.models.components.autoencoder_kl import DiagonalGaussian
from diffusion_lab.models.diffusion_module import DiffusionModule
from diffusion_lab.utils.errors import ConfigError


class LatentDiffusionModule(DiffusionModule):
    """`DiffusionModule` over the latents of the autoencoder checkpoint `first_stage_ckpt`.
    `cache_latents`: encode the training and validation images once at the start of fit (the posterior moments,
    so z is still sampled per step) and train from those; random flips then act on the latent moments, which the
    encoder's convolutions make a close but not exact stand-in for flipping the images."""

    def __init__(
        self,
        net: nn.Module,
        process: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        conditional: bool = False,
        run_config: dict | None = None,
        first_stage_ckpt: str = "",
        cache_latents: bool = False,
    ):
        super().__init__(net, process, optimizer, lr_scheduler, seed, conditional, run_config)
        self.first_stage = load_first_stage(first_stage_ckpt)
        data, autoencoder = self.run_config.get("data"), self.first_stage.autoencoder
        if data and (data["channels"], data["image_size"]) != (autoencoder.channels, autoencoder.image_size):
            raise ConfigError(
                f"first_stage_ckpt={first_stage_ckpt} encodes {autoencoder.image_size}x{autoencoder.image_size}x"
                f"{autoencoder.channels} images, but data={data['dataset']} has {data['image_size']}x{data['image_size']}x"
                f"{data['channels']}; use an autoencoder trained on this data set"
            )
        self.cache_latents = cache_latents

    def _losses(self, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs, labels = batch
        if self.cache_latents:  # the batch holds posterior moments (mean, logvar) of the images
            latents = self.first_stage.scale_factor * DiagonalGaussian(inputs).sample(generator)
        else:
            latents = self.first_stage.encode(inputs, generator)
        return super()._losses((latents, labels), generator)

    @torch.no_grad()
    def on_fit_start(self) -> None:
        if self.cache_latents:
            datamodule = self.trainer.datamodule
            datamodule.train_set = self.encode_dataset(datamodule.train_set)
            datamodule.val_set = self.encode_dataset(datamodule.val_set)

    def encode_dataset(self, dataset) -> TensorDataset:
        """(posterior moments (N, 2 * latent_channels, h, w), labels) of an image data set, on the CPU."""
        moments, labels = [], []
        for start in range(0, len(dataset), 256):
            images, batch_labels = zip(*(dataset[i] for i in range(start, min(start + 256, len(dataset)))))
            posterior = self.first_stage.autoencoder.encode(torch.stack(images).to(self.device))
            moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1).cpu())
            labels.append(torch.stack(batch_labels))
        return TensorDataset(torch.cat(moments), torch.cat(labels))
