"""EMA of the weights through Lightning's own WeightAveraging callback.

Validation and the end-of-training weights use the average; checkpoints hold it under `state_dict` and the raw
(trained) weights under `current_model_state`, and both survive resume (Lightning's WeightAveraging).
"""

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn

from diffusion_lab.ema.power_ema import power_ema_beta, sigma_rel_to_gamma
from diffusion_lab.utils.errors import ConfigError


class EMA(WeightAveraging):
    """theta_ema <- d theta_ema + (1 - d) theta with d = decay, or with warmup d_n = min(decay, (1 + n) / (10 + n))
    after n updates (the warmup of diffusers' EMAModel / TensorFlow's ExponentialMovingAverage num_updates).

    With `sigma_rel` instead of `decay`: the power-function EMA of that relative length (Karras et al. 2024, EDM2
    Eq. 3), d_n = (n / (n + 1))^(gamma + 1) after n updates (Eq. 127 with t the update count), which averages the
    weights with the profile p(tau) ~ tau^gamma over the whole run; the length `python -m diffusion_lab.sweep`
    finds best in post-hoc EMA, tracked directly."""

    def __init__(self, decay: float | None = 0.9999, warmup: bool = True, sigma_rel: float | None = None,
                 update_every_n_steps: int = 1):
        if (decay is None) == (sigma_rel is None):
            raise ConfigError(f"callbacks.ema: decay={decay}, sigma_rel={sigma_rel}: give one of them (decay: a constant "
                              "decay; sigma_rel: a power-function EMA) and set the other to null")
        if decay is not None and not 0 < decay < 1:
            raise ConfigError(f"callbacks.ema.decay={decay} must be in (0, 1)")
        if sigma_rel is not None and not warmup:
            raise ConfigError("callbacks.ema.warmup=false has no meaning with sigma_rel: the power-function EMA starts "
                              "from the first weights")
        try:
            self.gamma = None if sigma_rel is None else sigma_rel_to_gamma(sigma_rel)
        except ConfigError as error:
            raise ConfigError(f"callbacks.ema.{error}") from error
        if update_every_n_steps < 1:
            raise ConfigError(f"callbacks.ema.update_every_n_steps={update_every_n_steps} must be >= 1")
        self.decay, self.warmup, self.update_every_n_steps = decay, warmup, update_every_n_steps
        self._swapped_in = False  # the averaged weights are in the module (validation)
        super().__init__(multi_avg_fn=self._ema_update, use_buffers=True)

    def _ema_update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if averaged[0].is_floating_point():  # called once per (device, dtype) group
            # decay as a tensor on the weights' device: no host-device sync in the training step
            n = num_averaged.to(torch.float64)
            if self.gamma is not None:
                decay = power_ema_beta(n + 1, self.gamma)  # update n + 1 of the run's updates
            elif self.warmup:
                decay = ((1 + n) / (10 + n)).clamp(max=self.decay)
            else:
                decay = torch.full_like(n, self.decay)
            torch._foreach_lerp_(averaged, current, (1 - decay).to(averaged[0].dtype))
        else:  # integer buffers (BatchNorm's num_batches_tracked) are copied
            torch._foreach_copy_(averaged, current)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._swapped_in = self._average_model is not None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._swapped_in = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stop inside validation (SIGTERM) finds the averaged weights swapped in: swap back before the
        checkpoint callbacks (which Lightning calls last) save, or last.ckpt would hold raw and EMA exchanged."""
        if self._swapped_in:
            self._swap_models(pl_module)
            self._swapped_in = False

    @property
    def averaged_module(self) -> nn.Module | None:
        """The LightningModule holding the averaged weights (None before fit starts)."""
        return None if self._average_model is None else self._average_model.module


def averaged_or_current(trainer, pl_module) -> nn.Module:
    """The EMA copy of the LightningModule when an EMA callback runs, else the module itself."""
    for callback in trainer.callbacks:
        if isinstance(callback, EMA) and callback.averaged_module is not None:
            return callback.averaged_module
    return pl_module
