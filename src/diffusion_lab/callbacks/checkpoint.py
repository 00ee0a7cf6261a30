"""`ModelCheckpoint` whose last.ckpt always holds the final step, and only ever a consistent one."""

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint writes last.ckpt after validation; a run that stops at `trainer.max_steps`
    mid-epoch would leave last.ckpt behind its final weights. This one also saves it when an epoch ends without a
    save at its step (before EMA swaps the averaged weights in at train end), so sampling and `ckpt_path=auto`
    start from the step the run reached.

    On an exception it writes last.ckpt only for SIGTERM (and Ctrl-C, which train.py turns into SIGTERM): Lightning
    raises that between optimizer steps or validation batches, where the state is whole. Any other exception may
    strike mid-step (half an optimizer update, a non-finite loss), so last.ckpt keeps the last good save."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last and self._should_save_on_exception(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
