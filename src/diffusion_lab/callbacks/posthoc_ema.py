"""Power-function EMAs of the weights kept during training, with snapshots for post-hoc EMA (Karras et al. 2024, EDM2
Sec. 3; NVlabs/edm2 `training/phema.py`). `python -m diffusion_lab.posthoc_ema RUN sigma_rel=S out=CKPT` then builds
the EMA of any length from the snapshots.

Written here rather than with ema-pytorch's `PostHocEMA`: that one keeps its own model copies and step counter
outside Lightning's checkpoint, counts one update per call (its profile drifts from p_t under gradient accumulation
or `update_every`), and saves its snapshots in float16 with a plain torch.save; here the averages are callback state
(resumed bit for bit), t is the optimizer step, and the snapshots are written atomically in the weights' dtype.
"""

from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from diffusion_lab.ema.power_ema import power_ema_beta, sigma_rel_to_gamma
from diffusion_lab.ema.snapshots import write_snapshot
from diffusion_lab.utils.errors import ConfigError


class PostHocEMA(Callback):
    """After optimizer step t, each EMA takes ema <- beta ema + (1 - beta) theta, beta = (1 - 1/t)^(gamma + 1) (EDM2
    Eq. 127), over the trained parameters and floating-point buffers (frozen parameters and integer buffers are
    constant, and taken as they are). Every `every_n_steps` steps, and at the end of training, each EMA is written to
    `dirpath` as a snapshot; the averages themselves live in the Lightning checkpoint (`state_dict`)."""

    def __init__(self, dirpath: str | Path, sigma_rels: tuple[float, ...] = (0.05, 0.10), every_n_steps: int = 100):
        try:
            self.gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
        except ConfigError as error:
            raise ConfigError(f"callbacks.posthoc_ema.sigma_rels={list(sigma_rels)}: {error}") from error
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise ConfigError(f"callbacks.posthoc_ema.sigma_rels={list(sigma_rels)} must be one or more distinct values")
        if every_n_steps < 1:
            raise ConfigError(f"callbacks.posthoc_ema.every_n_steps={every_n_steps} must be >= 1")
        self.dirpath, self.sigma_rels, self.every_n_steps = Path(dirpath), list(sigma_rels), every_n_steps
        self.averages: list[dict[str, Tensor]] = []  # per sigma_rel: weight name -> its EMA
        self.step = 0  # the optimizer step the averages have reached

    @staticmethod
    def averaged_names(pl_module: LightningModule) -> list[str]:
        """The entries of the module's state dict that training changes: trained parameters, floating buffers."""
        state = pl_module.state_dict()
        trained = {name for name, p in pl_module.named_parameters() if p.requires_grad}
        floating = {name for name, b in pl_module.named_buffers() if b.is_floating_point()}
        return [name for name in state if name in trained | floating]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = pl_module.state_dict()
        names = self.averaged_names(pl_module)
        if not self.averages:
            if trainer.global_step > 0:
                raise ConfigError(f"the checkpoint resumed at step {trainer.global_step} holds no post-hoc EMA (it was "
                                  "trained without callbacks.posthoc_ema, whose averages start at step 0); start a new run")
            if any(self.dirpath.glob("phema-*.pt")):
                raise ConfigError(f"callbacks.posthoc_ema.dirpath={self.dirpath} holds snapshots of an earlier run; "
                                  "delete them or choose another paths.output_dir")
            self.averages = [{name: state[name].detach().clone() for name in names} for _ in self.sigma_rels]
        elif list(self.averages[0]) != names:
            raise ConfigError("the resumed checkpoint's post-hoc EMAs cover other weights than this model's")
        self.averages = [{name: value.to(state[name].device) for name, value in average.items()} for average in self.averages]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:  # no optimizer step in this batch (gradient accumulation)
            return
        state = pl_module.state_dict()
        for gamma, average in zip(self.gammas, self.averages):
            beta = power_ema_beta(trainer.global_step, gamma, trainer.global_step - self.step)
            torch._foreach_lerp_(list(average.values()), [state[name] for name in average], 1 - beta)
        self.step = trainer.global_step
        if self.step % self.every_n_steps == 0:
            self.write_snapshots(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.step % self.every_n_steps:  # the final step, so that a reconstruction can reach it
            self.write_snapshots(trainer, pl_module)

    def write_snapshots(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Each EMA in the layout of the module's state dict (the rest of it: constant, taken from the module)."""
        if not trainer.is_global_zero:
            return
        state = {name: value.detach().cpu() for name, value in pl_module.state_dict().items()}
        for sigma_rel, gamma, average in zip(self.sigma_rels, self.gammas, self.averages):
            weights = {**state, **{name: value.cpu() for name, value in average.items()}}
            write_snapshot(self.dirpath, self.step, sigma_rel, gamma, weights)

    def state_dict(self) -> dict[str, Any]:
        return {"sigma_rels": self.sigma_rels, "step": self.step, "averages": self.averages}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["sigma_rels"] != self.sigma_rels:
            raise ConfigError(f"the resumed checkpoint's post-hoc EMAs have sigma_rels={state_dict['sigma_rels']}, not "
                              f"callbacks.posthoc_ema.sigma_rels={self.sigma_rels}; keep them for the run's length")
        self.step, self.averages = state_dict["step"], state_dict["averages"]
