"""Learning-rate schedules, and the optimizer set-up every LightningModule of the project shares."""

from typing import Any, Callable

import torch

from diffusion_lab.utils.errors import ConfigError


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr * min(1, (t + 1) / warmup_steps): the linear warmup of Ho et al. 2020 (5000 steps on CIFAR-10)."""
    warmup_steps = max(int(warmup_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))


def build(key: str, factory: Callable[..., Any], **arguments) -> Any:
    """`factory(**arguments)` (a `_partial_` config of `key`); an argument the class refuses (torch's ValueError or
    TypeError) is a ConfigError naming the `key.*` values given."""
    try:
        return factory(**arguments)
    except (ValueError, TypeError) as error:
        func = getattr(factory, "func", factory)
        given = ", ".join(f"{key}.{arg}={value}" for arg, value in getattr(factory, "keywords", {}).items())
        name = getattr(func, "__name__", func)
        raise ConfigError(f"{key}: {name} refuses {given or 'its defaults'}: {error}") from error


def optimizers_and_schedulers(params, optimizer: Callable[..., torch.optim.Optimizer],
                              lr_scheduler: Callable[..., Any] | None) -> dict:
    """What a LightningModule's `configure_optimizers` returns: the `_partial_` optimizer finished with `params`,
    and the `_partial_` LR scheduler (if any) finished with it and stepped every optimizer step."""
    built = build("optimizer", optimizer, params=params)
    if lr_scheduler is None:
        return {"optimizer": built}
    scheduler = build("lr_scheduler", lr_scheduler, optimizer=built)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
