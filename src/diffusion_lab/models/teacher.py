"""The teacher of a distillation run: a trained checkpoint of this project, loaded by path (`teacher_ckpt=PATH`) as
its own model object, frozen, and kept out of the student's state dict, parameters and copies."""

import torch
from torch import nn

from diffusion_lab.models.diffusion_model import DiffusionModel
from diffusion_lab.sample import load_model
from diffusion_lab.utils.checkpoint import load_checkpoint
from diffusion_lab.utils.errors import ConfigError


class Frozen:
    """Holds a frozen model outside nn.Module registration: not saved in the student's checkpoints (it is reloaded
    from its own path on resume), not optimised or averaged, and shared, not copied, by the EMA callback's deepcopy."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    def __deepcopy__(self, memo: dict) -> "Frozen":
        return self


def load_teacher(path: str | None, processes: tuple[str, ...], student: DiffusionModel, experiment: str) -> Frozen:
    """The EMA model of the checkpoint at `path`, frozen. One-line ConfigError for no path, a missing or foreign
    file, a process not in `processes`, or a teacher of another sample shape or classes than the student."""
    if not path:
        raise ConfigError(f"experiment={experiment} needs a teacher: add teacher_ckpt=PATH (a {' or '.join(processes)} "
                          "checkpoint of this project, e.g. <run>/checkpoints/last.ckpt)")
    teacher = load_model(load_checkpoint(path, key="teacher_ckpt"), "ema", torch.device("cpu"))
    if teacher.process.name not in processes:
        raise ConfigError(f"teacher_ckpt={path} is a {teacher.process.name} checkpoint; experiment={experiment} distils "
                          f"a {' or '.join(processes)} teacher")
    if teacher.sample_shape != student.sample_shape or teacher.num_classes != student.num_classes:
        raise ConfigError(f"teacher_ckpt={path} samples shape {teacher.sample_shape} with classes {teacher.num_classes}, but "
                          f"the student {student.sample_shape} with {student.num_classes}; use the teacher's data config")
    return Frozen(teacher)


def init_from_teacher(student: nn.Module, teacher: nn.Module, path: str) -> None:
    """Copy the teacher's backbone weights into the student's (Song et al. 2023 and Salimans & Ho 2022 start the
    student from the teacher); a backbone of another shape is a one-line ConfigError."""
    try:
        student.load_state_dict(teacher.state_dict())
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ConfigError(f"the student's backbone differs from the teacher's (teacher_ckpt={path}): {detail[:200]}; "
                          "give the student the teacher's model overrides") from error
