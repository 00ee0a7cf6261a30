"""`ModelCheckpoint` whose last.ckpt is written on a clock and a step count that do not wait for validation, always
holds the final step, and only ever a consistent one."""

import time

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion_lab.utils.errors import ConfigError


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint keeps the best checkpoints by `monitor` and writes last.ckpt beside them; this one
    also writes last.ckpt

    - every `every_n_minutes` of training and every `every_n_train_steps` optimizer steps, whether or not the
      monitored metric exists yet (Lightning defers both saves to the next validation, which may be an epoch away);
      such a save does not count as the step's save, so a validation at the same step still keeps the best;
    - when an epoch ends without a save at its step (a run that stops at `trainer.max_steps` mid-epoch), before EMA
      swaps the averaged weights in at train end, so sampling and `ckpt_path=auto` start from the step reached.

    On an exception it writes last.ckpt only for SIGTERM (and Ctrl-C, which train.py turns into SIGTERM): Lightning
    raises that between optimizer steps or validation batches, where the state is whole. Any other exception may
    strike mid-step (half an optimizer update, a non-finite loss), so last.ckpt keeps the last good save."""

    def __init__(self, *args, every_n_minutes: float | None = None, **kwargs):
        if every_n_minutes is not None and not every_n_minutes >= 0:
            raise ConfigError(f"callbacks.model_checkpoint.every_n_minutes={every_n_minutes}; give minutes >= 0 between "
                              "saves of last.ckpt, or null for none on a clock")
        super().__init__(*args, **kwargs)
        self.every_n_minutes = every_n_minutes
        self._last_written_step, self._last_written_time = -1, time.monotonic()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_written_time = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.save_last and self._last_save_due(trainer):
            step_saved = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = step_saved  # a validation at this step still saves the best and last

    def _last_save_due(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking or self._last_written_step == trainer.global_step:
            return False
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if self.every_n_minutes is not None:  # rank 0's clock decides for all ranks: a save is collective
            elapsed = time.monotonic() - self._last_written_time
            due = due or trainer.strategy.broadcast(elapsed >= 60 * self.every_n_minutes)
        return due

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step, self._last_written_time = trainer.global_step, time.monotonic()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last and self._should_save_on_exception(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
