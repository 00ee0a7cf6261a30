"""Learning-rate schedules, and the optimizer set-up every LightningModule of the project shares."""

from typing import Any, Callable

import torch


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr * min(1, (t + 1) / warmup_steps): the linear warmup of Ho et al. 2020 (5000 steps on CIFAR-10)."""
    warmup_steps = max(int(warmup_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


def optimizers_and_schedulers(params, optimizer: Callable[..., torch.optim.Optimizer],
                              lr_scheduler: Callable[..., Any] | None) -> dict:
    """What a LightningModule's `configure_optimizers` returns: the `_partial_` optimizer finished with `params`,
    and the `_partial_` LR scheduler (if any) finished with it and stepped every optimizer step."""
    built = optimizer(params=params)
    if lr_scheduler is None:
        return {"optimizer": built}
    return {"optimizer": built, "lr_scheduler": {"scheduler": lr_scheduler(optimizer=built), "interval": "step"}}
