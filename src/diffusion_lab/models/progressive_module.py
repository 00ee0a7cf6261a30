"""Progressive distillation (Salimans & Ho 2022, Alg. 2) in stages within one run: stage s (steps_per_stage optimizer
steps each) trains a student of N_s = teacher_steps / 2^(s + 1) DDIM steps on the `trailing` grid of its process
against two steps of its teacher: the checkpoint of teacher_ckpt at stage 0, then the student of the stage before.
The student starts from its teacher's weights and learns in its teacher's parameterisation: process=gaussian with
objective=v (the paper's), or process=edm, whose network target (x_0 - c_skip x) / c_out is the v of data of std
sigma_data (exactly -v for sigma_data = 1: c_in x is then the variance-preserving z, c_skip = alpha^2, c_out = sigma). Each finished stage writes
`<output_dir>/checkpoints/stage{s}_{N_s}steps.ckpt`, whose config samples with its N_s steps. Each stage starts a
fresh optimizer state (Adam's moments and step count), as each stage of the paper is a new optimisation of the
student from its teacher's weights. The teacher network of stages >= 1 and the stage index are saved (a resumed run
continues exactly); the loaded teacher is not."""

import copy
from pathlib import Path

import torch
from torch import Tensor

from diffusion_lab.diffusion.progressive import distillation_losses
from diffusion_lab.models.diffusion_module import DiffusionModule
from diffusion_lab.models.teacher import check_same_parameterisation, init_from_teacher, load_teacher
from diffusion_lab.utils.errors import ConfigError


class ProgressiveDistillationModule(DiffusionModule):
    """See the module docstring. The student samples stage s with sampler=ddim sampler.spacing=trailing
    sampler.steps=N_s, whose grid is the even half of its teacher's; for process=gaussian, schedule.timesteps must
    be divisible by teacher_steps for that."""

    def __init__(self, model, *args, teacher_ckpt: str | None = None, teacher_steps: int = 256, final_steps: int = 1,
                 steps_per_stage: int = 5000, checkpoint_dir: str = "checkpoints", **kwargs):
        super().__init__(model, *args, **kwargs)
        if model.describe() not in ("process edm", "process gaussian objective=v"):
            raise ConfigError("experiment=progressive_distillation trains process=gaussian with process.objective=v "
                              f"(Salimans & Ho 2022) or process=edm, not {model.describe()}")
        if self.cache_latents:
            raise ConfigError("module.cache_latents=true is not supported by progressive distillation; set it false")
        stages = [teacher_steps // 2**s for s in range(1, 64) if teacher_steps // 2**s >= final_steps]
        if not (isinstance(steps_per_stage, int) and steps_per_stage >= 1 and final_steps >= 1 and stages
                and stages[-1] == final_steps and all(teacher_steps == n * 2 ** (s + 1) for s, n in enumerate(stages))):
            raise ConfigError(f"module.teacher_steps={teacher_steps}, final_steps={final_steps}, steps_per_stage="
                              f"{steps_per_stage}: need final_steps * 2^k = teacher_steps (k >= 1) and steps_per_stage >= 1")
        if model.process_name == "gaussian" and model.setting("num_timesteps") % teacher_steps:
            raise ConfigError(f"schedule.timesteps={model.setting('num_timesteps')} must be divisible by module.teacher_steps="
                              f"{teacher_steps}, so that each student's grid is the even half of its teacher's")
        self.teacher = load_teacher(teacher_ckpt, ("gaussian", "edm"), model, "progressive_distillation")
        check_same_parameterisation(model, self.teacher.model, *model.grid(teacher_steps, "trailing"), teacher_ckpt)
        init_from_teacher(model, self.teacher.model, teacher_ckpt)
        self.stage_steps, self.steps_per_stage = stages, steps_per_stage
        self.checkpoint_dir = Path(checkpoint_dir)
        self.teacher_net = model.backbone_copy()  # the teacher of stages >= 1
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.model.to(self.device)

    def train(self, mode: bool = True) -> "ProgressiveDistillationModule":
        """The teacher network stays in eval mode (no dropout) while the student trains."""
        super().train(mode)
        self.teacher_net.eval()
        return self

    def stage_path(self, stage: int) -> Path:
        return self.checkpoint_dir / f"stage{stage}_{self.stage_steps[stage]}steps.ckpt"

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """At the first step of a new stage: write the finished stage's checkpoint; its student becomes the teacher,
        and the optimizer starts afresh."""
        stage = int(self.stage)
        if stage < len(self.stage_steps) - 1 and self.global_step >= (stage + 1) * self.steps_per_stage:
            self.trainer.save_checkpoint(self.stage_path(stage), weights_only=False)  # whole: a stage resumes and samples
            self.teacher_net.load_state_dict(self.model.backbone_state())
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
            self.stage += 1

    def on_train_end(self) -> None:
        self.trainer.save_checkpoint(self.stage_path(int(self.stage)), weights_only=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        config = copy.deepcopy(self.run_config)
        config.setdefault("sampler", {})["steps"] = self.stage_steps[int(self.stage)]
        checkpoint["config"] = config

    def _losses(self, batch: tuple[Tensor, Tensor], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        inputs, labels = batch
        x0 = self.model.encode(inputs, generator)
        labels = labels if self.model.conditional else None
        if labels is not None:  # the null class for guidance, for student and teacher alike
            labels = self.model.drop_labels(labels, generator)
        stage = int(self.stage)
        if stage == 0:
            teacher = self.teacher.model.denoiser(False, class_labels=labels)
        else:
            teacher = self.model.denoiser(False, class_labels=labels, net=self.teacher_net)
        student = self.model.denoiser(False, class_labels=labels)
        alphas, sigmas = self.model.grid(2 * self.stage_steps[stage], "trailing")
        return distillation_losses(student, teacher, x0, alphas, sigmas, generator)
