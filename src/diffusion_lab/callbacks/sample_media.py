"""Every N training steps: a sample grid and a denoising GIF from the EMA weights, to the run folder and the logger."""

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from hydra.utils import instantiate
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from diffusion_lab.callbacks.ema import averaged_or_current
from diffusion_lab.generate import generate
from diffusion_lab.samplers import Sampler
from diffusion_lab.utils.errors import ConfigError
from diffusion_lab.utils.media import save_gif, save_grid

log = logging.getLogger(__name__)


class SignalDuringSampling(Exception):
    """SIGTERM or Ctrl-C arrived while the callback was sampling: it stops at the next network evaluation."""


@contextmanager
def stop_on_signal(trainer: Trainer, net: nn.Module):
    """Raises SignalDuringSampling before the next forward of `net` once the trainer has received SIGTERM."""

    def check(module, args) -> None:
        if trainer.received_sigterm:
            raise SignalDuringSampling

    handle = net.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


class SampleMedia(Callback):
    """Writes `<dirpath>/step_<k>.png` (a grid of `num_samples`) and `step_<k>.gif` every `every_n_steps`
    optimizer steps and at the end of training, and logs them as `media/samples` and `media/trajectory`, sampled
    with `sampler` (built by the recursive instantiation of the callbacks; None: the run's own) cut to at most
    `max_steps` steps, so that a grid costs num_samples x max_steps network evaluations. Each grid is announced
    with its cost and timed in the log; a signal stops it at the next network evaluation, writing no media, and
    training stops as Lightning stops it (after the step, with a whole last.ckpt)."""

    def __init__(self, dirpath: str, every_n_steps: int = 1000, num_samples: int = 16, sampler: Sampler | None = None,
                 trajectory_samples: int = 4, seed: int = 0, max_steps: int | None = 50):
        if every_n_steps < 1 or num_samples < 1:
            raise ConfigError("callbacks.sample_media.every_n_steps and num_samples must be >= 1")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ConfigError(f"callbacks.sample_media.max_steps={max_steps}; give sampler steps >= 1, or null for the "
                              "sampler's own")
        if sampler is not None and not isinstance(sampler, Sampler):
            raise ConfigError(f"callbacks.sample_media.sampler={sampler} is not a sampler config; give null or "
                              "{_target_: diffusion_lab.samplers.Sampler, algorithm: ddim, steps: 50}")
        self.dirpath, self.every_n_steps, self.num_samples = Path(dirpath), every_n_steps, num_samples
        self.sampler, self.trajectory_samples, self.seed, self.max_steps = sampler, trajectory_samples, seed, max_steps
        self._last_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    def media_sampler(self, pl_module: LightningModule) -> Sampler:
        sampler = self.sampler if self.sampler is not None else instantiate(pl_module.run_config["sampler"])
        if self.max_steps is not None and sampler.steps > self.max_steps:
            sampler = Sampler(sampler.algorithm, self.max_steps, sampler.spacing, **sampler.options)
        return sampler

    @rank_zero_only
    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = step = trainer.global_step
        model = averaged_or_current(trainer, pl_module).model
        sampler = self.media_sampler(pl_module)
        labels = list(range(model.num_classes)) if model.conditional else None
        log.info(f"sample media at step {step}: {self.num_samples} samples x {sampler.evaluations} network evaluations "
                 f"({sampler.algorithm}, {sampler.steps} steps)")
        started = time.monotonic()
        try:
            with stop_on_signal(trainer, model.net):
                out = generate(model, sampler, self.num_samples, self.num_samples, seed=self.seed, class_labels=labels,
                               trajectory_samples=self.trajectory_samples)
        except SignalDuringSampling:
            log.info(f"sample media at step {step}: stopped by a signal, none written")
            return
        grid_path, gif_path = self.dirpath / f"step_{step:07d}.png", self.dirpath / f"step_{step:07d}.gif"
        save_grid(out.samples, grid_path)
        save_gif(out.trajectory, gif_path)
        log.info(f"sample media at step {step}: {grid_path} in {time.monotonic() - started:.1f} s")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({"media/samples": wandb.Image(str(grid_path)),
                                       "media/trajectory": wandb.Video(str(gif_path), format="gif"),
                                       "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_images("media/samples", out.samples, step, dataformats="NHWC")
