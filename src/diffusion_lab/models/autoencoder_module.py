"""`AutoencoderModule`: trains the first stage of latent diffusion (`model=autoencoder_kl`).

    python train.py experiment=autoencoder_fashion_mnist

Loss per batch (LDM's KL-reg. autoencoder with no perceptual or adversarial term, Rombach et al. 2022, App. G):
    L = 1/B sum_i [ sum_pixels rec(x_i, D(z_i)) + kl_weight * KL(q(z|x_i) || N(0, I)) ],  z_i ~ q(z|x_i)
with rec = |.| (l1) or (.)^2 (l2). Every checkpoint records the latent scale factor 1 / std(z) measured on the
validation images under `checkpoint["first_stage"]`, which latent diffusion (`first_stage_ckpt=PATH`) reads.
"""

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor, nn

from diffusion_lab.models.components.autoencoder_kl import AutoencoderKL
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.lr_schedules import optimizers_and_schedulers
from diffusion_lab.utils.media import save_grid, to_uint8
from diffusion_lab.utils.seeding import step_seed

RECONSTRUCTION_LOSSES = ("l1", "l2")


class AutoencoderModule(LightningModule):
    """Logs train/loss, train/rec, train/kl; val/mse and val/psnr of the posterior-mean reconstruction (pixels in
    [-1, 1]; PSNR on [0, 1]: 10 log10(1 / mse_01)), val/scale_factor; and a grid of `num_images` validation
    images over their reconstructions to `<output_dir>/reconstructions` and the logger."""

    def __init__(
        self,
        model: AutoencoderKL,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        run_config: dict | None = None,
        reconstruction_loss: str = "l1",
        kl_weight: float = 1.0e-6,
        num_images: int = 8,
    ):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ConfigError(
                f"module.reconstruction_loss={reconstruction_loss!r} is not allowed; choose one of {', '.join(RECONSTRUCTION_LOSSES)}"
            )
        if kl_weight < 0:
            raise ConfigError(f"module.kl_weight={kl_weight} must be >= 0")
        self.net = model
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.seed, self.run_config = seed, run_config or {}
        self.reconstruction_loss, self.kl_weight, self.num_images = reconstruction_loss, kl_weight, num_images
        self.scale_factor: float | None = None
        self._scale_factor_step = -1
        self.example_input_array = torch.zeros(1, model.channels, model.image_size, model.image_size)  # for the summary

    def forward(self, images: Tensor) -> Tensor:
        """D(z), z ~ q(z|x) drawn from the run's own generator (`AutoencoderKL.forward`): what Lightning's model
        summary runs on `example_input_array` to count FLOPs, leaving the global random state as it was."""
        return self.net(images, self._generator("forward"))[0]

    def _generator(self, *purpose: int | str) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(step_seed(self.seed, *purpose))

    def losses(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(L, per-sample summed reconstruction loss (B,), per-sample KL (B,)) of a batch, z drawn from `generator`."""
        reconstruction, posterior = self.net(images, generator)
        loss_fn = F.l1_loss if self.reconstruction_loss == "l1" else F.mse_loss
        rec = loss_fn(reconstruction, images, reduction="none").flatten(1).sum(1)
        kl = posterior.kl()
        return (rec + self.kl_weight * kl).mean(), rec, kl

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, _ = batch
        loss, rec, kl = self.losses(images, self._generator(self.global_rank, self.global_step, "train"))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rec", rec.mean() / images[0].numel())
        self.log("train/kl", kl.mean())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, _ = batch
        posterior = self.net.encode(images)
        reconstruction = self.net.decode(posterior.mean)
        mse = F.mse_loss(reconstruction.clamp(-1, 1), images)
        n = len(images)
        self.log("val/mse", mse, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/psnr", 10 * torch.log10(4 / mse), sync_dist=True, batch_size=n)
        self.log("val/kl", posterior.kl().mean(), sync_dist=True, batch_size=n)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            k = min(self.num_images, n)
            self.write_reconstructions(torch.cat([images[:k], reconstruction[:k]]), k)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.scale_factor = self.measure_scale_factor()
            self.log("val/scale_factor", self.scale_factor)

    @torch.no_grad()
    def measure_scale_factor(self) -> float:
        """1 / std of latents z ~ q(z|x) over the validation images (fixed noise), the factor that gives the
        diffusion process unit-variance latents (Rombach et al. 2022, Sec. 4.3.2)."""
        generator = self._generator("scale_factor")
        total = total_sq = count = 0.0
        for images, _ in self.trainer.datamodule.val_dataloader():
            z = self.net.encode(images.to(self.device)).sample(generator).double()
            total, total_sq, count = total + z.sum().item(), total_sq + z.pow(2).sum().item(), count + z.numel()
        variance = total_sq / count - (total / count) ** 2
        self._scale_factor_step = self.global_step
        return float(variance**-0.5)

    def write_reconstructions(self, images: Tensor, nrow: int) -> None:
        if self.global_rank != 0:
            return
        step = self.global_step
        grid = to_uint8(images)
        path = Path(self.run_config.get("paths", {}).get("output_dir", ".")) / "reconstructions" / f"step_{step:07d}.png"
        save_grid(grid, path, nrow=nrow)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"media/reconstructions": wandb.Image(str(path)), "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_images("media/reconstructions", grid, step, dataformats="NHWC")

    def configure_optimizers(self) -> dict:
        return optimizers_and_schedulers(self.net.parameters(), self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._scale_factor_step != self.global_step:  # e.g. max_steps stopped training between validations
            self.scale_factor = self.measure_scale_factor()
        checkpoint["config"] = self.run_config
        checkpoint["first_stage"] = {"scale_factor": self.scale_factor}
