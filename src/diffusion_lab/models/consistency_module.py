"""Training a consistency model (process=consistency): distillation from a teacher (CD, Song et al. 2023, Alg. 2) and
improved consistency training (iCT, Song & Dhariwal 2023). The math is `diffusion.consistency`; these modules hold
what a process cannot: the target network theta^- (a submodule, saved, so a resumed run continues exactly), the
teacher (frozen, reloaded from teacher_ckpt, never saved in the student's checkpoints) and the step count of the
curriculum. The student is model.net under the Consistency process: its checkpoint samples like any other."""

import copy
import math

import torch
from torch import Tensor

from diffusion_lab.diffusion.consistency import Consistency, heun_step
from diffusion_lab.models.diffusion_module import DiffusionModule
from diffusion_lab.models.teacher import init_from_teacher, load_teacher
from diffusion_lab.utils.errors import ConfigError


class ConsistencyModule(DiffusionModule):
    """model.net trained under the Consistency process against a target network theta^- <- stopgrad(mu theta^- +
    (1 - mu) theta) after every optimizer step (Song et al. 2023, Alg. 2-3; target_decay mu = 0: the student itself)."""

    def __init__(self, model, *args, target_decay: float = 0.95, **kwargs):
        super().__init__(model, *args, **kwargs)
        if not isinstance(model.process, Consistency):
            raise ConfigError(f"module {type(self).__name__} trains process=consistency, not process {model.process.name}")
        if self.cache_latents:
            raise ConfigError("module.cache_latents=true is not supported when training a consistency model; set it false")
        if not 0 <= target_decay < 1:
            raise ConfigError(f"module.target_decay={target_decay} must be in [0, 1)")
        self.target_decay = target_decay
        self.target_net = copy.deepcopy(model.net).requires_grad_(False) if target_decay > 0 else None

    def target(self):
        return self.model.net if self.target_net is None else self.target_net

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.target_net is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.target_net.parameters()), list(self.model.net.parameters()),
                                     1 - self.target_decay)


class ConsistencyDistillationModule(ConsistencyModule):
    """CD: x_hat_n from x_{n+1} by a Heun step of the teacher's denoiser between adjacent levels of N = num_scales
    (process.num_scales); the student starts from the teacher's backbone weights (init_from_teacher)."""

    def __init__(self, model, *args, teacher_ckpt: str | None = None, init_student: bool = True, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.teacher = load_teacher(teacher_ckpt, ("edm", "ddpm"), model, "consistency_distillation")
        if init_student:
            init_from_teacher(model.net, self.teacher.model.net, teacher_ckpt)
            if self.target_net is not None:
                self.target_net.load_state_dict(model.net.state_dict())

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.model.to(self.device)

    def _losses(self, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs, labels = batch
        x0 = self.model.encode(inputs, generator)
        labels = labels if self.model.conditional else None

        def teacher_step(x_next: Tensor, sigma_next: Tensor, sigma: Tensor, z: Tensor, net_kwargs: dict) -> Tensor:
            denoiser = self.teacher.model.denoiser(False, class_labels=net_kwargs.get("class_labels"))
            return heun_step(denoiser, x_next, sigma_next, sigma)

        process = self.model.process
        return process.consistency_losses(self.model.net, self.target(), x0, generator, process.num_scales,
                                          teacher_step, labels)


class ConsistencyTrainingModule(ConsistencyModule):
    """iCT without a teacher: N(k) = min(s_0 2^floor(k / K'), s_1) + 1 levels at step k of K = total_steps, K' =
    floor(K / (log2 floor(s_1 / s_0) + 1)) (Song & Dhariwal 2023, Eq. 6), x_hat_n = x_0 + sigma_n z, the target the
    student itself (target_decay = 0, their Sec. 3.2); lognormal levels and pseudo-Huber come from the process."""

    def __init__(self, model, *args, total_steps: int = 400000, initial_scales: int = 10, final_scales: int = 1280,
                 target_decay: float = 0.0, **kwargs):
        super().__init__(model, *args, target_decay=target_decay, **kwargs)
        if not (isinstance(total_steps, int) and total_steps >= 1 and 1 <= initial_scales <= final_scales):
            raise ConfigError(f"module.total_steps={total_steps}, initial_scales={initial_scales}, final_scales="
                              f"{final_scales}: need total_steps >= 1 and 1 <= initial_scales <= final_scales")
        self.total_steps, self.initial_scales, self.final_scales = total_steps, initial_scales, final_scales

    def num_scales(self, step: int) -> int:
        """N(k) of the discretisation curriculum (iCT, Eq. 6)."""
        stage = max(self.total_steps // (int(math.log2(self.final_scales // self.initial_scales)) + 1), 1)
        return min(self.initial_scales * 2 ** (step // stage), self.final_scales) + 1

    def _losses(self, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs, labels = batch
        x0 = self.model.encode(inputs, generator)
        labels = labels if self.model.conditional else None
        return self.model.process.consistency_losses(self.model.net, self.target(), x0, generator,
                                                     self.num_scales(self.global_step), class_labels=labels)
