"""Every N training steps: the loss by timestep bucket of the EMA weights on validation images, as a figure."""

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import averaged_or_current
from diffusion_lab.metrics.loss_by_timestep import loss_by_timestep, save_loss_by_timestep
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.seeding import step_seed


class LossByTimestep(Callback):
    """Writes `<dirpath>/loss_by_timestep_<step>.png` every `every_n_steps` optimizer steps from the first
    `num_images` validation images (the same images, timesteps and noise each time) and logs it as
    `media/loss_by_timestep`."""

    def __init__(self, dirpath: str, every_n_steps: int = 1000, num_images: int = 256, buckets: int = 10,
                 repeats: int = 4, seed: int = 0):
        if min(every_n_steps, num_images, buckets, repeats) < 1:
            raise ConfigError("callbacks.loss_by_timestep.every_n_steps, num_images, buckets and repeats must be >= 1")
        self.dirpath, self.every_n_steps, self.num_images = Path(dirpath), every_n_steps, num_images
        self.buckets, self.repeats, self.seed = buckets, repeats, seed

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    @rank_zero_only
    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module = averaged_or_current(trainer, pl_module)
        val_set = trainer.datamodule.val_set
        count = min(self.num_images, len(val_set))
        images = val_set.images[:count].to(pl_module.device).float() / 127.5 - 1
        labels = val_set.labels[:count].to(pl_module.device)
        generator = torch.Generator(pl_module.device).manual_seed(step_seed(self.seed, "loss_by_timestep"))
        model = module.model
        was_training = model.training
        model.eval()
        losses = loss_by_timestep(model, images, generator, self.buckets, self.repeats, labels)
        model.train(was_training)
        step = trainer.global_step
        path = self.dirpath / f"loss_by_timestep_{step:07d}.png"
        save_loss_by_timestep(losses, path, title=f"step {step}, {model.process.name}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"media/loss_by_timestep": wandb.Image(str(path)), "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
                from PIL import Image
                import numpy as np

                logger.experiment.add_image("media/loss_by_timestep", np.asarray(Image.open(path).convert("RGB")),
                                            step, dataformats="HWC")
