"""Training a consistency model (process=consistency): distillation from a teacher (CD, Song et al. 2023, Alg. 2) and
improved consistency training (iCT, Song & Dhariwal 2023). The math is `diffusion.consistency`; these modules hold
what a process cannot: the target network theta^- (a submodule, saved, so a resumed run continues exactly), the
teacher (frozen, reloaded from teacher_ckpt, never saved in the student's checkpoints), the metric's network (LPIPS,
frozen and reloaded from its files the same way) and the step count of the curriculum. The student is model.net
under the Consistency process: its checkpoint samples like any other."""

import math

import torch
from torch import Tensor

from diffusion_lab.diffusion.consistency import Metric, heun_step, lpips_metric
from diffusion_lab.models.components.lpips import LIN_URL, VGG16_URL, load_lpips
from diffusion_lab.models.diffusion_module import DiffusionModule
from diffusion_lab.models.teacher import Frozen, init_from_teacher, load_teacher
from diffusion_lab.utils.errors import ConfigError

METRICS = ("pseudo_huber", "lpips")


class ConsistencyModule(DiffusionModule):
    """model.net trained under the Consistency process against a target network theta^- <- stopgrad(mu theta^- +
    (1 - mu) theta) after every optimizer step (Song et al. 2023, Alg. 2-3; target_decay mu = 0: the student itself).
    metric: d of the loss, pseudo_huber (iCT) or lpips (Song et al. 2023), the latter from the files lpips_weights (the
    linear layers) and vgg_weights (the VGG16; null: the torch hub cache's copy), with VGG's lpips_pooling (null: max,
    the lpips package's; average: piq's, as Song et al.'s code), see `models/components/lpips.py`."""

    def __init__(self, model, *args, target_decay: float = 0.95, metric: str = "pseudo_huber",
                 lpips_weights: str | None = None, vgg_weights: str | None = None, lpips_pooling: str | None = None,
                 **kwargs):
        super().__init__(model, *args, **kwargs)
        if model.process_name != "consistency":
            raise ConfigError(f"module {type(self).__name__} trains process=consistency, not process {model.process_name}")
        if self.cache_latents:
            raise ConfigError("module.cache_latents=true is not supported when training a consistency model; set it false")
        if not 0 <= target_decay < 1:
            raise ConfigError(f"module.target_decay={target_decay} must be in [0, 1)")
        self.target_decay = target_decay
        self.target_net = model.backbone_copy() if target_decay > 0 else None
        self.lpips = self.metric_network(metric, lpips_weights, vgg_weights, lpips_pooling)

    def metric_network(self, metric: str, lpips_weights: str | None, vgg_weights: str | None,
                       pooling: str | None) -> Frozen | None:
        """The frozen LPIPS of metric=lpips, else None (pseudo-Huber); a one-line ConfigError for options that do not
        fit."""
        if metric not in METRICS:
            raise ConfigError(f"module.metric={metric!r} is not allowed; choose one of {', '.join(METRICS)}")
        if metric == "pseudo_huber":
            if lpips_weights is not None or vgg_weights is not None or pooling is not None:
                raise ConfigError("module.lpips_weights, module.vgg_weights and module.lpips_pooling are read only with "
                                  "module.metric=lpips; set it or drop them")
            return None
        if self.model.setting("huber_c") is not None:
            raise ConfigError(f"process.huber_c={self.model.setting('huber_c')} is the pseudo-Huber constant, unused with "
                              "module.metric=lpips; drop it")
        if self.model.latent or self.model.sample_shape[0] not in (1, 3):
            raise ConfigError(f"module.metric=lpips compares 1- or 3-channel images; this model's samples are "
                              f"{'latents' if self.model.latent else 'images'} of shape {self.model.sample_shape}; "
                              "use module.metric=pseudo_huber")
        if not lpips_weights:
            raise ConfigError(f"module.metric=lpips needs module.lpips_weights=PATH, the lpips package's "
                              f"lpips/weights/v0.1/vgg.pth ({LIN_URL}), and torchvision's VGG16 {VGG16_URL} in the "
                              "torch hub cache or at module.vgg_weights=PATH")
        return Frozen(load_lpips(lpips_weights, vgg_weights, pooling or "max"))

    def metric(self) -> Metric | None:
        """d of the loss for `Consistency.training_losses`: None is its pseudo-Huber."""
        return None if self.lpips is None else lpips_metric(self.lpips.model)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.lpips is not None:
            self.lpips.model.to(self.device)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.target_net is not None:
            self.model.update_average(self.target_net, self.target_decay)


class ConsistencyDistillationModule(ConsistencyModule):
    """CD: x_hat_n from x_{n+1} by a Heun step of the teacher's denoiser between adjacent levels of N = num_scales
    (process.num_scales); with init_student the student starts from the teacher's backbone weights
    (init_from_teacher), which only an EDM teacher of the student's sigma_data feeds as the student does (the same c_in
    and c_noise); a DDPM teacher's student starts from scratch (init_student=false). The student's levels must lie
    where the teacher's denoiser is defined (`check_levels`)."""

    def __init__(self, model, *args, teacher_ckpt: str | None = None, init_student: bool = True, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.teacher = load_teacher(teacher_ckpt, ("edm", "gaussian"), model, "consistency_distillation")
        teacher = self.teacher.model
        if init_student and teacher.process_name != "edm":
            raise ConfigError(f"module.init_student=true starts the student from the weights of teacher_ckpt={teacher_ckpt}, "
                              f"a {teacher.describe()} network, which reads noisy inputs and time otherwise than the "
                              "student's EDM c_in and c_noise; set module.init_student=false (Song et al. 2023 start from "
                              "an EDM teacher)")
        if init_student and teacher.setting("sigma_data") != model.setting("sigma_data"):
            raise ConfigError(f"module.init_student=true starts the student from the weights of teacher_ckpt={teacher_ckpt}, "
                              f"trained with c_in = 1 / sqrt(sigma^2 + sigma_data^2) at sigma_data="
                              f"{teacher.setting('sigma_data')}; set process.sigma_data to the teacher's "
                              f"{teacher.setting('sigma_data')}")
        check_levels(model, teacher, teacher_ckpt)
        if init_student:
            init_from_teacher(model, teacher, teacher_ckpt)
            if self.target_net is not None:
                self.target_net.load_state_dict(model.backbone_state())

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

        return self.model.loss(x0, generator, labels, target_net=self.target_net, estimate_previous=teacher_step,
                               metric=self.metric())


def check_levels(student, teacher, path: str) -> None:
    """The student's lowest level sigma_min must be one the teacher's denoiser is defined at: a DDPM teacher knows
    only its table's levels, and below the smallest its timestep lookup clamps, so that its eps no longer satisfies
    x = x_0 + sigma eps and the Heun step of the lowest pair (the one that anchors f(x, sigma_min) = x) goes wrong.
    The student's grid is not moved silently: sigma_min is its boundary condition, saved in its config and read by
    the consistency sampler, so a mismatch is one ConfigError line naming the value to set."""
    smallest = teacher.level_range()[0]
    if student.setting("sigma_min") < smallest:
        raise ConfigError(f"process.sigma_min={student.setting('sigma_min')} lies below the smallest noise level of "
                          f"teacher_ckpt={path} ({teacher.describe()}: sigma = {smallest:.6g}), where its denoiser is not "
                          f"defined; set process.sigma_min={math.ceil(smallest * 1e4) / 1e4} (or more)")


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
        return self.model.loss(x0, generator, labels, num_scales=self.num_scales(self.global_step),
                               target_net=self.target_net, metric=self.metric())
