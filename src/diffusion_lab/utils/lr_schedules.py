"""Learning-rate schedules as torch LambdaLR factors."""

import torch


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr * min(1, (t + 1) / warmup_steps): the linear warmup of Ho et al. 2020 (5000 steps on CIFAR-10)."""
    warmup_steps = max(int(warmup_steps), 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
