"""`DiffusionModule`: the LightningModule that trains one `DiffusionModel` (backbone, process, first stage), and does
nothing else."""

from typing import Any, Callable

import torch
from lightning import LightningModule
from torch import Tensor
from torch.utils.data import TensorDataset

from diffusion_lab.models.components.autoencoder_kl import DiagonalGaussian
from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.models.representation import RepresentationTerms
from diffusion_lab.utils.checkpoint import upgrade_checkpoint
from diffusion_lab.utils.errors import ConfigError, NonFiniteError
from diffusion_lab.utils.lr_schedules import optimizers_and_schedulers
from diffusion_lab.utils.seeding import step_seed


class DiffusionModule(LightningModule):
    """Trains `model.net` under `model.process` on `model.encode(images)`. Every random draw of a training step
    (timesteps, noise, the latent posterior sample, ...) comes from a generator seeded by (seed, rank, step), so each
    rank draws its own and a resumed run repeats exactly what an uninterrupted one would have drawn. `run_config`
    (plain containers) is saved in every checkpoint, which is all that sampling needs. The first step with a
    non-finite loss is recorded on the device (no host sync per step) and raised as NonFiniteError every
    `log_every_n_steps` and before any checkpoint is written, so none holds it.
    `cache_latents` (latent diffusion): encode the training and validation images once at the start of fit (the
    posterior moments, so z is still sampled per step) and train from those; random flips then act on the latent
    moments, which the encoder's convolutions make a close but not exact stand-in for flipping the images.
    `data=latent_shards` gives such moments from the start (encoded once by prepare): the encoder never runs.
    `representation` (models/representation.py): REPA and the dispersive loss on the backbone's hidden states, added
    to the process's loss (`train/loss` stays the process's own; the terms log as `train/repa_loss`, `train/disp_loss`);
    their projector trains and checkpoints with the backbone."""

    batches_hold_training_images = True  # REPA's encoder reads the clean images of the batch

    def __init__(
        self,
        model: DiffusionModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        run_config: dict | None = None,
        cache_latents: bool = False,
        representation: RepresentationTerms | None = None,
    ):
        super().__init__()
        if cache_latents and not model.latent:
            raise ConfigError("module.cache_latents=true caches the latents of a first stage; this model diffuses pixels")
        if representation is not None and representation.needs_images and not self.batches_hold_training_images:
            raise ConfigError(f"representation.repa_weight > 0 aligns with the batch's images, but {type(self).__name__} "
                              "trains on other samples; use representation.disp_weight alone")
        self.representation = representation
        self.model = model
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.seed, self.run_config, self.cache_latents = seed, run_config or {}, cache_latents
        self.batches_of_moments = cache_latents  # batches hold posterior moments (mean, logvar), not images
        self._first_nonfinite_step: Tensor | None = None  # -1 while every loss is finite
        # one denoiser evaluation on one sample: Lightning's model summary counts the FLOPs of forward on this
        smallest, largest = model.level_range()
        self.example_input_array = (torch.zeros(1, *model.sample_shape), torch.tensor(min(max(1.0, smallest), largest)),
                                    torch.zeros(1, dtype=torch.long) if model.conditional else None)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """D(x; sigma) of the model (`DiffusionModel.forward`)."""
        return self.model(x, sigma, class_labels)

    def _generator(self, *purpose: int | str) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(step_seed(self.seed, *purpose))

    def _losses(self, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs, labels = batch
        if self.batches_of_moments:
            x0 = self.model.first_stage.scale_factor * DiagonalGaussian(inputs).sample(generator)
        else:
            x0 = self.model.encode(inputs, generator)
        return self.model.loss(x0, generator, labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        # micro-batch k > 0 of an accumulated step (trainer.accumulate_grad_batches) draws from its own seed
        micro = batch_idx % self.trainer.accumulate_grad_batches
        purpose = (self.global_rank, self.global_step, micro) if micro else (self.global_rank, self.global_step)
        if self.representation is not None:
            self.representation.hidden_states.clear()
        losses, t = self._losses(batch, self._generator(*purpose, "train"))
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        if self.representation is not None:
            loss = loss + self.representation_loss(batch[0])
        if self._first_nonfinite_step is None:
            self._first_nonfinite_step = torch.tensor(-1, device=loss.device)
        unseen = loss.isfinite() | (self._first_nonfinite_step >= 0)
        self._first_nonfinite_step = torch.where(unseen, self._first_nonfinite_step, self.global_step + 1)
        return loss

    def representation_loss(self, images: Tensor) -> Tensor:
        """The weighted representation terms of the training forward pass just run, each logged as train/<name>_loss."""
        if self.batches_of_moments and self.representation.needs_images:
            raise ConfigError("representation.repa_weight > 0 needs the batch's images, but it holds latents "
                              "(module.cache_latents or data=latent_shards); drop one or use representation.disp_weight alone")
        terms = self.representation(images)
        for name, value in terms.items():
            self.log(f"train/{name}_loss", value, sync_dist=True)
        return self.representation.weighted(terms)

    def on_after_backward(self) -> None:
        if self.representation is not None:  # what gradient checkpointing's recomputation recorded
            self.representation.hidden_states.clear()

    def on_train_batch_end(self, outputs: Tensor, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self, checkpoint: dict | None = None) -> None:
        """NonFiniteError naming the first step whose loss was NaN or inf, or whose weights in `checkpoint` are."""
        step = -1 if self._first_nonfinite_step is None else int(self._first_nonfinite_step)
        if step >= 0:
            raise NonFiniteError(f"the training loss is not finite at step {step}; stopped (a lower optimizer.lr or "
                                "trainer.gradient_clip_val=1.0 often helps)")
        tensors = [t for key in ("state_dict", "current_model_state") for t in (checkpoint or {}).get(key, {}).values()]
        floats = [t for t in tensors if t.is_floating_point()]
        if floats and not torch.stack([t.isfinite().all() for t in floats]).all():
            raise NonFiniteError(f"the weights are not finite at step {self.global_step}; stopped")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # the same timesteps and noise at every validation, so val/loss curves compare like with like
        losses, _ = self._losses(batch, self._generator(self.global_rank, batch_idx, "val"))
        self.log("val/loss", losses.mean(), prog_bar=True, sync_dist=True, batch_size=len(losses))

    def configure_optimizers(self) -> dict:
        params = [*self.model.net.parameters(), *(self.representation.parameters() if self.representation else [])]
        return optimizers_and_schedulers(params, self.optimizer_factory, self.lr_scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_nonfinite(checkpoint)
        checkpoint["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(checkpoint)  # resuming a format-1 checkpoint: its weights move under model.

    @torch.no_grad()
    def on_fit_start(self) -> None:
        check_latents = getattr(self.trainer.datamodule, "check_first_stage", None)  # data of latents (latent_shards)
        if check_latents is not None:
            if self.cache_latents:
                raise ConfigError("module.cache_latents=true encodes images, but data=latent_shards holds latents "
                                  "already; drop module.cache_latents")
            check_latents(self.model)
            self.batches_of_moments = True
        elif self.cache_latents:
            datamodule = self.trainer.datamodule
            datamodule.train_set = self.encode_dataset(datamodule.train_set)
            datamodule.val_set = self.encode_dataset(datamodule.val_set)

    def encode_dataset(self, dataset) -> TensorDataset:
        """(posterior moments (N, 2 * latent_channels, h, w), labels) of an image data set, on the CPU."""
        moments, labels = [], []
        for start in range(0, len(dataset), 256):
            images, batch_labels = zip(*(dataset[i] for i in range(start, min(start + 256, len(dataset)))))
            posterior = self.model.first_stage.autoencoder.encode(torch.stack(images).to(self.device))
            moments.append(torch.cat([posterior.mean, posterior.logvar], dim=1).cpu())
            labels.append(torch.stack(batch_labels))
        return TensorDataset(torch.cat(moments), torch.cat(labels))
